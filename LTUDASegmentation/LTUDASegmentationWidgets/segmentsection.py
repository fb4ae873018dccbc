"""Segment section: pick a model and a volume, segment it into a new segmentation."""

import qt

import slicer

from LTUDASegmentationLib import jobs as ltudaJobs
from LTUDASegmentationLib.errors import LTUDAError

from .panel import Section, _, errorBox


class SegmentSection(Section):
    def __init__(self, panel, setupSection):
        """setupSection: checks the backend before a segmentation starts."""
        Section.__init__(self, panel)
        self.setupSection = setupSection
        self._startingSegment = False

    def setup(self):
        ui = self.ui
        ui.segmentProgressBar.hide()
        ui.modelComboBox.currentIndexChanged.connect(self.onModelChanged)
        ui.addModelButton.clicked.connect(self.onAddModel)
        ui.applyButton.clicked.connect(self.onApply)
        ui.cancelSegmentButton.clicked.connect(self.onCancelSegment)

    def refreshModels(self, select=None):
        combo = self.ui.modelComboBox
        current = select or combo.currentData
        combo.blockSignals(True)
        combo.clear()
        for info in self.logic.models():
            combo.addItem(info.title(), info.path)
        index = combo.findData(current) if current else 0
        combo.setCurrentIndex(index if index >= 0 else 0)
        combo.blockSignals(False)
        self.onModelChanged()

    def onModelChanged(self, *args):
        path = self.ui.modelComboBox.currentData
        text = ""
        if path:
            try:
                from LTUDASegmentationLib.models import readModel

                text = readModel(path).summary()
            except LTUDAError as exc:
                text = str(exc)
        self.ui.modelInfoLabel.text = text
        self.panel.updateButtonStates()

    def onAddModel(self):
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Choose an LTUDA model folder"),
                                                     self.logic.modelsFolder())
        if not folder:
            return
        with self.panel.guard(self.ui.segmentStatusLabel):
            info = self.logic.addModel(folder)
            self.refreshModels(select=info.path)

    def onApply(self):
        if self._startingSegment:
            return
        self.setupSection.withReadyBackend(self._startSegmenting, self.ui.segmentStatusLabel)

    def _startSegmenting(self):
        if self._startingSegment:
            return
        self._startingSegment = True
        self.ui.applyButton.enabled = False  # before processEvents: a double click starts one segmentation
        try:
            self._exportAndSegment()
        finally:
            self._startingSegment = False
        job = self.logic.predictionJob
        if job is None or job.finished:
            self.ui.segmentProgressBar.hide()
        self.panel.updateButtonStates()

    def _exportAndSegment(self):
        p = self.parameterNode
        with self.panel.guard(self.ui.segmentStatusLabel):
            self.ui.segmentProgressBar.show()
            self.ui.segmentProgressBar.setValue(0)
            self.panel.showStatus(self.ui.segmentStatusLabel, _("Starting..."))
            slicer.app.processEvents()
            self.logic.predict(p.inputVolume, self.ui.modelComboBox.currentData, head=p.head,
                               postprocess=p.postprocess, device=p.segmentDevice, waitForCompletion=False,
                               onUpdate=self.onSegmentUpdate, onFinished=self.onSegmentFinished)

    def onSegmentUpdate(self, job):
        fraction = job.fraction()
        bar = self.ui.segmentProgressBar
        if fraction is None:
            bar.setRange(0, 0)
        else:
            bar.setRange(0, 1000)
            bar.setValue(int(1000 * fraction))
        self.panel.showStatus(self.ui.segmentStatusLabel, job.statusText())
        self.panel.updateButtonStates()

    def onSegmentFinished(self, job):
        self.ui.segmentProgressBar.hide()
        self.panel.showStatus(self.ui.segmentStatusLabel, job.message, error=job.status == ltudaJobs.FAILED)
        if job.status == ltudaJobs.FAILED:
            errorBox(job.message, job.details)
        node = job.segmentationNode
        if node is not None:
            self.ui.resultLabel.text = _("Result: {name}").format(name=node.GetName())
            self.ui.outputShow3DButton.setSegmentationNode(node)
            self.ui.outputShow3DButton.enabled = True
            slicer.util.setSliceViewerLayers(background=job.volumeNode)
        self.panel.updateButtonStates()

    def onCancelSegment(self):
        self.logic.cancelPrediction()
        self.panel.updateButtonStates()

    def updateButtonStates(self):
        ui = self.ui
        p = self.parameterNode
        predicting = self._startingSegment or (self.logic.predictionJob is not None and
                                               not self.logic.predictionJob.finished)
        missing = []
        if p is None or p.inputVolume is None:
            missing.append(_("Choose the input volume."))
        if not ui.modelComboBox.currentData:
            missing.append(_("Train a model or add a model folder."))
        ui.applyButton.enabled = not predicting and not missing
        ui.applyButton.toolTip = "\n".join(missing) if missing else _("Segment the volume into a new segmentation.")
        ui.cancelSegmentButton.enabled = (predicting and self.logic.predictionJob is not None and
                                          self.logic.predictionJob.status == ltudaJobs.RUNNING)
