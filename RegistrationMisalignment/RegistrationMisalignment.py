"""3D Slicer module: predict where a registration is correct, poor or wrong, and check it on landmarks.

The panel and the Logic are thin: every computation (validation, inference, landmark metrics) is
done by ``RegistrationMisalignmentLib``, the same code the ``regmis`` command line runs. torch is
imported only when a model is loaded, so the module loads, and says what is missing, without it.
"""

import importlib.util
import logging
import os
import sys
from dataclasses import dataclass
from typing import Annotated, Optional, Union

import qt
import SimpleITK as sitk
import vtk

import slicer
from slicer import (
    vtkMRMLLabelMapVolumeNode,
    vtkMRMLMarkupsFiducialNode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
    vtkMRMLTransformNode,
)
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin


def _addLibToPath() -> None:
    """Make ``RegistrationMisalignmentLib`` importable when Slicer runs the module from a checkout.

    A built extension copies the Lib next to this file (see CMakeLists.txt) and a pip-installed
    Lib is importable anyway; in a source checkout it sits beside the module folder instead.
    """
    if importlib.util.find_spec("RegistrationMisalignmentLib") is not None:
        return
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isdir(os.path.join(checkout, "RegistrationMisalignmentLib")):
        sys.path.append(checkout)


_addLibToPath()

from RegistrationMisalignmentLib.config import CLASS_NAMES, DEFAULT_CONFIG, MisalignmentConfig  # noqa: E402
from RegistrationMisalignmentLib.errors import InputError, PredictionCancelled  # noqa: E402
from RegistrationMisalignmentLib.landmarks import Landmarks, lps_to_ras, ras_to_lps  # noqa: E402
from RegistrationMisalignmentSlicerLib import dependencies, display  # noqa: E402
from RegistrationMisalignmentSlicerLib.job import BackgroundJob  # noqa: E402
from RegistrationMisalignmentSlicerLib.transforms import node_to_sitk  # noqa: E402
from RegistrationMisalignmentSlicerLib.volumes import mask_to_sitk, sitk_to_volume, volume_to_sitk, world_volume  # noqa: E402

DEVICES = ["auto", "cuda", "cpu"]
POLL_INTERVAL_MS = 100
CHECK_PARAMETERS = {"confidence": "checkConfidence", "jacobian": "checkJacobian",
                    "inverse-consistency": "checkInverseConsistency", "intensity": "checkIntensity",
                    "reregistration": "checkReregistration"}
"""The registration checks of the panel (names of the Lib's ``checks.run.CHECKS``) -> their parameter."""
CHECK_ATTRIBUTE = "RegistrationMisalignment.check"
"""Node attribute naming the map (a key of the Lib's ``checks.maps.MAPS``) a check volume holds."""


#
# RegistrationMisalignment
#


class RegistrationMisalignment(ScriptedLoadableModule):
    """Module description shown in Slicer's module list and help panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Registration Misalignment")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Registration")]
        self.parent.dependencies = []
        self.parent.contributors = ["RegistrationMisalignment contributors"]
        self.parent.helpText = _("""
Predicts, for every voxel of the fixed CT, whether a registration is <b>correct</b> (&lt;3 mm),
<b>poor</b> (3-6 mm) or <b>wrong</b> (&ge;6 mm), and compares the prediction with the residual error
of landmark pairs. Select the fixed volume and the registered moving volume (or the moving volume
under its registration transform), then click Apply.
""")
        self.parent.acknowledgementText = _("""
