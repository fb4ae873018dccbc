"""The annotation loop's steps around `ltuda suggest`: what to export, importing the proposals, the
review list. The logic (logic.py) strings them together; the console API is there.

Before the command (SuggestPreparation, one step per process() call so the GUI never blocks for
long): file cases among the chosen ones are loaded into the scene (a proposal is a segment, so the
case needs a segmentation), then the cases are exported like for training, except that an organ
labelled nowhere does not stop it. The backend's manifest check wants every class labelled by some
case of the manifest, with values 1..C: the manifest lists only the organs its cases label, and
when the chosen cases do not label one that another case labels, that case is exported too (but
not sent to `--cases`). After the command (ProposalImport), each case's <id>.seg.nrrd is added to
its segmentation, one case per step.
"""

import os

from .cases import MISSING, PROPOSED, isLabel, scanCase, uniqueCaseIds
from .organs import renumber


def casesToExport(chosen, allCases, statuses, organs):
    """(cases to export: the chosen ones plus, per organ the chosen do not label, one other case that
    labels it; the organs that end up labelled by them, in list order)."""
    statusOf = {id(st.case): st for st in statuses}
    labelled = lambda case: set(statusOf[id(case)].labelled) if id(case) in statusOf else set()  # noqa: E731
    export = list(chosen)
    covered = set().union(*[labelled(c) for c in chosen]) if chosen else set()
    for organ in organs:
        if organ["name"] in covered:
            continue
        candidates = [c for c in allCases if not any(c is e for e in export) and organ["name"] in labelled(c)]
        if candidates:
            case = next((c for c in candidates if c.isScene), candidates[0])  # a scene case needs no loading
            export.append(case)
            covered |= labelled(case)
    names = [o["name"] for o in organs if o["name"] in covered]
    return export, names


class SuggestPreparation:
    """Load the file cases (one per step), then the stepwise export (export.TrainingExport with
    requireLabels=False). result: (manifest path, {case id: Case} of every exported case, [ids of
    the chosen cases])."""

    def __init__(self, logic, chosen, exportCases, organNames, workDir):
        self.logic = logic
        self.chosen = list(chosen)
        self.cases = list(exportCases)
        self.organs = renumber([dict(o) for o in logic.organs if o["name"] in organNames])
        self.workDir = workDir
        self.export = None
        self.result = None
        self.loaded = 0
        self._toLoad = sum(1 for c in self.cases if not c.isScene)
        self.lastStepTookCase = False

    def step(self):
        from .export import TrainingExport

        for i, case in enumerate(self.cases):
            if not case.isScene:  # one file case per step
                loaded = self.logic.loadFileCase(case)
                self.chosen = [loaded if c is case else c for c in self.chosen]
                self.cases[i] = loaded
                self.loaded += 1
                self.lastStepTookCase = True
                return False
        if self.export is None:
            self.export = TrainingExport(self.cases, self.organs, self.workDir, name="slicer-cases-suggest",
                                         ignoreUnmatched=True, requireLabels=False)
            self.export.begin()
            self.lastStepTookCase = True
            return False
        done = self.export.step()
        self.lastStepTookCase = self.export.lastStepTookCase
        if done:
            ids = uniqueCaseIds(self.cases)
            byId = dict(zip(ids, self.cases))
            chosenIds = [i for i, c in byId.items() if any(c is k for k in self.chosen)]
            self.result = (self.export.result[0], byId, chosenIds)
        return done

    def fraction(self):
        loading = self.loaded / self._toLoad if self._toLoad else 1.0
        return 0.2 * loading + 0.8 * (self.export.fraction() if self.export is not None else 0.0)

    def statusText(self):
        if self.export is None:
            return f"Loading file case {min(self.loaded + 1, self._toLoad)} of {self._toLoad} into the scene..."
        return self.export.statusText()

    def cancel(self):
        if self.export is not None:
            self.export.cancel()


def proposalFiles(outFolder, caseIds):
    """[(case id, OUT/<case id>.seg.nrrd)] for the cases that got a proposal file (a case that labels
    every organ gets none)."""
    files = [(i, os.path.join(outFolder, i + ".seg.nrrd")) for i in caseIds]
    return [(i, p) for i, p in files if os.path.isfile(p)]


class ProposalImport:
    """Add proposal files to their cases' segmentations, one case per step(). files: [(case id,
    path)]; added: [(case name, organ, segment id)]; skipped: [(case name, organ, reason)]."""

    def __init__(self, casesById, files, organs):
        self.casesById = casesById
        self.items = list(files)
        self.organs = organs
        self.done = 0
        self.added = []
        self.skipped = []

    def fraction(self):
        return self.done / len(self.items) if self.items else 1.0

    def statusText(self):
        return f"Adding the proposals: case {min(self.done + 1, len(self.items))} of {len(self.items)}..."

    def step(self):
        from .proposals import addProposalsFromFile

        if self.done < len(self.items):
            caseId, path = self.items[self.done]
            self.done += 1
            case = self.casesById[caseId]
            if case.isAlive() and case.segmentationNode is not None:
                status = scanCase(case, self.organs, checkGeometry=False)
                keep = [n for n, s in status.organStatus.items() if isLabel(s) or s == PROPOSED]
                keep += list(status.proposedSegments.values())  # an empty proposal still counts as one
                added, skipped = addProposalsFromFile(case.segmentationNode, path, self.organs, skipOrgans=keep)
                self.added += [(case.name, organ, segmentId) for organ, segmentId in added]
                self.skipped += [(case.name, organ, reason) for organ, reason in skipped]
            else:
                self.skipped.append((case.name, "", "the case was removed from the scene"))
        return self.done >= len(self.items)


# ------------------------------------------------------------------------------------- review list
ROW_PROPOSED, ROW_REVIEWED, ROW_LABELLED, ROW_MISSING = PROPOSED, "reviewed", "labelled", MISSING


def rowStatus(case, organ, organs):
    """(status of a (case, organ) row: proposed | reviewed | labelled | missing, id of its segment)."""
    from .proposals import PROPOSED as TAG_PROPOSED, REVIEWED as TAG_REVIEWED, segmentsOfOrgan

    if case is None or not case.isAlive() or not case.isScene or case.segmentationNode is None:
        return ROW_MISSING, None
    proposed = segmentsOfOrgan(case.segmentationNode, organ, organs, TAG_PROPOSED)
    if proposed:
        return ROW_PROPOSED, proposed[0]
    reviewed = segmentsOfOrgan(case.segmentationNode, organ, organs, TAG_REVIEWED)
    if reviewed:
        return ROW_REVIEWED, reviewed[0]
    state = scanCase(case, organs, checkGeometry=False).organStatus.get(organ["name"])
    if isLabel(state):
        others = segmentsOfOrgan(case.segmentationNode, organ, organs)
        return ROW_LABELLED, others[0] if others else None
    return ROW_MISSING, None


def reviewRows(doc, casesById, organs, findCase):
    """The review list's rows (rank order) with "caseName", "status" and "segmentId" added.
    findCase(id) resolves a case id the stored mapping does not know (e.g. a list loaded by hand)."""
    from .organs import findOrgan

    rows = []
    for row in doc["rows"]:
        case = casesById.get(row["case"]) or findCase(row["case"])
        organ = findOrgan(organs, row["organ"])
        if organ is None:
            status, segmentId = ROW_MISSING, None
        else:
            status, segmentId = rowStatus(case, organ, organs)
        rows.append(dict(row, caseName=case.name if case is not None else row["case"], status=status,
                         segmentId=segmentId, caseObject=case))
    return rows
