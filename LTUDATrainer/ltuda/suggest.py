"""`ltuda suggest`: the model's proposals for the organs each training case does not label, ranked for review.

For every training case (or the listed ones) it writes OUT/<case>.seg.nrrd holding the model's segments
for the organs the case does not label, on the case image's own grid, each segment tagged
`LTUDA.status:proposed`, and OUT/suggestions.json: one row per (case, missing organ), ranked so that
the first row is the one most worth a person's review.

Uncertainty scores (all computed from the forward passes that make the proposal; `--score` picks the
one that ranks, `benchmarks/annotation_loop.py` compares them):
- entropy: mean binary entropy of the organ's probability over the predicted organ and its unsure border;
- heads:   1 - Dice between the default head's organ and the other two heads' (linear vs prototypes);
- shift:   1 - Dice between the organ and the organ predicted from a shifted copy of each slice;
- error:   the voxels the model itself expects to be wrong (sum of 1 - p inside the organ and p outside,
           over the organ and the voxels with p > 0.05), as a fraction of the organ's expected volume;
- volume:  the predicted volume in ml (largest first): the baseline a person would use;
- random:  a fixed shuffle (per model), the order of no information.
Order (`--order`): "balanced" (default for the uncertainty scores) takes each organ's most uncertain
row, then each organ's second, ... (ties by score), so that the first reviews cover every organ
instead of one weak organ in every case; "score" sorts by the score alone.
A proposal that is empty (the model found nothing) gets uncertainty 1 under every score: someone has
to draw that organ.

Resumable like `predict`: a case whose proposal file exists, was made by the same weights and holds
the organs the case still lacks is not redone (its rows are kept in the file's header), and
suggestions.json is rewritten from all cases at the end. Cases are claimed (claims.py), so several
workers may share one output folder. SIGTERM, SIGINT or a file named STOP in OUT stop between slice
batches: the stream ends with `done` status "cancelled", exit 130; finished cases stay.
"""

import contextlib
import hashlib
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from .claims import DEFAULT_TIMEOUT_S, ClaimBox
from .data.preprocess import check_image_values, normalise_hu, resize_slices
from .errors import LtudaError, ManifestProblems
from .io.volumes import read_image
from .manifest import load_manifest
from .model.network import HEADS, class_probabilities
from .predict import Predictor
from .progress import SilentReporter
from .train.lock import STOP_NAME
from .train.trainer import device_name

SCHEMA = "ltuda-suggestions/1"
SUGGESTIONS = "suggestions.json"
STATUS_TAG = "LTUDA.status"
PROPOSED = "proposed"
SCORES = ("entropy", "heads", "shift", "error", "volume", "random")
COMPUTED = ("entropy", "heads", "shift", "error")  # the uncertainties each proposal file records
ORDERS = ("balanced", "score")
# Measured by benchmarks/annotation_loop.py (results/annotation_loop.md): on the phantoms no uncertainty
# ranking gave a better model than random order after the same number of reviews (differences within
# the seed spread), so random order stays the default; --score picks an uncertainty ranking.
DEFAULT_SCORE = "random"
# NRRD header field of a proposal file: its rows and what made them (for resume).
HEADER_FIELD = "LTUDA_Suggestion"
UNSURE_ENTROPY = 0.1  # bits: a voxel this unsure of the organ belongs to its border region
POSSIBLE = 0.05  # probability above which a voxel outside the organ counts towards its expected error


class SuggestStopped(Exception):
    """Cancel requested (signal or STOP file)."""


def binary_entropy(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-6, 1 - 1e-6)
    return -(p * torch.log2(p) + (1 - p) * torch.log2(1 - p))