Method after H. Sokooti, G. Saygili, B. Glocker, B. P. F. Lelieveldt, M. Staring, "Hierarchical
prediction of registration misalignment using a convolutional LSTM: application to chest CT scans",
IEEE Access, 2021.
""")


#
# RegistrationMisalignmentParameterNode
#


@parameterNodeWrapper
class RegistrationMisalignmentParameterNode:
    """Panel state, saved with the scene.

    fixedVolume, movingVolume - the registered pair (the moving volume may sit under its transform).
    mask - optional region of the fixed image to predict in (segmentation or labelmap).
    modelPath - model file (.pt) chosen in the model list; empty means the shipped default.
    device - where inference runs.
    bodyOnly - without a mask, predict only inside the fixed CT's body (air and table skipped, label 0).
    outputLabelmap - where the map goes; none means a new labelmap is created on Apply.
    opacity - label layer opacity in the slice views.
    fixedLandmarks, movingLandmarks, landmarkTransform - landmark pairs and the registration
        transform (none: the moving landmarks are already in the registered space).
    checkConfidence, checkJacobian, checkInverseConsistency, checkIntensity, checkReregistration - which
        registration checks "Compute checks" runs.
    checksTransform - the registration transform of the checks (none: the one the moving volume sits under).
    inverseTransform - the registration of the other direction (moving -> fixed), for inverse consistency.
    """

    fixedVolume: vtkMRMLScalarVolumeNode
    movingVolume: vtkMRMLScalarVolumeNode
    mask: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode, None]
    modelPath: str = ""
    device: Annotated[str, Choice(DEVICES)] = "auto"
    bodyOnly: bool = True
    outputLabelmap: Optional[vtkMRMLLabelMapVolumeNode]
    opacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    fixedLandmarks: vtkMRMLMarkupsFiducialNode
    movingLandmarks: vtkMRMLMarkupsFiducialNode
    landmarkTransform: Optional[vtkMRMLTransformNode]
    checkConfidence: bool = False
    checkJacobian: bool = True
    checkInverseConsistency: bool = False
    checkIntensity: bool = True
    checkReregistration: bool = False
    checksTransform: Optional[vtkMRMLTransformNode]
    inverseTransform: Optional[vtkMRMLTransformNode]


#
# RegistrationMisalignmentWidget
#


class RegistrationMisalignmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: wires the .ui to the parameter node and the Logic, runs prediction off the GUI thread."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._jobContext = None
        self._landmarkRows = []
        self._landmarkChecks = None
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(POLL_INTERVAL_MS)
        self._pollTimer.connect("timeout()", self._onPollJob)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/RegistrationMisalignment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = RegistrationMisalignmentLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.installDependenciesButton.connect("clicked(bool)", self.ensureDependencies)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.evaluateLandmarksButton.connect("clicked(bool)", self.onEvaluateLandmarks)
        self.ui.landmarkTable.connect("cellClicked(int,int)", self.onLandmarkClicked)
        self.ui.exportCsvButton.connect("clicked(bool)", self.onExportCsv)
        self.ui.opacitySliderWidget.connect("valueChanged(double)", display.set_label_opacity)
        self.ui.computeChecksButton.connect("clicked(bool)", self.onComputeChecks)

        self.ui.legendLabel.text = self._legendHtml()
        self.ui.checksLegendLabel.text = self.logic.checksLegend()
        self.ui.cancelButton.enabled = False
        self.ui.progressBar.visible = False
        self._updateDependencyStatus()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self._cancelJob()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        self._cancelJob()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.fixedVolume:
            self._parameterNode.fixedVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._selectModelInList(self._parameterNode.modelPath)
            self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        node = self._parameterNode
        running = self._job is not None
        canApply = bool(node and node.fixedVolume and node.movingVolume) and not running
        self.ui.applyButton.enabled = canApply
        self.ui.applyButton.toolTip = _("Predict the misalignment map") if canApply else _(
            "Select the fixed and the moving volume")
        if node:
            self.ui.outputSelector.baseName = self.logic.outputName(node.fixedVolume, node.movingVolume)
        canEvaluate = bool(node and node.outputLabelmap and node.fixedLandmarks and node.movingLandmarks)
        self.ui.evaluateLandmarksButton.enabled = canEvaluate and not running
        chosen = bool(node) and any(getattr(node, name) for name in CHECK_PARAMETERS.values())
        self.ui.computeChecksButton.enabled = canApply and chosen

    # ---- dependencies and models -------------------------------------------------------
    def _updateDependencyStatus(self) -> None:
        missing = dependencies.missing_packages()
        self.ui.dependencyLabel.visible = bool(missing)
        self.ui.installDependenciesButton.visible = bool(missing)
        if missing:
            self.ui.dependencyLabel.text = _(
                "Python packages missing: {names}. They are installed (after you confirm) when you click "
                "Apply or Install.").format(names=", ".join(missing))
        self._populateModels(available=not missing)

    def ensureDependencies(self) -> bool:
        """Install missing packages after the user agrees; True when everything is importable."""
        missing = dependencies.missing_packages()
        if not missing:
            return True
        requirements = ", ".join(dependencies.REQUIREMENTS[name] for name in missing)
        if not slicer.util.confirmOkCancelDisplay(
                _("This module needs additional Python packages. Installation needs a network connection "
                  "and may take several minutes. Click OK to install."),
                _("Install Python packages"),
                detailedText=_("Packages to install: {packages}").format(packages=requirements)):
            return False
        installed = False
        with slicer.util.tryWithErrorDisplay(_("Failed to install Python packages."), waitCursor=True):
            dependencies.install_packages(missing, log=self._appendLog)
            installed = True
        self._updateDependencyStatus()
        return installed

    def _populateModels(self, available: bool) -> None:
        combo = self.ui.modelComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        combo.addItem(_("Default model"), "")
        if available:
            for path in self.logic.availableModels():
                combo.addItem(os.path.splitext(os.path.basename(path))[0], str(path))
        combo.blockSignals(wasBlocked)
        self._selectModelInList(self._parameterNode.modelPath if self._parameterNode else "")

    def _selectModelInList(self, modelPath: str) -> None:
        index = self.ui.modelComboBox.findData(modelPath)
        self.ui.modelComboBox.currentIndex = max(index, 0)
        self.onModelChanged()

    def onModelChanged(self, index=None) -> None:
        modelPath = self.ui.modelComboBox.currentData or ""
        if self._parameterNode and self._parameterNode.modelPath != modelPath:
            self._parameterNode.modelPath = modelPath
        if dependencies.missing_packages():
            self.ui.modelCardBrowser.plainText = _("Install the missing Python packages to load a model.")
            return
        try:
            card = self.logic.loadModel(modelPath or None).card
            self.ui.modelCardBrowser.plainText = self.logic.formatModelCard(card)
        except Exception as error:  # shown where the card would be; Apply reports it again
            self.ui.modelCardBrowser.plainText = str(error)

    # ---- prediction ----------------------------------------------------------------------
    def onApplyButton(self) -> None:
        if not self.ensureDependencies():
            return
        node = self._parameterNode
        self.ui.logTextEdit.plainText = ""
        try:
            model = self.logic.loadModel(node.modelPath or None)
            inputs = self.logic.prepareInputs(node.fixedVolume, node.movingVolume, node.mask)
        except Exception as error:
            self._showError(error)
            return
        device, bodyOnly = node.device, node.bodyOnly
        fixedVolume, movingVolume, outputLabelmap = node.fixedVolume, node.movingVolume, node.outputLabelmap

        def finish(prediction) -> None:
            output = self.logic.writeOutput(prediction.labelmap, fixedVolume, movingVolume, outputLabelmap)
            self._parameterNode.outputLabelmap = output
            self.logic.showResult(output, fixedVolume, self._parameterNode.opacity)
            self.ui.statusLabel.text = _("Done: {name}").format(name=output.GetName())

        self._startJob(lambda progress, cancel, log: self.logic.predictImages(inputs, model, device, progress, cancel,
                                                                              log, bodyOnly), finish)

    def _startJob(self, work, finish) -> None:
        """Run ``work(progress, cancel, log)`` off the GUI thread; ``finish(result)`` on it when it succeeds."""
        self._jobContext = finish
        self._job = BackgroundJob(work)
        self._setRunning(True)
        self._job.start()
        self._pollTimer.start()

    def onCancelButton(self) -> None:
        if self._job is not None:
            self._job.cancel()
            self.ui.statusLabel.text = _("Cancelling...")

    def _cancelJob(self) -> None:
        """Stop a running job and forget it: nothing of it is written to the scene."""
        if self._job is not None:
            self._job.cancel()
            self._job.wait()
            self._job = None
            self._pollTimer.stop()
            self._setRunning(False)

    def _onPollJob(self) -> None:
        job = self._job
        if job is None:
            self._pollTimer.stop()
            return
        fraction, message = job.progress()
        self.ui.progressBar.value = int(round(100 * fraction))
        self.ui.statusLabel.text = message
        for line in job.log_lines():
            self._appendLog(line)
        if not job.done():
            return
        self._pollTimer.stop()
        self._job = None
        self._setRunning(False)
        finish, self._jobContext = self._jobContext, None
        if isinstance(job.error, PredictionCancelled):
            self.ui.statusLabel.text = _("Cancelled; nothing was written to the scene.")
        elif job.error is not None:
            self.ui.statusLabel.text = _("Failed; nothing was written to the scene.")
            self._showError(job.error)
        else:
            try:
                finish(job.result)
            except Exception as error:
                self._showError(error)

    def _setRunning(self, running: bool) -> None:
        self.ui.cancelButton.enabled = running
        self.ui.progressBar.visible = running
        if running:
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = _("Starting...")
        self._onParameterNodeModified()

    def _appendLog(self, text: str) -> None:
        self.ui.logTextEdit.appendPlainText(text)

    def _showError(self, error: BaseException) -> None:
        """User errors as a plain message box; anything else with its traceback in the details."""
        if isinstance(error, InputError):
            slicer.util.errorDisplay(str(error), windowTitle=_("Registration Misalignment"))
            return
        import traceback

        details = "".join(traceback.format_exception(error))
        logging.error(details)
        slicer.util.errorDisplay(_("Unexpected error: {error}").format(error=error),
                                 windowTitle=_("Registration Misalignment"), detailedText=details)

    @staticmethod
    def _legendHtml() -> str:
        cells = []
        for name, rgb in zip(CLASS_NAMES, DEFAULT_CONFIG.class_colors):
            color = "#" + "".join(f"{round(255 * c):02x}" for c in rgb)
            cells.append(f'<span style="background-color:{color}">&nbsp;&nbsp;&nbsp;&nbsp;</span> {name}')
        return "&nbsp;&nbsp;".join(cells)

    # ---- registration checks ---------------------------------------------------------------
    def onComputeChecks(self) -> None:
        node = self._parameterNode
        checks = [check for check, name in CHECK_PARAMETERS.items() if getattr(node, name)]
        if "confidence" in checks and not self.ensureDependencies():
            return
        if "reregistration" in checks and not self._ensureElastix():
            return
        self.ui.logTextEdit.plainText = ""
        try:
            model = self.logic.loadModel(node.modelPath or None) if "confidence" in checks else None
            inputs = self.logic.prepareChecks(node.fixedVolume, node.movingVolume, node.mask, node.checksTransform,
                                              node.inverseTransform, node.fixedLandmarks, node.movingLandmarks)
        except Exception as error:
            self._showError(error)
            return
        device, bodyOnly = node.device, node.bodyOnly
        fixedVolume, movingVolume, outputLabelmap = node.fixedVolume, node.movingVolume, node.outputLabelmap

        def finish(results) -> None:
            nodes = self.logic.writeCheckOutputs(results, fixedVolume, movingVolume, outputLabelmap)
            if "learned" in nodes:
                self._parameterNode.outputLabelmap = nodes["learned"]
            shown = next((nodes[key] for key in reversed(list(nodes)) if key != "learned"), None)
            if shown is not None:
                self.logic.showCheck(shown, fixedVolume, self._parameterNode.opacity)
            self.ui.checksSummaryText.plainText = results.summary.format_table()
            self.ui.checksLegendLabel.text = self.logic.checksLegend(list(results.maps))
            self._landmarkChecks = results.summary.landmarks
            if self._landmarkRows:
                self._fillLandmarkTable(self._landmarkRows)
            self.ui.statusLabel.text = _("Done: {names}").format(names=", ".join(n.GetName() for n in nodes.values()))

        self._startJob(lambda progress, cancel, log: self.logic.computeCheckImages(
            inputs, checks, model, device, progress, cancel, log, bodyOnly), finish)

    def _ensureElastix(self) -> bool:
        """Offer to install itk-elastix for the re-registration check; True when it is importable."""
        if not dependencies.missing_elastix():
            return True
        if not slicer.util.confirmOkCancelDisplay(
                _("The re-registration check needs itk-elastix. Click OK to install it (network, a few minutes)."),
                _("Install itk-elastix")):
            return False
        with slicer.util.tryWithErrorDisplay(_("Failed to install itk-elastix."), waitCursor=True):
            dependencies.install_packages(list(dependencies.OPTIONAL), log=self._appendLog)
        return not dependencies.missing_elastix()

    # ---- landmarks -----------------------------------------------------------------------
    def onEvaluateLandmarks(self) -> None:
        node = self._parameterNode
        try:
            rows, report = self.logic.evaluateLandmarks(
                node.outputLabelmap, node.fixedLandmarks, node.movingLandmarks, node.landmarkTransform)
        except Exception as error:
            self._showError(error)
            return
        self._landmarkRows = rows
        self._fillLandmarkTable(rows)
        self.ui.landmarkSummaryLabel.text = self.logic.formatReport(report)
        self.ui.exportCsvButton.enabled = bool(rows)

    def _fillLandmarkTable(self, rows) -> None:
        table = self.ui.landmarkTable
        headers = [_("Label"), _("TRE (mm)"), _("True"), _("Predicted"), _("Agree")]
        checkHeaders, checkCells = self.logic.landmarkCheckColumns(self._landmarkChecks)
        headers += checkHeaders
        table.clear()
        table.setColumnCount(len(headers))
        table.setHorizontalHeaderLabels(headers)
        table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            cells = [row.label, f"{row.tre_mm:.2f}", self.logic.className(row.true_class),
                     self.logic.className(row.predicted_class), _("yes") if row.agree else _("no")]
            cells += checkCells.get(row.label, [""] * len(checkHeaders))
            for c, text in enumerate(cells):
                item = qt.QTableWidgetItem(text)
                item.setFlags(qt.Qt.ItemIsSelectable | qt.Qt.ItemIsEnabled)
                classIndex = {2: row.true_class, 3: row.predicted_class}.get(c)
                if classIndex is not None and classIndex >= 0:
                    item.setBackground(qt.QBrush(qt.QColor(*self._rgb255(classIndex))))
                if c == 4:
                    item.setForeground(qt.QBrush(qt.QColor("darkgreen" if row.agree else "darkred")))
                table.setItem(r, c, item)
        table.resizeColumnsToContents()

    @staticmethod
    def _rgb255(classIndex: int) -> tuple[int, int, int]:
        return tuple(round(255 * c) for c in DEFAULT_CONFIG.class_colors[classIndex])

    def onLandmarkClicked(self, row: int, column: int) -> None:
        if 0 <= row < len(self._landmarkRows):
            self.logic.jumpToLandmark(self._landmarkRows[row])

    def onExportCsv(self) -> None:
        path = qt.QFileDialog.getSaveFileName(
            slicer.util.mainWindow(), _("Export landmark table"), "landmarks.csv", _("CSV files (*.csv)"))
        if not path:
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to write the landmark table.")):
            self.logic.exportLandmarkTable(self._landmarkRows, path)


#
# RegistrationMisalignmentLogic
#


@dataclass
class PredictionInputs:
    """The pair (and mask) as SimpleITK images, read from the scene on the GUI thread."""

    fixed: sitk.Image
    moving: sitk.Image
    mask: Optional[sitk.Image] = None


@dataclass
class ChecksInputs:
    """What the registration checks read from the scene (on the GUI thread), as SimpleITK objects in LPS."""

    fixed: sitk.Image
    moving: sitk.Image
    """The moving volume as shown, i.e. with its transform applied (the registered moving image)."""
    mask: Optional[sitk.Image] = None
    forward: Optional[sitk.Transform] = None
    """The registration, fixed -> moving points."""
    backward: Optional[sitk.Transform] = None
    """The registration of the other direction, moving -> fixed points."""
    pairs: Optional[object] = None
    """Landmark pairs (``landmarks.Pairing``), the moving ones already moved into the registered space."""


class RegistrationMisalignmentLogic(ScriptedLoadableModuleLogic):
    """Everything the panel does, usable from the Python console and scripts without the panel.

    ``process(fixed, moving)`` runs the three steps in one call; the panel calls
    ``prepareInputs`` and ``writeOutput`` on the GUI thread and ``predictImages`` on a worker.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._model = None
        self._modelKey = None

    def getParameterNode(self):
        return RegistrationMisalignmentParameterNode(super().getParameterNode())

    # ---- models --------------------------------------------------------------------------
    @staticmethod
    def availableModels() -> list:
        """Model files shipped with the extension (needs torch)."""
        from RegistrationMisalignmentLib.weights import available_models

        return available_models()

    def loadModel(self, modelPath: Optional[str] = None):
        """A verified ``LoadedModel`` (None: the shipped default), kept for the next call."""
        from RegistrationMisalignmentLib.weights import load_model

        if self._model is None or self._modelKey != modelPath:
            self._model = load_model(modelPath)
            self._modelKey = modelPath
        return self._model

    @staticmethod
    def formatModelCard(card: dict) -> str:
        """The card's main facts as text for the panel."""
        lines = [f"{key.capitalize()}: {card[key]}" for key in ("name", "decoder", "split") if key in card]
        if card.get("description"):
            lines.append(str(card["description"]))
        metrics = card.get("metrics") or {}
        if isinstance(metrics, dict):
            lines += [f"{name}: {value}" for name, value in metrics.items()]
        return "\n".join(lines)

    # ---- prediction ----------------------------------------------------------------------
    @staticmethod
    def outputName(fixedVolume, movingVolume) -> str:
        """Default name of a new output labelmap, from the inputs."""
        if not fixedVolume or not movingVolume:
            return "misalignment"
        return f"{fixedVolume.GetName()}-{movingVolume.GetName()} misalignment"

    def prepareInputs(self, fixedVolume, movingVolume, mask=None) -> PredictionInputs:
        """Read the volumes (and mask) from the scene; the user's nodes are left unchanged.

        A moving volume (or labelmap mask) under a transform is read through a temporary hardened
        clone that is removed again. The fixed volume defines the output grid, so it must not be
        transformed.
        """
        if not fixedVolume or not movingVolume:
            raise InputError("select both the fixed and the moving volume.")
        transform = fixedVolume.GetParentTransformNode()
        if transform is not None:
            raise InputError(
                f"fixed volume '{fixedVolume.GetName()}' is under transform '{transform.GetName()}'; the map is "
                "computed on the fixed image's own grid. Harden or remove that transform (Data module), or put "
                "the transform on the moving volume instead.")
        fixed = volume_to_sitk(fixedVolume)
        with world_volume(movingVolume) as moving:
            movingImage = volume_to_sitk(moving)
        maskImage = mask_to_sitk(mask, fixedVolume) if mask else None
        return PredictionInputs(fixed, movingImage, maskImage)

    @staticmethod
    def predictImages(inputs: PredictionInputs, model=None, device: str = "auto",
                      progress=None, cancel=None, log=None, bodyOnly: bool = True):
        """The Lib's ``predict`` on the prepared images; touches no MRML node, so any thread may run it."""
        from RegistrationMisalignmentLib.inference import predict

        return predict(inputs.fixed, inputs.moving, model, mask=inputs.mask, device=device,
                       progress=progress, cancel=cancel, log=log, body_only=bodyOnly)

    def writeOutput(self, labelmap, fixedVolume, movingVolume, outputLabelmap=None):
        """Put the predicted map into ``outputLabelmap`` (a new node when None) with the colour table.

        A new node is filled before it is added, so the scene never holds half a result.
        """
        if outputLabelmap is None:
            newNode = slicer.vtkMRMLLabelMapVolumeNode()
            newNode.SetName(slicer.mrmlScene.GenerateUniqueName(self.outputName(fixedVolume, movingVolume)))
            sitk_to_volume(labelmap, newNode)
            outputLabelmap = slicer.mrmlScene.AddNode(newNode)
        else:
            sitk_to_volume(labelmap, outputLabelmap)
        display.apply_color_table(outputLabelmap, self._config())
        return outputLabelmap

    @staticmethod
    def showResult(outputLabelmap, fixedVolume, opacity: float = 0.5) -> None:
        """Fixed volume as background and the map as label layer in all slice views."""
        display.show_in_slice_views(outputLabelmap, fixedVolume, opacity)

    def process(self, fixedVolume, movingVolume, outputLabelmap=None, mask=None, model=None,
                device: str = "auto", progress=None, cancel=None, log=None, showResult: bool = True,
                bodyOnly: bool = True):
        """Predict the misalignment map of a registered pair, in one blocking call.

        :param fixedVolume: the fixed CT (defines the output grid)
        :param movingVolume: the registered moving CT, or the moving CT under its registration transform
        :param outputLabelmap: labelmap node to fill; None creates one named after the inputs
        :param mask: optional segmentation or labelmap restricting the prediction
        :param model: a ``LoadedModel`` (see ``loadModel``); None uses the shipped default
        :param device: "auto", "cuda" or "cpu"
        :param progress, cancel, log: passed to the Lib's ``predict``
        :param showResult: show the map over the fixed volume in the slice views
        :param bodyOnly: without a mask, predict only inside the fixed CT's body (label 0 outside)
        :return: the output labelmap node
        """
        inputs = self.prepareInputs(fixedVolume, movingVolume, mask)
        prediction = self.predictImages(inputs, model, device, progress, cancel, log, bodyOnly)
        output = self.writeOutput(prediction.labelmap, fixedVolume, movingVolume, outputLabelmap)
        if showResult:
            self.showResult(output, fixedVolume)
        return output

    def _config(self) -> MisalignmentConfig:
        """Labels and thresholds of the loaded model, or the defaults."""
        return self._model.config if self._model is not None else DEFAULT_CONFIG

    # ---- registration checks ---------------------------------------------------------------
    @staticmethod
    def checkOutputName(key: str, fixedVolume, movingVolume) -> str:
        """Name of a check's output volume, from the inputs and the map (``checks.maps.MAPS``)."""
        from RegistrationMisalignmentLib.checks.maps import MAPS

        if not fixedVolume or not movingVolume:
            return MAPS[key].title
        return f"{fixedVolume.GetName()}-{movingVolume.GetName()} {MAPS[key].title}"

    def prepareChecks(self, fixedVolume, movingVolume, mask=None, transformNode=None, inverseTransformNode=None,
                      fixedLandmarks=None, movingLandmarks=None) -> ChecksInputs:
        """Read what the checks need from the scene; the user's nodes are left unchanged.

        ``transformNode``: the registration (None: the transform the moving volume sits under, if any); its
        "from parent" direction maps fixed to moving points. ``inverseTransformNode``: the registration of
        the other direction (moving -> fixed points: the transform the fixed volume sat under when it was
        registered to the moving one). Landmarks as ``evaluateLandmarks`` reads them: the moving ones where
        they were placed on the moving image when there is a registration transform, and then moved by it
        (exactly, by VTK) into the registered space.
        """
        from RegistrationMisalignmentLib.landmarks import pair_landmarks

        inputs = self.prepareInputs(fixedVolume, movingVolume, mask)
        transformNode = transformNode or movingVolume.GetParentTransformNode()
        forward = node_to_sitk(transformNode, inputs.fixed) if transformNode is not None else None
        backward = None
        if inverseTransformNode is not None:
            backward = node_to_sitk(inverseTransformNode, inputs.fixed, self._reach(forward, inputs.fixed))
        pairs = None
        if fixedLandmarks and movingLandmarks:
            fixed = self.markupsToLandmarks(fixedLandmarks)
            moving = self.markupsToLandmarks(movingLandmarks, world=transformNode is None)
            pairs = pair_landmarks(fixed, moving)
            if transformNode is not None:
                pairs = pairs._replace(moving=self._shiftByTransform(pairs.moving, pairs.fixed, transformNode))
        return ChecksInputs(inputs.fixed, inputs.moving, inputs.mask, forward, backward, pairs)

    @staticmethod
    def _reach(forward, fixed: sitk.Image) -> int:
        """Voxels by which the forward transform can leave the fixed grid (at most 64), plus 2."""
        import numpy as np

        if forward is None:
            return 2
        if isinstance(forward, sitk.DisplacementFieldTransform):
            field = sitk.GetArrayViewFromImage(forward.GetDisplacementField())
            reach = float(np.linalg.norm(field, axis=-1).max())
        else:
            corners = [fixed.TransformIndexToPhysicalPoint([c * (n - 1) for c, n in zip(corner, fixed.GetSize())])
                       for corner in np.ndindex(2, 2, 2)]
            reach = max(float(np.linalg.norm(np.subtract(forward.TransformPoint(p), p))) for p in corners)
        return min(int(np.ceil(reach / min(fixed.GetSpacing()))), 64) + 2

    def computeCheckImages(self, inputs: ChecksInputs, checks, model=None, device: str = "auto", progress=None,
                           cancel=None, log=None, bodyOnly: bool = True, reregistrationIterations=None):
        """The Lib's ``run_checks`` on the prepared inputs (a ``CheckResults``); touches no MRML node, so any
        thread may run it. The re-registration's child process runs Slicer's PythonSlicer."""
        from RegistrationMisalignmentLib.checks.run import run_checks

        return run_checks(inputs.fixed, inputs.moving, checks, transform=inputs.forward,
                          inverse_transform=inputs.backward, mask=inputs.mask, body_only=bodyOnly,
                          pairs=inputs.pairs, landmarks_registered=True, model=model, device=device,
                          reregistration_iterations=reregistrationIterations,
                          python=dependencies.python_executable(), progress=progress, cancel=cancel, log=log)

    def writeCheckOutputs(self, results, fixedVolume, movingVolume, outputLabelmap=None) -> dict:
        """One volume per map of ``results``, named after the inputs, with its colour table; returns key -> node.

        The learned map goes where ``writeOutput`` puts it (``outputLabelmap`` or a new labelmap); class maps
        become labelmaps with the misalignment colours, continuous maps scalar volumes with their own colour
        table over their display range. Every node is filled before any is added to the scene.
        """
        from RegistrationMisalignmentLib.checks.maps import MAPS

        made = {}
        for key, image in results.maps.items():
            if key == "learned":
                continue
            node = slicer.vtkMRMLLabelMapVolumeNode() if MAPS[key].kind == "classes" else slicer.vtkMRMLScalarVolumeNode()
            sitk_to_volume(image, node)
            node.SetAttribute(CHECK_ATTRIBUTE, key)
            made[key] = node
        nodes = {}
        if "learned" in results.maps:
            nodes["learned"] = self.writeOutput(results.maps["learned"], fixedVolume, movingVolume, outputLabelmap)
        for key, node in made.items():
            node.SetName(slicer.mrmlScene.GenerateUniqueName(self.checkOutputName(key, fixedVolume, movingVolume)))
            nodes[key] = slicer.mrmlScene.AddNode(node)
            display.apply_check_display(nodes[key], MAPS[key], self._config())
        return nodes

    @staticmethod
    def showCheck(volumeNode, fixedVolume, opacity: float = 0.5) -> None:
        """A check map over the fixed volume in all slice views (class maps as the label layer)."""
        from RegistrationMisalignmentLib.checks.maps import MAPS

        display.show_check(volumeNode, fixedVolume, MAPS[volumeNode.GetAttribute(CHECK_ATTRIBUTE)], opacity)

    def computeChecks(self, fixedVolume, movingVolume, checks, transformNode=None, inverseTransformNode=None,
                      mask=None, model=None, device: str = "auto", fixedLandmarks=None, movingLandmarks=None,
                      progress=None, cancel=None, log=None, showResult: bool = True, bodyOnly: bool = True,
                      reregistrationIterations=None, outputLabelmap=None):
        """Compute registration checks of a registered pair in one blocking call (the Lib's ``run_checks``).

        :param checks: names of the Lib's ``checks.run.CHECKS``: learned, confidence, jacobian,
            inverse-consistency, intensity, reregistration
        :param transformNode: the registration (None: the transform the moving volume sits under)
        :param inverseTransformNode: the other direction's registration, for inverse-consistency
        :param fixedLandmarks, movingLandmarks: optional point lists: the summary gains the landmark table
        :param reregistrationIterations: elastix iterations per resolution (None: the parameter file's 500)
        :return: (key -> output node, the Lib's ``ChecksSummary``); nothing is added when it fails or is cancelled
        """
        inputs = self.prepareChecks(fixedVolume, movingVolume, mask, transformNode, inverseTransformNode,
                                    fixedLandmarks, movingLandmarks)
        results = self.computeCheckImages(inputs, checks, model, device, progress, cancel, log, bodyOnly,
                                          reregistrationIterations)
        nodes = self.writeCheckOutputs(results, fixedVolume, movingVolume, outputLabelmap)
        shown = [node for key, node in nodes.items() if key != "learned"]
        if showResult and shown:
            self.showCheck(shown[-1], fixedVolume)
        return nodes, results.summary

    @staticmethod
    def checksLegend(keys=None) -> str:
        """HTML legend of the check maps (all of them when ``keys`` is None) for the panel."""
        from RegistrationMisalignmentLib.checks.maps import MAPS

        return display.legend_html([MAPS[k] for k in (keys or MAPS) if k != "learned"])

    @staticmethod
    def landmarkCheckColumns(landmarkChecks):
        """(headers, label -> cells) of the landmark table's check columns (none without checks at landmarks)."""
        from RegistrationMisalignmentLib.checks.maps import MAPS

        if landmarkChecks is None:
            return [], {}
        keys = [k for k in landmarkChecks.values if k != "learned"]
        headers = [f"{MAPS[k].title} ({MAPS[k].unit})" for k in keys]
        cells = {}
        for i, label in enumerate(landmarkChecks.labels):
            texts = []
            for key in keys:
                text = landmarkChecks.cell(key, i)
                texts.append(text if MAPS[key].kind == "classes" or not text else f"{float(text):.3g}")
            cells[label] = texts
        return headers, cells

    # ---- landmarks -----------------------------------------------------------------------
    @staticmethod
    def markupsToLandmarks(markupsNode, world: bool = True) -> Landmarks:
        """A point list as LPS landmarks: world positions, or the node's own (untransformed) ones."""
        if not markupsNode:
            raise InputError("select both the fixed and the moving landmarks.")
        if markupsNode.GetNumberOfControlPoints() == 0:
            raise InputError(f"point list '{markupsNode.GetName()}' is empty; place the landmarks first.")
        points, labels = [], []
        for i in range(markupsNode.GetNumberOfControlPoints()):
            label = markupsNode.GetNthControlPointLabel(i) or str(i + 1)
            if markupsNode.GetNthControlPointPositionStatus(i) != markupsNode.PositionDefined:
                raise InputError(f"landmark '{label}' of '{markupsNode.GetName()}' has no position; place or "
                                 "delete it.")
            position = [0.0, 0.0, 0.0]
            if world:
                markupsNode.GetNthControlPointPositionWorld(i, position)
            else:
                markupsNode.GetNthControlPointPosition(i, position)
            points.append(position)
            labels.append(label)
        return Landmarks(ras_to_lps(points), labels)

    def evaluateLandmarks(self, labelmapNode, fixedLandmarks, movingLandmarks, transformNode=None,
                          config: Optional[MisalignmentConfig] = None):
        """Per-landmark rows and scores of a misalignment map, computed by the Lib's ``evaluate_landmarks``.

        Fixed landmarks are read in world coordinates. With ``transformNode`` (the registration
        transform the moving volume sits under) the moving landmarks are taken where they were
        placed on the moving image and the residual is ||T(x_F) - x_M||; without it they are read
        in world coordinates, i.e. already in the registered space, and the residual is ||x_F - x_M||.
        Pairs are matched by the Lib's ``pair_landmarks``: by label when both lists carry the same
        labels, by order when they share none (Slicer's default F-1.. and M-1..).
        """
        from RegistrationMisalignmentLib.evaluation import evaluate_landmarks
        from RegistrationMisalignmentLib.landmarks import pair_landmarks

        if not labelmapNode:
            raise InputError("select the misalignment labelmap to evaluate (run Apply first).")
        with world_volume(labelmapNode) as labelmapVolume:
            labelmap = volume_to_sitk(labelmapVolume)
        fixed = self.markupsToLandmarks(fixedLandmarks)
        moving = self.markupsToLandmarks(movingLandmarks, world=transformNode is None)
        if transformNode is not None:  # the shift is per pair, so the pairs are matched first (by the Lib)
            moving = self._shiftByTransform(pair_landmarks(fixed, moving).moving, fixed, transformNode)
        return evaluate_landmarks(labelmap, fixed, moving, None, config or self._config())

    @staticmethod
    def _shiftByTransform(moving: Landmarks, fixed: Landmarks, transformNode) -> Landmarks:
        """Moving landmarks shifted by -(T(x_F) - x_F), so that ||x_F - shifted|| = ||T(x_F) - x_M||.

        This lets any Slicer transform (linear, grid, B-spline, composite) be evaluated exactly at
        the landmarks without converting it to a SimpleITK transform; the TRE is still computed by
        the Lib. T maps world (fixed) points into the transform node's space, Slicer's "from parent".
        """
        if len(moving) != len(fixed):
            return moving  # the Lib reports the mismatch with its own message
        fromWorld = vtk.vtkGeneralTransform()
        transformNode.GetTransformFromWorld(fromWorld)
        fixedRas = lps_to_ras(fixed.points_lps)
        mappedRas = [fromWorld.TransformPoint(*(float(v) for v in p)) for p in fixedRas]
        shift = ras_to_lps(mappedRas) - fixed.points_lps
        return Landmarks(moving.points_lps - shift, moving.labels)

    @staticmethod
    def className(classIndex: int) -> str:
        return CLASS_NAMES[classIndex] if classIndex >= 0 else display.OUTSIDE_NAME

    @staticmethod
    def formatReport(report) -> str:
        """One summary line of the Lib's report (values are the Lib's, only formatted here)."""
        values = report.to_dict()

        def pct(value) -> str:
            return "n/a" if value is None else f"{100 * value:.1f}%"

        f1 = ", ".join(f"{name} {pct(v)}" for name, v in zip(CLASS_NAMES, values["f1"]))
        return (f"N {values['n']} | accuracy {pct(values['accuracy'])} | F1 {f1} | "
                f"mean F1 {pct(values['mean_f1'])} | kappa {pct(values['kappa'])} | cw {values['cw']}")

    @staticmethod
    def jumpToLandmark(row) -> None:
        """Centre all slice views on a landmark row's (fixed) position."""
        display.jump_slices_to(lps_to_ras(row.position_lps))

    @staticmethod
    def exportLandmarkTable(rows, path: str) -> None:
        from RegistrationMisalignmentLib.evaluation import write_rows_csv

        write_rows_csv(rows, path)


