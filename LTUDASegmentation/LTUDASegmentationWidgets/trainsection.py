"""Train section: model folder, preset and epochs, Start/Cancel, progress, log and the loss plot; also
"Continue training" of the annotation loop (fine-tune the selected model into a new folder)."""

import logging
import os

import slicer

from LTUDASegmentationLib import jobs as ltudaJobs
from LTUDASegmentationLib.gpus import choiceFromSpinBox, spinBoxValue

from .panel import Section, _, errorBox


class TrainSection(Section):
    def __init__(self, panel, setupSection, onModelsChanged=None):
        """setupSection: checks the backend before a training starts; onModelsChanged(select=folder):
        called when a training ended (the Segment section lists the new model)."""
        Section.__init__(self, panel)
        self.setupSection = setupSection
        self.onModelsChanged = onModelsChanged or (lambda select=None: None)
        self._plotShown = False
        self._startingTraining = False

    def setup(self):
        ui = self.ui
        for widget in (ui.trainingProgressBar, ui.trainingLogTextEdit):
            widget.hide()
        ui.trainingLogTextEdit.setMaximumBlockCount(2000)
        ui.startTrainingButton.clicked.connect(self.onStartTraining)
        ui.cancelTrainingButton.clicked.connect(self.onCancelTraining)
        ui.showPlotButton.clicked.connect(self.onShowPlot)
        ui.continueTrainingButton.clicked.connect(self.onContinueTraining)
        ui.modelFolderPathLineEdit.currentPath = self.logic.defaultModelFolder()
        # GPUs: a per-computer preference kept in the application settings (0 on the spin box is "all")
        ui.gpusSpinBox.value = spinBoxValue(self.logic.trainGpus())
        ui.gpusSpinBox.valueChanged.connect(self.onGpusChanged)

    def onGpusChanged(self, value):
        self.logic.setTrainGpus(choiceFromSpinBox(value))  # the spin box's range holds only valid choices

    def onStartTraining(self):
        if self._startingTraining:
            return
        folder = self.ui.modelFolderPathLineEdit.currentPath or self.logic.defaultModelFolder()
        resume = False
        if os.path.isfile(os.path.join(folder, "checkpoints", "last.pt")):
            resume = self.panel.confirm(
                _("{folder} holds a stopped training. Resume it?\n(No: nothing is started; choose another model "
                  "folder for a new training.)").format(folder=folder), yesNo=True)
            if not resume:
                return
        self.setupSection.withReadyBackend(lambda: self._startTraining(folder, resume), self.ui.trainingStatusLabel)

    def onContinueTraining(self):
        """Fine-tune the model selected in the Segment section on the current labels, into a new folder."""
        if self._startingTraining:
            return
        parent = None
        with self.panel.guard(self.ui.trainingStatusLabel):
            parent = self.logic.resolveModel(self.ui.modelComboBox.currentData or None)
        if parent is None:
            return
        folder = self.logic.defaultModelFolder()
        self.setupSection.withReadyBackend(lambda: self._startTraining(folder, False, initFrom=parent.path),
                                           self.ui.trainingStatusLabel)

    def _startTraining(self, folder, resume, initFrom=None):
        if self._startingTraining:
            return
        # Disabled before anything processes events, so a double click cannot start a second export.
        self._startingTraining = True
        self.ui.startTrainingButton.enabled = False
        try:
            self._exportAndTrain(folder, resume, initFrom)
        finally:
            self._startingTraining = False
        job = self.logic.trainingJob
        if job is None or job.finished:
            self.ui.trainingProgressBar.hide()
        self.panel.updateButtonStates()

    def _exportAndTrain(self, folder, resume, initFrom=None):
        p = self.parameterNode
        with self.panel.guard(self.ui.trainingStatusLabel):
            probe = self.logic.lastProbe
            if p.preset == "paper" and probe is not None and not probe.gpu and p.device != "cuda":
                if not self.panel.confirm(
                        _("The 'paper' preset is meant for a GPU; on this CPU it can take days. Use it anyway?")):
                    return
            self.ui.trainingLogTextEdit.clear()
            self.ui.trainingLogTextEdit.show()
            self.ui.trainingProgressBar.show()
            self.ui.trainingProgressBar.setValue(0)
            self.ui.trainingProgressBar.setFormat(_("Exporting cases..."))
            self.panel.showStatus(self.ui.trainingStatusLabel, _("Exporting cases..."))
            slicer.app.processEvents()
            self._plotShown = False
            self.logic.train(folder, preset=p.preset, epochsStage1=p.epochsStage1 or None,
                             epochsStage2=p.epochsStage2 or None, device=p.device,
                             ignoreUnmatched=p.ignoreUnmatched, keepWorkFiles=p.keepWorkFiles, resume=resume,
                             initFrom=initFrom, gpus=self.logic.trainGpus(),
                             waitForCompletion=False, onUpdate=self.onTrainingUpdate, onLog=self.onTrainingLog,
                             onFinished=self.onTrainingFinished)

    def onTrainingUpdate(self, job):
        progress = job.progress
        fraction = job.fraction()
        bar = self.ui.trainingProgressBar
        if fraction is None:
            bar.setRange(0, 0)
        else:
            bar.setRange(0, 1000)
            bar.setValue(int(1000 * fraction))
        if job.status == ltudaJobs.EXPORTING:
            stage = _("Exporting cases")
        else:
            stage = f"Stage {progress.stage}" if progress.stage is not None else job.status
        bar.setFormat(f"{stage}: %p%")
        self.panel.showStatus(self.ui.trainingStatusLabel, job.statusText())
        if progress.lossHistory:
            chart = self.logic.updateTrainingPlot(progress)
            if not self._plotShown:
                self._plotShown = True
                self.showChart(chart)
        self.panel.updateButtonStates()

    def onTrainingLog(self, job, line):
        self.ui.trainingLogTextEdit.appendPlainText(line)

    def onTrainingFinished(self, job):
        self.ui.trainingProgressBar.hide()
        self.panel.showStatus(self.ui.trainingStatusLabel, job.message, error=job.status == ltudaJobs.FAILED)
        if job.status == ltudaJobs.FAILED:
            errorBox(job.message, job.details)
        elif job.status == ltudaJobs.COMPLETED:
            self.ui.modelFolderPathLineEdit.currentPath = self.logic.defaultModelFolder()
        self.onModelsChanged(select=job.modelDir)
        self.panel.updateButtonStates()

    def onCancelTraining(self):
        self.logic.cancelTraining()
        self.panel.updateButtonStates()

    def onShowPlot(self):
        job = self.logic.trainingJob
        if job is not None:
            self.showChart(self.logic.updateTrainingPlot(job.progress))

    @staticmethod
    def showChart(chartNode):
        try:
            slicer.modules.plots.logic().ShowChartInLayout(chartNode)
        except Exception as exc:  # no plot view in this layout/application
            logging.warning(f"Could not show the training plot: {exc}")

    def updateButtonStates(self):
        ui = self.ui
        p = self.parameterNode
        training = self._startingTraining or (self.logic.trainingJob is not None and
                                              not self.logic.trainingJob.finished)
        problems = [] if training else self.logic.checkCanTrain(ignoreUnmatched=bool(p and p.ignoreUnmatched))
        ui.startTrainingButton.enabled = not training and not problems
        ui.startTrainingButton.toolTip = ("\n".join(problems) if problems else
                                          _("Export the cases and train a model in a separate process."))
        hasModel = bool(ui.modelComboBox.currentData)
        ui.continueTrainingButton.enabled = not training and not problems and hasModel
        ui.continueTrainingButton.toolTip = (
            "\n".join(problems) if problems else
            _("Train a model first (or add one in the Segment section).") if not hasModel else
            _("Fine-tune the model selected in the Segment section on the current labels (reviewed proposals "
              "included) into a new model folder; progress is shown in the Train section."))
        ui.cancelTrainingButton.enabled = (training and self.logic.trainingJob is not None and
                                           self.logic.trainingJob.status in (ltudaJobs.EXPORTING, ltudaJobs.RUNNING))
