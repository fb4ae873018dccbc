"""Setup section: which Python runs the backend, the work folder, checking and installing packages."""

import html
import time

import qt

import slicer

from LTUDASegmentationLib.errors import LTUDAError

from .panel import Section, _


class SetupSection(Section):
    def __init__(self, panel, minimumSlicerVersion, requirementsPath):
        Section.__init__(self, panel)
        self.minimumSlicerVersion = minimumSlicerVersion
        self.requirementsPath = requirementsPath
        self._probeRunner = None
        self._probeTimer = None
        self._probeThen = None

    def setup(self):
        ui = self.ui
        ui.slicerPythonRadioButton.toggled.connect(self.onBackendChoiceChanged)
        # currentPathChanged comes on every keystroke: a typed path is checked when editing finishes
        ui.externalPythonPathLineEdit.currentPathChanged.connect(self.onExternalPythonPathChanged)
        self._externalPythonTextEdit().editingFinished.connect(self.onBackendChoiceChanged)
        ui.workFolderPathLineEdit.currentPathChanged.connect(self.onWorkFolderChanged)
        ui.checkBackendButton.clicked.connect(self.onCheckBackend)
        ui.installButton.clicked.connect(self.onInstall)
        self.loadSettingsToGui()

    def cleanup(self):
        self._stopProbe()

    def loadSettingsToGui(self):
        python = self.logic.backendPython()
        wasBlocked = [w.blockSignals(True) for w in (self.ui.slicerPythonRadioButton, self.ui.externalPythonRadioButton,
                                                       self.ui.externalPythonPathLineEdit, self.ui.workFolderPathLineEdit)]
        self.ui.externalPythonRadioButton.checked = bool(python)
        self.ui.slicerPythonRadioButton.checked = not python
        self.ui.externalPythonPathLineEdit.currentPath = python or ""
        self.ui.externalPythonPathLineEdit.enabled = bool(python)
        self.ui.workFolderPathLineEdit.currentPath = self.logic.workFolder()
        for w, blocked in zip((self.ui.slicerPythonRadioButton, self.ui.externalPythonRadioButton,
                               self.ui.externalPythonPathLineEdit, self.ui.workFolderPathLineEdit), wasBlocked):
            w.blockSignals(blocked)

    def _externalPythonTextEdit(self):
        return self.ui.externalPythonPathLineEdit.comboBox().lineEdit()

    def onExternalPythonPathChanged(self, path):
        """A path browsed to or picked from the history is checked at once; one being typed (the
        field has the focus) when editing finishes (Enter or leaving the field)."""
        if self._externalPythonTextEdit().hasFocus():
            return
        self.onBackendChoiceChanged()

    def onBackendChoiceChanged(self, *args):
        """Use Slicer's Python or the external one; a problem with the path is shown under the field."""
        panel = self.panel
        external = self.ui.externalPythonRadioButton.checked
        self.ui.externalPythonPathLineEdit.enabled = external
        path = self.ui.externalPythonPathLineEdit.currentPath if external else ""
        if external and not path:
            panel.showStatus(self.ui.externalPythonStatusLabel, _("Choose the python executable of the environment."))
            return
        if (path or None) == self.logic.backendPython():
            panel.showStatus(self.ui.externalPythonStatusLabel, "")
            return  # nothing changed (editing finished twice, or the same file browsed to again)
        try:
            self.logic.setBackendPython(path or None)
        except LTUDAError as exc:
            panel.showStatus(self.ui.externalPythonStatusLabel, str(exc), error=True)
            panel.updateButtonStates()
            return
        panel.showStatus(self.ui.externalPythonStatusLabel, "")
        panel.showStatus(self.ui.backendStatusLabel, _("Not checked yet: click Check."))
        panel.updateButtonStates()

    def onWorkFolderChanged(self, path):
        self.logic.setWorkFolder(path)

    # -- the backend check, used by Train and Segment before they start --------------------------------
    def withReadyBackend(self, action, statusLabel):
        """Run action() once the backend Python is known to have what it needs; checks it first,
        without blocking the GUI, when it was not checked yet."""
        probe = self.logic.lastProbe
        if probe is not None and probe.backend is not None and probe.backend.python == self.logic.backendPython():
            if probe.ready():
                action()
            else:
                self.panel.showError(probe.missingMessage(), "", statusLabel)
            return
        self.panel.showStatus(statusLabel, _("Checking the backend Python first..."))
        self.onCheckBackend(then=(action, statusLabel))

    def onCheckBackend(self, *args, then=None):
        """Run the probe in the backend Python without blocking the GUI (a torch import can take a while);
        `then` = (action, status label): run the action afterwards if the backend is ready."""
        if self._probeRunner is not None:
            if then is not None:
                self._probeThen = then
            return
        self._probeThen = then
        from LTUDASegmentationLib.runner import ProcessRunner

        with self.panel.guard(self.ui.backendStatusLabel, waitCursor=False):
            backend = self.logic.backend()
            self._probeBackend = backend
            self._probeRunner = ProcessRunner(backend.probeCommand(), env=backend.environment()).start()
            self._probeOutput = {"stdout": [], "stderr": []}
            self._probeStarted = time.time()
            self.panel.showStatus(self.ui.backendStatusLabel,
                                  _("Checking {backend}...").format(backend=backend.describe()))
            self.ui.checkBackendButton.enabled = False
            self._probeTimer = qt.QTimer()
            self._probeTimer.setInterval(200)
            self._probeTimer.timeout.connect(self._onProbeTick)
            self._probeTimer.start()

    def _stopProbe(self):
        if self._probeTimer is not None:
            self._probeTimer.stop()
            self._probeTimer = None
        if self._probeRunner is not None:
            self._probeRunner.kill()
            self._probeRunner = None
        self._probeThen = None

    def _onProbeTick(self):
        from LTUDASegmentationLib.backend import parseProbeOutput
        from LTUDASegmentationLib.runner import EXIT

        runner = self._probeRunner
        for kind, value in runner.poll():
            if kind == EXIT:
                self._probeTimer.stop()
                self._probeRunner = None
                self.ui.checkBackendButton.enabled = True
                then, self._probeThen = self._probeThen, None
                try:
                    result = parseProbeOutput(value, "\n".join(self._probeOutput["stdout"]),
                                              "\n".join(self._probeOutput["stderr"]), self._probeBackend)
                except LTUDAError as exc:
                    self.panel.showStatus(self.ui.backendStatusLabel, str(exc), error=True)
                    if then is not None:
                        self.panel.showError(str(exc), "", then[1])
                    self.panel.updateButtonStates()
                    return
                self.logic.lastProbe = result
                self.showProbe(result)
                if then is not None:
                    action, label = then
                    if result.ready():
                        action()
                    else:
                        self.panel.showError(result.missingMessage(), "", label)
                return
            self._probeOutput[kind].append(value)
        if time.time() - self._probeStarted > 600:
            runner.kill()

    def showProbe(self, result):
        rows = []
        for text, ok in result.lines():
            mark = "&#10004;" if ok else "&#10008;"
            color = "#1b7f3b" if ok else "#b00020"
            rows.append(f"<span style='color:{color}'>{mark}</span> {html.escape(text)}")
        if result.missing():
            rows.append(f"<b>{html.escape(result.missingMessage())}</b>")
        self.ui.backendStatusLabel.text = "<br>".join(rows)
        self.ui.backendStatusLabel.setStyleSheet("")
        self.panel.updateButtonStates()

    # -- installing into Slicer's Python ---------------------------------------------------------------
    def onInstall(self):
        """Install what Slicer's Python lacks: torch via the PyTorch extension, the rest with pip."""
        probe = self.logic.lastProbe
        if probe is None or self.logic.backendPython():
            return
        missing = probe.missing()
        with self.panel.guard(self.ui.backendStatusLabel):
            installTorch = "torch" in missing
            others = [m for m in missing if m not in ("torch", "ltuda", "SimpleITK", "numpy")]
            if "SimpleITK" in missing or "numpy" in missing:
                raise LTUDAError(_("Slicer's own SimpleITK or numpy is missing or too old; LTUDA never replaces them. "
                                   "Install a current Slicer ({major}.{minor} or later).").format(
                                       major=self.minimumSlicerVersion[0], minor=self.minimumSlicerVersion[1]))
            if installTorch:
                try:
                    import PyTorchUtils
                except ImportError:
                    raise LTUDAError(_("torch is installed through the PyTorch extension, which is missing: install "
                                       "'PyTorch' from the Extensions Manager, restart Slicer and click Install "
                                       "again.")) from None
                if not self.panel.confirm(
                        _("PyTorch (about 1-3 GB) will be downloaded and installed into Slicer's Python by the "
                          "PyTorch extension; it picks the CUDA build that matches your GPU driver. This can take "
                          "several minutes without visible progress. Continue?")):
                    self.showDeclined(["torch"])
                    return
                torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
                    askConfirmation=False, torchVersionRequirement=">=" + "2.0")
                if torch is None:
                    self.showDeclined(["torch"])
                    return
            if others and not self._pipInstall(others):
                self.showDeclined(others)
                return
            self.panel.showStatus(self.ui.backendStatusLabel, _("Installed. Checking again..."))
        self.onCheckBackend()

    def showDeclined(self, names):
        """Say what the user declined to install and what still works (in the panel, no message box)."""
        self.panel.showStatus(self.ui.backendStatusLabel, _(
            "You declined installing {packages} into Slicer's Python: nothing was installed. Training and "
            "segmentation need it; organs, training cases and 'Add missing labels' still work. Click Install again "
            "when you are ready, or choose an external Python that has these packages (Backend Python above)."
        ).format(packages=", ".join(names)), error=True)

    def _pipInstall(self, names):
        """Install the pip packages among `names`; False when the user declined."""
        requirements = self.requirementsPath
        if hasattr(slicer, "packaging"):
            # Slicer 5.12+: checks, asks, shows progress, offers a restart; never touches torch/numpy/SimpleITK.
            try:
                with self.panel.noWaitCursor():
                    slicer.packaging.pip_ensure(slicer.packaging.load_requirements(requirements),
                                                skip_packages=["torch", "numpy", "SimpleITK"], requester="LTUDA")
            except RuntimeError as exc:
                if "declined" in str(exc).lower():
                    return False
                raise
            return True
        specs = {"monai": "monai>=1.3", "pynrrd": "pynrrd>=1.0"}
        wanted = [specs[n] for n in names if n in specs]
        if not wanted:
            return True
        if not self.panel.confirm(_("These Python packages will be downloaded and installed into Slicer's Python: "
                                    "{packages}. Continue?").format(packages=", ".join(wanted))):
            return False
        for spec in wanted:
            # MONAI only needs torch and numpy, which are present: --no-deps keeps Slicer's numpy untouched.
            slicer.util.pip_install(("--no-deps " if spec.startswith("monai") else "") + spec)
        return True

    def updateButtonStates(self):
        ui = self.ui
        external = bool(self.logic.backendPython())
        probe = self.logic.lastProbe
        ui.installButton.enabled = (not external and probe is not None and bool(probe.missing())
                                    and self._probeRunner is None)
        ui.installButton.toolTip = (_("Only Slicer's Python can be set up from here; install packages into the "
                                      "external environment yourself.") if external else
                                    _("Install torch (PyTorch extension), MONAI and pynrrd into Slicer's Python. "
                                      "Asks before downloading."))