#
# RegistrationMisalignmentTest
#


class RegistrationMisalignmentTest(ScriptedLoadableModuleTest):
    """Inside Slicer: the pytest scenario of Testing/test_slicer_logic.py on the application's scene."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_GeometryRoundTrip()
        self.setUp()
        self.test_ProcessAndEvaluate()
        self.setUp()
        self.test_RegistrationChecks()

    def _obliqueVolume(self, name: str, array, spacing=(0.8, 1.1, 2.5), angle: float = 20.0):
        import numpy as np

        volume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        slicer.util.updateVolumeFromArray(volume, array)
        c, s = np.cos(np.radians(angle)), np.sin(np.radians(angle))
        rotation = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
        matrix = np.eye(4)
        matrix[:3, :3] = rotation * np.array(spacing)
        matrix[:3, 3] = (-30.0, 12.0, -20.0)
        volume.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(matrix))
        volume.CreateDefaultDisplayNodes()
        return volume

    def test_GeometryRoundTrip(self):
        import numpy as np

        self.delayDisplay("Geometry round trip")
        volume = self._obliqueVolume("oblique", np.arange(6 * 7 * 8, dtype=np.int16).reshape(6, 7, 8))
        copy = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "copy")
        sitk_to_volume(volume_to_sitk(volume), copy)
        a, b = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(a)
        copy.GetIJKToRASMatrix(b)
        np.testing.assert_allclose(slicer.util.arrayFromVTKMatrix(a), slicer.util.arrayFromVTKMatrix(b), atol=1e-9)
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(volume), slicer.util.arrayFromVolume(copy))
        self.delayDisplay("Test passed")

    def test_ProcessAndEvaluate(self):
        import numpy as np

        if dependencies.missing_packages():
            logging.warning("test_ProcessAndEvaluate skipped: torch is not installed")
            return
        from RegistrationMisalignmentLib.weights import available_models

        if not available_models():
            logging.warning("test_ProcessAndEvaluate skipped: no model is shipped")
            return
        self.delayDisplay("Predict on a small synthetic pair")
        rng = np.random.default_rng(0)
        array = (rng.normal(0.0, 300.0, (24, 32, 32)) - 400.0).astype(np.int16)
        fixed = self._obliqueVolume("fixed", array)
        moving = self._obliqueVolume("moving", array)
        transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
        shift = np.eye(4)
        shift[0, 3] = 4.0
        transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(shift))
        moving.SetAndObserveTransformNodeID(transform.GetID())

        logic = RegistrationMisalignmentLogic()
        output = logic.process(fixed, moving)
        self.assertIs(moving.GetParentTransformNode(), transform)
        self.assertIsNone(slicer.mrmlScene.GetFirstNodeByName("moving (temporary, hardened)"))
        a, b = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        fixed.GetIJKToRASMatrix(a)
        output.GetIJKToRASMatrix(b)
        np.testing.assert_allclose(slicer.util.arrayFromVTKMatrix(a), slicer.util.arrayFromVTKMatrix(b), atol=1e-6)
        colors = output.GetDisplayNode().GetColorNode()
        self.assertEqual([colors.GetColorName(v) for v in range(4)], ["outside", *CLASS_NAMES])

        fixedPoints = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "F")
        movingPoints = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "M")
        for p in ([-20.0, 20.0, 0.0], [-10.0, 25.0, 10.0]):
            fixedPoints.AddControlPoint(*p)
            movingPoints.AddControlPoint(*p)  # same anatomy: the images are identical
        rows, report = logic.evaluateLandmarks(output, fixedPoints, movingPoints, transform)
        self.assertEqual([row.label for row in rows], ["F-1", "F-2"])
        for row in rows:
            self.assertAlmostEqual(row.tre_mm, 4.0, places=6)  # the 4 mm shift of the transform
        self.delayDisplay("Test passed")

    def test_RegistrationChecks(self):
        import numpy as np

        self.delayDisplay("Registration checks of a known affine registration")
        rng = np.random.default_rng(1)
        array = (rng.normal(0.0, 300.0, (20, 24, 24)) - 400.0).astype(np.int16)
        fixed = self._obliqueVolume("fixed", array)
        moving = self._obliqueVolume("moving", array)
        transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
        scale = np.diag([1.1, 1.0, 1.0, 1.0])
        transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(scale))
        moving.SetAndObserveTransformNodeID(transform.GetID())

        nodes, summary = RegistrationMisalignmentLogic().computeChecks(fixed, moving, ["jacobian", "intensity"],
                                                                       bodyOnly=False, showResult=False)
        self.assertEqual(list(nodes), ["jacobian", "intensity"])
        jacobian = slicer.util.arrayFromVolume(nodes["jacobian"])
        np.testing.assert_allclose(jacobian, 1 / 1.1, rtol=1e-6)  # from parent: x scaled by 1 / 1.1
        self.assertEqual(summary.maps[0].jacobian.folding, 0)
        self.assertIs(moving.GetParentTransformNode(), transform)
        self.delayDisplay("Test passed")
