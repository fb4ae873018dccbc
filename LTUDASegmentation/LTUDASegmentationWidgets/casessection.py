"""Training cases section: scene cases (volume + segmentation), folder import, the table of what each
case labels (labelled / reviewed proposal / unreviewed proposal / empty / missing per organ)."""

import html

import qt

import slicer
from slicer.util import VTKObservationMixin

from LTUDASegmentationLib.cases import EMPTY, LABELLED, PROPOSED, REVIEWED, summaryText
from LTUDASegmentationLib.errors import LTUDAError

from .panel import Section, _


class CasesSection(Section, VTKObservationMixin):
    def __init__(self, panel):
        Section.__init__(self, panel)
        VTKObservationMixin.__init__(self)
        self._observedSegmentations = []
        self._refreshTimer = None
        self.onRefreshed = lambda: None  # set by the module widget: the review list follows the table

    def setup(self):
        self._refreshTimer = qt.QTimer()
        self._refreshTimer.setSingleShot(True)
        self._refreshTimer.setInterval(300)
        self._refreshTimer.timeout.connect(self.refreshCases)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeRemovedEvent, self.onNodeRemoved)
        ui = self.ui
        ui.addCaseButton.clicked.connect(self.onAddCase)
        ui.removeCaseButton.clicked.connect(self.onRemoveCase)
        ui.addMissingLabelsButton.clicked.connect(self.onAddMissingLabels)
        ui.casesTableWidget.itemSelectionChanged.connect(self.panel.updateButtonStates)
        ui.importFolderButton.clicked.connect(self.onImportFolder)

    def cleanup(self):
        self.removeObservers()
        if self._refreshTimer is not None:
            self._refreshTimer.stop()

    def onNodeRemoved(self, caller, event):
        self._refreshTimer.start()

    def refreshCases(self):
        if self.logic is None:
            return
        rows = self.logic.caseTable()
        organs = [o["name"] for o in self.logic.organs]
        table = self.ui.casesTableWidget
        selected = table.currentRow()
        table.clear()
        table.setColumnCount(3 + len(organs))
        table.setHorizontalHeaderLabels([_("Case"), _("Volume"), _("Segmentation")] + organs)
        table.setRowCount(len(rows))
        symbols = {LABELLED: ("\u2714", "#c8eccf", _("labelled")),
                   REVIEWED: ("\u2714 " + _("reviewed"), "#c8eccf", _("model proposal, reviewed: a label")),
                   PROPOSED: (_("proposed"), "#d6e6fb", _("model proposal, not reviewed: not a label yet")),
                   EMPTY: (_("empty"), "#fbe3b4", _("segment is empty")),
                   "missing": ("\u2013", "#eeeeee", _("not labelled in this case"))}
        for r, row in enumerate(rows):
            tooltip = "\n".join(row["problems"] + ([_("Segments matching no organ: ") + ", ".join(row["unmatched"])]
                                                   if row["unmatched"] else []))
            for c, text in enumerate((row["name"], row["volume"], row["segmentation"])):
                item = qt.QTableWidgetItem(text)
                if tooltip:
                    item.setToolTip(tooltip)
                    item.setForeground(qt.QBrush(qt.QColor("#b00020")))
                table.setItem(r, c, item)
            for c, organ in enumerate(organs):
                symbol, color, tip = symbols.get(row["organs"].get(organ), symbols["missing"])
                item = qt.QTableWidgetItem(symbol)
                item.setTextAlignment(qt.Qt.AlignCenter)
                item.setBackground(qt.QBrush(qt.QColor(color)))
                item.setToolTip(f"{organ}: {tip}")
                table.setItem(r, 3 + c, item)
        table.resizeColumnsToContents()
        if 0 <= selected < len(rows):
            table.selectRow(selected)
        summary = self.logic.labelSummary()
        lines = [html.escape(summaryText(summary, self.logic.organs))] if rows else [_("No training cases yet.")]
        lines += [f"<span style='color:#b00020'>{html.escape(m)}</span>" for m in summary["errors"] if rows]
        lines += [f"<span style='color:#a05a00'>{html.escape(m)}</span>" for m in summary["warnings"]]
        self.ui.casesSummaryLabel.text = "<br>".join(lines)
        self.ui.casesSummaryLabel.setStyleSheet("")
        self._observeCaseSegmentations()
        self.onRefreshed()
        self.panel.updateButtonStates()

    def _observeCaseSegmentations(self):
        for node in self._observedSegmentations:
            for event in self._segmentEvents():
                self.removeObserver(node, event, self.onCaseSegmentationModified)
        self._observedSegmentations = [c.segmentationNode for c in self.logic.cases
                                       if c.isScene and c.segmentationNode is not None]
        for node in self._observedSegmentations:
            for event in self._segmentEvents():
                self.addObserver(node, event, self.onCaseSegmentationModified)

    @staticmethod
    def _segmentEvents():
        return (slicer.vtkSegmentation.SegmentAdded, slicer.vtkSegmentation.SegmentRemoved,
                slicer.vtkSegmentation.SegmentModified)

    def onCaseSegmentationModified(self, caller, event):
        if self.panel.entered:
            self._refreshTimer.start()

    def selectedCaseIndex(self):
        row = self.ui.casesTableWidget.currentRow()
        return row if 0 <= row < len(self.logic.cases) else None

    def onAddCase(self):
        with self.panel.guard(self.ui.casesStatusLabel):
            self.logic.addCase(self.parameterNode.caseVolume, self.parameterNode.caseSegmentation)
        self.refreshCases()

    def onRemoveCase(self):
        index = self.selectedCaseIndex()
        if index is not None:
            self.logic.removeCase(index)
            self.refreshCases()

    def onAddMissingLabels(self):
        index = self.selectedCaseIndex()
        if index is None:
            return
        with self.panel.guard(self.ui.casesStatusLabel):
            added = self.logic.addMissingSegments(index)
            case = self.logic.cases[index]
            self.refreshCases()
            self.openSegmentEditor(case, added[0] if added else None)

    @staticmethod
    def openSegmentEditor(case, segmentId=None):
        slicer.util.setSliceViewerLayers(background=case.volumeNode, fit=True)
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(case.segmentationNode)
        setSource = getattr(editor, "setSourceVolumeNode", None) or editor.setMasterVolumeNode
        setSource(case.volumeNode)
        if segmentId:
            editor.setCurrentSegmentID(segmentId)

    def onImportFolder(self):
        folder = self.ui.importFolderPathLineEdit.currentPath
        with self.panel.guard(self.ui.casesStatusLabel):
            if not folder:
                raise LTUDAError(_("Choose the folder to import."))
            added = self.logic.importCaseFolder(folder, self.ui.importValueMapLineEdit.text)
            slicer.util.showStatusMessage(_("Imported {count} case(s) from {folder}").format(count=len(added),
                                                                                            folder=folder), 5000)
        self.refreshCases()

    def updateButtonStates(self):
        ui = self.ui
        p = self.parameterNode
        hasCase = p is not None and p.caseVolume is not None and p.caseSegmentation is not None
        ui.addCaseButton.enabled = hasCase
        ui.addCaseButton.toolTip = _("Add the volume and segmentation above as a training case.") if hasCase else \
            _("Choose a volume and its segmentation first.")
        selected = self.selectedCaseIndex() is not None
        ui.removeCaseButton.enabled = selected
        ui.addMissingLabelsButton.enabled = selected
