"""Organs section: the organs to learn (name, colour, terminology)."""

import qt

import slicer

from LTUDASegmentationLib.organs import knownOrganNames

from .panel import Section, _


class OrgansSection(Section):
    def __init__(self, panel, onChanged=None):
        """onChanged(): called after the organ list was shown again (the cases table has a column per organ)."""
        Section.__init__(self, panel)
        self.onChanged = onChanged or (lambda: None)
        self._updatingOrgans = False

    def setup(self):
        ui = self.ui
        ui.addOrganComboBox.addItems(knownOrganNames())
        ui.addOrganComboBox.setCurrentText("")
        table = ui.organsTableWidget
        table.setColumnCount(3)
        table.setHorizontalHeaderLabels([_("Organ"), _("Colour"), _("Terminology")])
        table.horizontalHeader().setStretchLastSection(True)
        table.verticalHeader().hide()
        ui.organsTableWidget.itemChanged.connect(self.onOrganItemChanged)
        ui.organsTableWidget.cellDoubleClicked.connect(self.onOrganCellDoubleClicked)
        ui.addOrganButton.clicked.connect(self.onAddOrgan)
        ui.removeOrganButton.clicked.connect(self.onRemoveOrgan)
        ui.resetOrgansButton.clicked.connect(self.onResetOrgans)

    def refreshOrgans(self):
        table = self.ui.organsTableWidget
        self._updatingOrgans = True
        try:
            table.setRowCount(len(self.logic.organs))
            for row, organ in enumerate(self.logic.organs):
                nameItem = qt.QTableWidgetItem(organ["name"])
                colorItem = qt.QTableWidgetItem("")
                colorItem.setBackground(qt.QBrush(qt.QColor(*organ["color"])))
                colorItem.setFlags(qt.Qt.ItemIsEnabled | qt.Qt.ItemIsSelectable)
                colorItem.setToolTip(_("Double-click to change the colour"))
                term = (organ.get("terminology") or {}).get("type")
                termItem = qt.QTableWidgetItem(f"{term[2]} ({term[0]} {term[1]})" if term else _("none (matched by name)"))
                termItem.setFlags(qt.Qt.ItemIsEnabled | qt.Qt.ItemIsSelectable)
                for column, item in enumerate((nameItem, colorItem, termItem)):
                    table.setItem(row, column, item)
            table.resizeColumnToContents(0)
        finally:
            self._updatingOrgans = False
        self.onChanged()

    def onOrganItemChanged(self, item):
        if self._updatingOrgans or item.column() != 0:
            return
        row = item.row()
        if not 0 <= row < len(self.logic.organs):
            return
        with self.panel.guard(self.ui.organsStatusLabel, waitCursor=False):
            self.logic.updateOrgan(self.logic.organs[row]["name"], newName=item.text().strip())
        self.refreshOrgans()

    def onOrganCellDoubleClicked(self, row, column):
        if column != 1 or not 0 <= row < len(self.logic.organs):
            return
        organ = self.logic.organs[row]
        color = qt.QColorDialog.getColor(qt.QColor(*organ["color"]), slicer.util.mainWindow(),
                                         _("Colour of {organ}").format(organ=organ["name"]))
        if color.isValid():
            with self.panel.guard(self.ui.organsStatusLabel, waitCursor=False):
                self.logic.updateOrgan(organ["name"], color=[color.red(), color.green(), color.blue()])
            self.refreshOrgans()

    def onAddOrgan(self):
        name = self.ui.addOrganComboBox.currentText.strip()
        if not name:
            return
        with self.panel.guard(self.ui.organsStatusLabel, waitCursor=False):
            self.logic.addOrgan(name)
            self.ui.addOrganComboBox.setCurrentText("")
        self.refreshOrgans()

    def onRemoveOrgan(self):
        row = self.ui.organsTableWidget.currentRow()
        if 0 <= row < len(self.logic.organs):
            with self.panel.guard(self.ui.organsStatusLabel, waitCursor=False):
                self.logic.removeOrgan(self.logic.organs[row]["name"])
            self.refreshOrgans()

    def onResetOrgans(self):
        with self.panel.guard(self.ui.organsStatusLabel, waitCursor=False):
            self.logic.resetOrgans()
        self.refreshOrgans()
