"""What the sections of the panel share: the .ui widgets, the logic, the parameter node, and one way
to show errors, statuses, confirmations and the wait cursor."""

import contextlib
import logging
import traceback

import qt

import slicer

from LTUDASegmentationLib.errors import LTUDAError

try:
    from slicer.i18n import tr as _
except ImportError:  # very old Slicer: no translation support
    def _(text):
        return text


def errorBox(message, details=""):
    """Message box with the error, its details (log path, last log lines) one click away."""
    if details:
        slicer.util.errorDisplay(message, detailedText=details)
    else:
        slicer.util.errorDisplay(message)


class Panel:
    """Shared by every section. `updateButtonStates` is set by the module widget: it asks every
    section to update its buttons (a change in one section can enable a button in another)."""

    def __init__(self, ui, logic):
        self.ui = ui
        self.logic = logic
        self.parameterNode = None
        self.entered = False
        self._waitCursors = 0  # wait cursors this panel has pushed and not restored yet
        self.updateButtonStates = lambda *args: None

    # -- messages -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def guard(self, statusLabel=None, waitCursor=True):
        """Show any error of the block in the panel (statusLabel) and in a message box."""
        if statusLabel is not None:
            self.showStatus(statusLabel, "")
        if waitCursor:
            self._pushWaitCursor()
        try:
            yield
        except LTUDAError as exc:
            if waitCursor:
                self._popWaitCursor()
                waitCursor = False
            self.showError(str(exc), exc.details, statusLabel)
        except Exception as exc:
            if waitCursor:
                self._popWaitCursor()
                waitCursor = False
            logging.error(traceback.format_exc())
            self.showError(_("Unexpected error: {error}").format(error=exc), traceback.format_exc(), statusLabel)
        finally:
            if waitCursor:
                self._popWaitCursor()

    def _pushWaitCursor(self):
        slicer.app.setOverrideCursor(qt.Qt.WaitCursor)
        self._waitCursors += 1

    def _popWaitCursor(self):
        if self._waitCursors > 0:
            slicer.app.restoreOverrideCursor()
            self._waitCursors -= 1

    @contextlib.contextmanager
    def noWaitCursor(self):
        """The normal cursor while a dialog asks the user something; the wait cursors come back after."""
        count = self._waitCursors
        for _i in range(count):
            self._popWaitCursor()
        try:
            yield
        finally:
            for _i in range(count):
                self._pushWaitCursor()

    def confirm(self, text, yesNo=False):
        with self.noWaitCursor():
            if yesNo:
                return slicer.util.confirmYesNoDisplay(text)
            return slicer.util.confirmOkCancelDisplay(text)

    def showError(self, message, details="", statusLabel=None):
        if statusLabel is not None:
            statusLabel.text = message
            statusLabel.setStyleSheet("color: #b00020")
        errorBox(message, details)

    @staticmethod
    def showStatus(label, text, error=False):
        label.text = text
        label.setStyleSheet("color: #b00020" if error else "")


class Section:
    """One collapsible section of the panel: connects its widgets in setup(), updates its buttons in
    updateButtonStates(), stops what it started in cleanup()."""

    def __init__(self, panel):
        self.panel = panel

    @property
    def ui(self):
        return self.panel.ui

    @property
    def logic(self):
        return self.panel.logic

    @property
    def parameterNode(self):
        return self.panel.parameterNode

    def setup(self):
        pass

    def updateButtonStates(self):
        pass

    def cleanup(self):
        pass