class ScoringPredictor(Predictor):
    """The predictor's segmentation (same labels), plus per-organ uncertainty sums from the same passes."""

    def start_case(self):
        n = len(self.classes) + 1
        zeros = lambda: torch.zeros(n, dtype=torch.float64, device=self.device)  # noqa: E731
        self.sums = {key: zeros() for key in ("entropy", "region", "size", "shift_size", "shift_both", "wrong",
                                              "expected")}
        self.other_heads = [h for h in HEADS if h != self.head]
        for head in self.other_heads:
            self.sums[f"{head}_size"], self.sums[f"{head}_both"] = zeros(), zeros()

    def _labels(self, out, head, height, width):
        scores = F.interpolate(class_probabilities(out, head), size=(height, width), mode="bilinear",
                               align_corners=False)
        return scores, scores.max(dim=1).indices

    def _count(self, add: dict, labels, other, prefix):
        """Per class: voxels of `other`'s organ, and voxels both call the organ (for a Dice)."""
        n = len(self.classes) + 1
        add[f"{prefix}_size"] = torch.bincount(other.flatten(), minlength=n).double()
        both = torch.where(labels == other, labels, torch.zeros_like(labels))
        add[f"{prefix}_both"] = torch.bincount(both.flatten(), minlength=n).double()

    def _segment_slices(self, chunk: np.ndarray, height: int, width: int) -> np.ndarray:
        x = resize_slices(normalise_hu(torch.from_numpy(chunk).to(self.device), self.prep.hu_window),
                          self.prep.image_size)
        shift = max(1, self.prep.image_size // 16)
        with self._autocast():
            out = self.net(x[:, None], heads=HEADS)  # one backbone pass serves every head
            shifted = self.net(torch.roll(x, (shift, shift), dims=(-2, -1))[:, None], heads=(self.head,))
        scores, labels = self._labels(out, self.head, height, width)
        n = len(self.classes) + 1
        add = {key: torch.zeros(n, dtype=torch.float64, device=self.device)
               for key in ("entropy", "region", "wrong", "expected")}
        # Entropy of each organ's own probability, over the organ and the voxels unsure about it.
        organ = scores[:, 1:].float()
        entropy = binary_entropy(organ)
        region = (entropy > UNSURE_ENTROPY) | (labels[:, None] == torch.arange(1, n, device=labels.device)[:, None, None])
        add["entropy"][1:] = (entropy * region).sum(dim=(0, 2, 3)).double()
        add["region"][1:] = region.sum(dim=(0, 2, 3)).double()
        add["size"] = torch.bincount(labels.flatten(), minlength=n).double()
        # Expected wrong voxels under the model's own probabilities, and the organ's expected volume.
        inside = labels[:, None] == torch.arange(1, n, device=labels.device)[:, None, None]
        wrong = torch.where(inside, 1 - organ, torch.where(organ > POSSIBLE, organ, torch.zeros_like(organ)))
        add["wrong"][1:] = wrong.sum(dim=(0, 2, 3)).double()
        add["expected"][1:] = torch.where(organ > POSSIBLE, organ, torch.zeros_like(organ)).sum(dim=(0, 2, 3)).double()
        for head in self.other_heads:
            self._count(add, labels, self._labels(out, head, height, width)[1], head)
        back = torch.roll(shifted[self.head], (-shift, -shift), dims=(-2, -1))
        self._count(add, labels, self._labels({self.head: back}, self.head, height, width)[1], "shift")
        result = labels.to(torch.uint8).cpu().numpy()
        # Only now: a pass that ran out of memory above is redone by segment() and must not count twice.
        for key, value in add.items():
            self.sums[key] += value
        return result

    def uncertainties(self, value: int) -> dict:
        """{score: uncertainty in [0, 1]} of one organ (class value) of the last case segmented."""
        s = {k: v.cpu().numpy() for k, v in self.sums.items()}

        def disagreement(prefix):
            total = s["size"][value] + s[f"{prefix}_size"][value]
            return 0.0 if total == 0 else float(1.0 - 2.0 * s[f"{prefix}_both"][value] / total)

        return {
            "entropy": float(s["entropy"][value] / s["region"][value]) if s["region"][value] else 0.0,
            "heads": float(np.mean([disagreement(h) for h in self.other_heads])),
            "shift": disagreement("shift"),
            "error": float(min(1.0, s["wrong"][value] / s["expected"][value])) if s["expected"][value] else 1.0,
        }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_proposal_header(path: Path):
    """The LTUDA_Suggestion record of a proposal file, or None (not ours, unreadable, incomplete)."""
    import nrrd

    try:
        header = nrrd.read_header(str(path))
        return json.loads(header[HEADER_FIELD])
    except (OSError, KeyError, ValueError, TypeError, nrrd.NRRDError):
        return None


def _select_cases(manifest, case_ids):
    training = [c for c in manifest.cases if c.split != "test"]
    if not case_ids:
        return training
    known = {c.id: c for c in manifest.cases}
    unknown = [i for i in case_ids if i not in known]
    if unknown:
        raise LtudaError(f"--cases names case(s) not in the dataset: {', '.join(unknown)}", manifest.path,
                         f"Use ids from the manifest, e.g. {', '.join(c.id for c in training[:3])}.")
    return [known[i] for i in dict.fromkeys(case_ids)]


def _check_inputs(manifest, cases, out: Path):
    """Every selected case's volume is there, and no output would overwrite an input: else one message."""
    problems = []
    inputs = {Path(p).resolve() for c in manifest.cases for p in (c.image, c.label) if p is not None}
    for case in cases:
        if not Path(case.image).exists():
            problems.append(f"case '{case.id}': image {case.image} not found; restore it or correct its path in "
                            f"{manifest.path}")
        if (out / f"{case.id}.seg.nrrd").resolve() in inputs:
            problems.append(f"case '{case.id}': {out / (case.id + '.seg.nrrd')} is one of the dataset's own files; "
                            "choose another --out folder")
    if problems:
        raise ManifestProblems(problems)


def _missing_organs(case, model_classes):
    return [c for c in model_classes if c["name"] not in case.labeled]


def default_order(score: str) -> str:
    return "score" if score in ("volume", "random") else "balanced"


def rank_rows(rows, score: str, order: str = None) -> list:
    """Rows ranked 1..n: by score (highest first; ties: larger volume, then case and organ), or "balanced":
    every organ's best row first, then every organ's second, ... (within a tier by score)."""
    ordered = sorted(rows, key=lambda r: (-r["score"], -r["volume_ml"], r["case"], r["organ"]))
    if (order or default_order(score)) == "balanced":
        seen, tiers = {}, []
        for row in ordered:
            tiers.append(seen.get(row["organ"], 0))
            seen[row["organ"]] = tiers[-1] + 1
        ordered = [row for _, _, row in sorted(zip(tiers, range(len(ordered)), ordered), key=lambda t: t[:2])]
    return [{**row, "rank": i + 1} for i, row in enumerate(ordered)]


def _score_of(row, score, sha=""):
    if score == "volume":
        return row["volume_ml"]
    if score == "random":  # a fixed shuffle per model: the same order on every rerun
        digest = hashlib.sha256(f"{sha}/{row['case']}/{row['organ']}".encode()).digest()
        return int.from_bytes(digest[:6], "big") / 2.0 ** 48
    return row["uncertainties"][score]


def run_suggestion(model_dir, dataset, out_dir, case_ids=None, device="auto", score=None, order=None, head="auto",
                   batch_size=None, report=None, claim_timeout=DEFAULT_TIMEOUT_S, allow_outside_paths=False) -> dict:
    """Proposals and suggestions.json (see the module docstring); returns a summary like predict's."""
    report = report or SilentReporter()
    score = score or DEFAULT_SCORE
    if score not in SCORES:
        raise LtudaError(f"unknown score '{score}'", fix=f"Choose one of: {', '.join(SCORES)}.")
    order = order or default_order(score)
    if order not in ORDERS:
        raise LtudaError(f"unknown order '{order}'", fix=f"Choose one of: {', '.join(ORDERS)}.")
    manifest = load_manifest(dataset, allow_outside_paths=allow_outside_paths)
    out = Path(out_dir)
    predictor = ScoringPredictor(model_dir, head, device, batch_size, report=report)
    model_names = [c["name"] for c in predictor.classes]
    shared = [n for n in model_names if n in manifest.class_names]
    if not shared:
        raise LtudaError(f"segments {', '.join(model_names)}, none of the dataset's organs "
                         f"({', '.join(manifest.class_names)})", Path(model_dir),
                         f"Pass a model trained on this dataset ({manifest.path}).")
    unknown = [n for n in manifest.class_names if n not in model_names]
    if unknown:
        report.log(f"notice: the model does not segment {', '.join(unknown)}: no proposals for them")
    cases = _select_cases(manifest, case_ids)
    _check_inputs(manifest, cases, out)
    if out.exists() and not out.is_dir():
        raise LtudaError("must be a folder", out, "Choose a folder for --out.")
    out.mkdir(parents=True, exist_ok=True)
    sha = predictor.meta.get("weights_sha256") or _sha256(predictor.model_dir / predictor.meta.get("weights", "model.pt"))
    jobs = [(c, _missing_organs(c, predictor.classes)) for c in cases]
    jobs = [(c, organs) for c, organs in jobs if organs]  # a case that labels every organ gets no file
    report.log(f"model {predictor.model_dir} (head {predictor.head}) on {device_name(predictor.device)}: "
               f"{len(jobs)} of {len(cases)} case(s) lack organs")
    report.emit("start", command="suggest", cases=len(jobs), device=predictor.device.type,
                device_name=device_name(predictor.device), head=predictor.head, score=score)
    stop = _StopWatch(out)
    claims = ClaimBox(out, claim_timeout if claim_timeout is not None else DEFAULT_TIMEOUT_S, report)
    done, failed, seconds, outcomes = [], [], [], {}

    def current(target, organs):
        return _current_record(target, organs, sha) is not None

    def attempt(index, case, organs):
        target = out / f"{case.id}.seg.nrrd"
        if current(target, organs):
            report.emit("progress", fraction=(index + 1) / len(jobs), case=str(case.image), case_id=case.id,
                        stage="skipped (already done)")
            return "skipped"
        claim = claims.claim(case.id)
        if claim is None:
            report.emit("progress", fraction=(index + 1) / len(jobs), case=str(case.image), case_id=case.id,
                        stage="skipped (another worker is on it)")
            return "busy"
        try:
            if current(target, organs):  # finished by another worker while we claimed it
                return "skipped"
            started = time.time()

            def on_fraction(fraction):
                claim.heartbeat()
                stop.check()
                report.emit("progress", fraction=(index + 0.9 * fraction) / len(jobs), case=str(case.image),
                            case_id=case.id, stage="segmenting")

            try:
                _propose(predictor, case, organs, target, sha, on_fraction)
            except SuggestStopped:
                raise
            except LtudaError as exc:
                failed.append({"input": str(case.image), "case": case.id, "message": str(exc)})
                report.emit("case_failed", input=str(case.image), case_id=case.id, message=str(exc))
                return "failed"
            except (RuntimeError, MemoryError) as exc:
                message = f"{case.image}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                failed.append({"input": str(case.image), "case": case.id, "message": message})
                report.emit("case_failed", input=str(case.image), case_id=case.id, message=message)
                return "failed"
            seconds.append(time.time() - started)
            done.append(str(target))
            report.emit("case", index=index + 1, cases=len(jobs), input=str(case.image), case_id=case.id,
                        output=str(target), seconds=round(seconds[-1], 3))
            return "done"
        finally:
            claim.release()

    status = "completed"
    with stop:
        try:
            for index, (case, organs) in enumerate(jobs):
                stop.check()
                outcomes[index] = attempt(index, case, organs)
            for index in [i for i, o in outcomes.items() if o == "busy"]:  # a worker that died left them to us
                outcomes[index] = attempt(index, *jobs[index])
        except SuggestStopped:
            status = "cancelled"
            report.log(f"stopped: {len(done)} case(s) done; run the same command again to continue")
    claims.tidy()
    # Every training case's current proposal counts, also those made by earlier runs with other --cases.
    everything = {c.id: c for c in manifest.cases if c.split != "test"}
    everything.update({c.id: c for c in cases})
    rows = collect_rows(out, [(c, _missing_organs(c, predictor.classes)) for c in everything.values()], sha, score,
                        order)
    suggestions = write_suggestions(out, rows, predictor.model_dir, sha, manifest.path, score, order)
    summary = {"cases": len(jobs), "done": len(done),
               "skipped": sum(o == "skipped" for o in outcomes.values()),
               "busy": sum(o == "busy" for o in outcomes.values()), "failed": failed, "outputs": done,
               "seconds_per_case": round(float(np.mean(seconds)), 3) if seconds else None,
               "suggestions": str(suggestions), "rows": len(rows)}
    report.emit("done", status=status, **summary)
    summary["status"] = status
    return summary


def _propose(predictor, case, organs, target: Path, sha: str, on_fraction):
    from .io.segnrrd import write_seg_nrrd

    image = read_image(case.image)
    check_image_values(sitk.GetArrayViewFromImage(image), case.image)
    predictor.start_case()
    labels = predictor.segment(image, postprocess=True, on_fraction=on_fraction)
    wanted = [o["value"] for o in organs]
    labels = np.where(np.isin(labels, wanted), labels, 0).astype(np.uint8)  # only the missing organs
    voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
    rows = []
    for organ in organs:
        volume = float(np.count_nonzero(labels == organ["value"])) * voxel_ml
        values = predictor.uncertainties(organ["value"]) if volume > 0 else {k: 1.0 for k in COMPUTED}
        rows.append({"case": case.id, "organ": organ["name"], "label_value": int(organ["value"]),
                     "volume_ml": round(volume, 3), "uncertainties": {k: round(v, 6) for k, v in values.items()},
                     "segmentation": target.name})
    record = {"model_sha256": sha, "rows": rows}
    write_seg_nrrd(target, labels, image, organs, tags={STATUS_TAG: PROPOSED},
                   fields={HEADER_FIELD: json.dumps(record, separators=(",", ":"))})


def _current_record(target: Path, organs, sha: str):
    """The file's record when it is current: this model's weights, exactly these organs, every score."""
    record = read_proposal_header(target) if target.is_file() else None
    if record is None or record.get("model_sha256") != sha:
        return None
    rows = record.get("rows", [])
    if [r.get("organ") for r in rows] != [o["name"] for o in organs]:
        return None
    wanted = COMPUTED
    if not all(isinstance(r.get("uncertainties"), dict) and all(k in r["uncertainties"] for k in wanted) for r in rows):
        return None  # written by an older version without some score: redo it
    return record


def collect_rows(out: Path, jobs, sha: str, score: str, order: str = None) -> list:
    """The rows of every case whose proposal file is current (this run's or an earlier one's), ranked."""
    rows = []
    for case, organs in jobs:
        record = _current_record(out / f"{case.id}.seg.nrrd", organs, sha)
        if record is None:
            continue
        for row in record["rows"]:
            value = _score_of(row, score, sha)
            rows.append({"case": row["case"], "organ": row["organ"], "label_value": row["label_value"],
                         "volume_ml": row["volume_ml"],
                         "uncertainty": row["uncertainties"][score if score in COMPUTED else "entropy"],
                         "score": value, "uncertainties": row["uncertainties"], "segmentation": row["segmentation"]})
    return rank_rows(rows, score, order)


def write_suggestions(out: Path, rows, model_dir, sha, dataset, score, order) -> Path:
    from .model.store import atomic_write_json

    ordered = [{"rank": r["rank"], "case": r["case"], "organ": r["organ"], "label_value": r["label_value"],
                "volume_ml": r["volume_ml"], "uncertainty": r["uncertainty"], "score": r["score"],
                "segmentation": r["segmentation"], "uncertainties": r["uncertainties"]} for r in rows]
    doc = {"schema": SCHEMA, "model": str(Path(model_dir).absolute()), "model_sha256": sha,
           "dataset": str(Path(dataset).absolute()), "score": score, "order": order, "rows": ordered}
    path = out / SUGGESTIONS
    atomic_write_json(doc, path, "suggestion list")
    return path


class _StopWatch:
    """SIGTERM/SIGINT or OUT/STOP ask for a stop; `check()` raises SuggestStopped between slice batches."""

    def __init__(self, folder: Path):
        self.folder, self.requested, self.previous = folder, False, {}

    def __enter__(self):
        stop_file = self.folder / STOP_NAME
        with contextlib.suppress(OSError):
            stop_file.unlink()  # left over from an earlier stop request
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: no signal handlers
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False

    def _handle(self, signum, frame):
        self.requested = True

    def check(self):
        if not self.requested and os.path.exists(self.folder / STOP_NAME):
            self.requested = True
            with contextlib.suppress(OSError):
                (self.folder / STOP_NAME).unlink()
        if self.requested:
            raise SuggestStopped()
