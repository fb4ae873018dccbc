"""Annotation loop group of the Training cases section: Pre-fill missing organs (background `ltuda
suggest`, progress, Cancel), the ranked "Review next" list, Next and Mark reviewed. Thin: every
decision is in the logic (suggest, reviewRows, reviewNext, markReviewed). "Continue training" is
wired by the Train section, which shows the training's progress."""

import qt

from LTUDASegmentationLib import jobs as ltudaJobs
from LTUDASegmentationLib.errors import LTUDAError

from .panel import Section, _, errorBox

STATUS_LOOK = {  # review-list status -> (text, background)
    "proposed": (_("to review"), "#d6e6fb"),
    "reviewed": (_("reviewed"), "#c8eccf"),
    "labelled": (_("labelled by hand"), "#c8eccf"),
    "missing": (_("proposal deleted"), "#eeeeee"),
}


class AnnotationLoop(Section):
    def __init__(self, panel, setupSection, casesSection):
        """setupSection: checks the backend first; casesSection: the case table and the Segment Editor."""
        Section.__init__(self, panel)
        self.setupSection = setupSection
        self.casesSection = casesSection
        self.rows = []  # the review list as last shown
        self.current = None  # the row opened in the Segment Editor
        self._starting = False

    def setup(self):
        ui = self.ui
        ui.prefillProgressBar.hide()
        ui.prefillButton.clicked.connect(self.onPrefill)
        ui.cancelPrefillButton.clicked.connect(self.onCancelPrefill)
        ui.reviewTableWidget.cellClicked.connect(self.onReviewRowClicked)
        ui.reviewNextButton.clicked.connect(self.onReviewNext)
        ui.markReviewedButton.clicked.connect(self.onMarkReviewed)

    def cleanup(self):
        job = self.logic.suggestionJob if self.logic is not None else None
        if job is not None and not job.finished:
            job.kill()

    # -- pre-fill -------------------------------------------------------------------------------
    def onPrefill(self):
        if self._starting:
            return
        self.setupSection.withReadyBackend(self._startPrefill, self.ui.prefillStatusLabel)

    def _startPrefill(self):
        if self._starting:
            return
        self._starting = True
        self.ui.prefillButton.enabled = False  # a double click starts one pre-fill
        try:
            with self.panel.guard(self.ui.prefillStatusLabel):
                cases = None
                if self.parameterNode is not None and self.parameterNode.prefillSelectedOnly:
                    index = self.casesSection.selectedCaseIndex()
                    if index is None:
                        raise LTUDAError(_("Select the case to pre-fill in the table (or untick 'Selected case "
                                           "only')."))
                    cases = [index]
                self.ui.prefillProgressBar.show()
                self.ui.prefillProgressBar.setValue(0)
                self.logic.suggest(model=self.ui.modelComboBox.currentData or None, cases=cases,
                                   device=self.parameterNode.device if self.parameterNode is not None else "auto",
                                   onUpdate=self.onPrefillUpdate, onFinished=self.onPrefillFinished)
        finally:
            self._starting = False
        job = self.logic.suggestionJob
        if job is None or job.finished:
            self.ui.prefillProgressBar.hide()
        self.panel.updateButtonStates()

    def onPrefillUpdate(self, job):
        fraction = job.fraction()
        bar = self.ui.prefillProgressBar
        if fraction is None:
            bar.setRange(0, 0)
        else:
            bar.setRange(0, 1000)
            bar.setValue(int(1000 * fraction))
        self.panel.showStatus(self.ui.prefillStatusLabel, job.statusText())
        self.panel.updateButtonStates()

    def onPrefillFinished(self, job):
        self.ui.prefillProgressBar.hide()
        self.panel.showStatus(self.ui.prefillStatusLabel, job.message, error=job.status == ltudaJobs.FAILED)
        if job.status == ltudaJobs.FAILED:
            errorBox(job.message, job.details)
        self.casesSection.refreshCases()  # new segments: proposed organs in the table, and the review list
        self.panel.updateButtonStates()

    def onCancelPrefill(self):
        self.logic.cancelSuggestion()
        self.panel.updateButtonStates()

    # -- review ---------------------------------------------------------------------------------
    def refreshReviewList(self):
        """Show the logic's review list (called whenever the case table is refreshed)."""
        if self.logic is None:
            return
        self.rows = self.logic.reviewRows()
        table = self.ui.reviewTableWidget
        table.clear()
        headers = [_("#"), _("Case"), _("Organ"), _("Volume (ml)"), _("Score"), _("Status")]
        table.setColumnCount(len(headers))
        table.setHorizontalHeaderLabels(headers)
        table.setRowCount(len(self.rows))
        for r, row in enumerate(self.rows):
            text, colour = STATUS_LOOK.get(row["status"], (row["status"], "#ffffff"))
            cells = [str(row["rank"]), row["caseName"], row["organ"], _number(row.get("volume_ml")),
                     _number(row.get("score")), text]
            for c, value in enumerate(cells):
                item = qt.QTableWidgetItem(value)
                if c == len(cells) - 1:
                    item.setBackground(qt.QBrush(qt.QColor(colour)))
                table.setItem(r, c, item)
        table.resizeColumnsToContents()

    def onReviewRowClicked(self, row, column=0):
        if 0 <= row < len(self.rows):
            with self.panel.guard(self.ui.prefillStatusLabel):
                self.openRow(self.rows[row])

    def onReviewNext(self):
        with self.panel.guard(self.ui.prefillStatusLabel):
            row = self.logic.reviewNext()
            if row is None:
                self.panel.showStatus(self.ui.prefillStatusLabel, _("Nothing left to review."))
                return
            self.openRow(row)

    def openRow(self, row):
        """The row's case in the Segment Editor with its segment selected."""
        if row.get("caseIndex") is None:
            raise LTUDAError(_("The case '{case}' is no longer a training case.").format(case=row["caseName"]))
        case = self.logic.cases[row["caseIndex"]]
        self.current = row
        index = next((i for i, r in enumerate(self.rows) if r["rank"] == row["rank"]), -1)
        if index >= 0:
            self.ui.reviewTableWidget.selectRow(index)
        self.casesSection.openSegmentEditor(case, row.get("segmentId"))
        self.panel.showStatus(self.ui.prefillStatusLabel, _(
            "Reviewing '{organ}' in '{case}': correct it in the Segment Editor, then come back here and press "
            "Mark reviewed.").format(organ=row["organ"], case=row["caseName"]))
        self.panel.updateButtonStates()

    def onMarkReviewed(self):
        row = self.current
        selected = self.ui.reviewTableWidget.currentRow()
        if 0 <= selected < len(self.rows):
            row = self.rows[selected]
        if row is None:
            return
        with self.panel.guard(self.ui.prefillStatusLabel):
            self.logic.markReviewed(row["case"], row["organ"])
            self.current = None
            self.panel.showStatus(self.ui.prefillStatusLabel, _("'{organ}' in '{case}' is now a label.").format(
                organ=row["organ"], case=row["caseName"]))
        self.casesSection.refreshCases()

    def updateButtonStates(self):
        ui = self.ui
        job = self.logic.suggestionJob
        running = self._starting or (job is not None and not job.finished)
        hasModel = bool(ui.modelComboBox.currentData)
        ui.prefillButton.enabled = not running and bool(self.logic.cases) and hasModel
        ui.prefillButton.toolTip = (_("Train a model first (or add one in the Segment section).") if not hasModel else
                                    _("Add training cases first.") if not self.logic.cases else
                                    _("Run the model selected in the Segment section on the training cases and add "
                                      "its proposals for the organs each case lacks."))
        ui.cancelPrefillButton.enabled = running and job is not None and job.status in (ltudaJobs.EXPORTING,
                                                                                         ltudaJobs.RUNNING)
        ui.reviewNextButton.enabled = any(r["status"] == "proposed" for r in self.rows)
        ui.markReviewedButton.enabled = self.current is not None or 0 <= ui.reviewTableWidget.currentRow() < len(
            self.rows)


def _number(value):
    return f"{value:.3g}" if isinstance(value, (int, float)) else ""
