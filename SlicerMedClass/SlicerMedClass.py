"""SlicerMedClass: classify the image on screen, see why, label it, and drive active learning.

The widget is thin: every computation lives in SlicerMedClassLib (GUI-free, tested
headless with slicer-core) or in medclass. Long work (inference, server requests)
runs on a worker thread; a QTimer collects the result on the GUI thread, which is
the only thread that touches Qt widgets or MRML nodes.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import tempfile

import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin
from SlicerMedClassLib.annotation import AnnotationLoop, run_text
from SlicerMedClassLib.client import DEFAULT_STRATEGIES, MonaiLabelClient
from SlicerMedClassLib.dependencies import (
    MEDCLASS_REQUIREMENT,
    TORCH_REQUIREMENT,
    install_plan,
    missing_packages,
)
from SlicerMedClassLib.local import LocalTrainer
from SlicerMedClassLib.logic import ClassificationLogic
from SlicerMedClassLib.results import training_progress
from SlicerMedClassLib.volumes import require_volume

#: Volume attribute: the MONAI Label datastore id of a volume fetched with Next sample.
IMAGE_ID_ATTRIBUTE = "SlicerMedClass.imageId"
PREDICTED = "(predicted class)"


#
# SlicerMedClass
#


class SlicerMedClass(ScriptedLoadableModule):
    """Module description shown in Slicer's module panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "MedClass"
        self.parent.categories = ["Classification"]
        self.parent.dependencies = []
        self.parent.contributors = ["SlicerMedClass contributors"]
        self.parent.helpText = """
Classify the selected image or volume with a deep-learning model trained by medclass, either from a
local checkpoint (model.pt) or through a MONAI Label server. The module shows the class probabilities
and a Grad-CAM or attention heat map over the slice views; with a MONAI Label server it also stores
the image-level class you choose, fetches the next image to annotate by an active-learning strategy,
waits for the server to refit the model on each label (seconds) before the next sample, and starts a
fast head refit or a full fine-tune on request. Without a server it refits a linear head on a local
model (or on an encoder given as Init) from the images you label, and fine-tunes it; a new model replaces
the working one only when it is no worse on held-out labels. On first use it offers to install its Python dependencies
(torch through the PyTorch extension, then medclass).
See the README of the SlicerMedClass repository for details.
"""
        self.parent.acknowledgementText = """
Built on 3D Slicer, MONAI and MONAI Label. Grad-CAM follows Selvaraju et al., ICCV 2017.
"""


#
# SlicerMedClassWidget
#


class SlicerMedClassWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module panel: selectors and buttons that call SlicerMedClassLogic."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.client = None
        self.serverInfo = {}
        self.serverModels = {}
        self.result = None
        self.classButtons = []
        self.classButtonGroup = None
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=4)
        self._pending = []  # (future, on_done, key)
        self._busy = set()
        self.multilabel = False
        self.localTrainer = None  # SlicerMedClassLib.local.LocalTrainer, made on first use

    # ------------------------------------------------------------------ set-up

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SlicerMedClass.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SlicerMedClassLogic()

        self.ui.probabilitiesTable.horizontalHeader().setSectionResizeMode(qt.QHeaderView.Stretch)
        self.ui.probabilitiesTable.verticalHeader().setVisible(False)
        self.ui.explainClassComboBox.addItem(PREDICTED)
        self.ui.strategyComboBox.addItems(list(DEFAULT_STRATEGIES))
        url = slicer.util.settingsValue("SlicerMedClass/ServerUrl", "")
        if url:
            self.ui.serverUrlLineEdit.text = url

        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onVolumeChanged)
        self.ui.sourceTabWidget.connect("currentChanged(int)", self.updateButtons)
        self.ui.checkpointPathLineEdit.connect("currentPathChanged(QString)", self.onCheckpointChanged)
        self.ui.connectButton.connect("clicked(bool)", self.onConnect)
        self.ui.serverUrlLineEdit.connect("returnPressed()", self.onConnect)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.classifyButton.connect("clicked(bool)", self.onClassify)
        self.ui.heatmapOpacitySlider.connect("valueChanged(double)", self.onOpacityChanged)
        self.ui.heatmapThresholdSlider.connect("valueChanged(double)", self.onThresholdChanged)
        self.ui.submitLabelButton.connect("clicked(bool)", self.onSubmitLabel)
        self.ui.nextSampleButton.connect("clicked(bool)", self.onNextSample)
        self.ui.trainButton.connect("clicked(bool)", self.onTrain)
        self.ui.fullFineTuneButton.connect("clicked(bool)", self.onFullFineTune)
        self.ui.stopTrainButton.connect("clicked(bool)", self.onStopTrain)
        self.ui.localRefitButton.connect("clicked(bool)", self.onLocalRefit)
        self.ui.localFineTuneButton.connect("clicked(bool)", self.onLocalFineTune)
        for edit in (self.ui.initPathLineEdit, self.ui.localFolderPathLineEdit):
            edit.connect("currentPathChanged(QString)", self.onLocalSettingsChanged)
        self.ui.localClassesLineEdit.connect("editingFinished()", self.onLocalSettingsChanged)

        # Collects finished background work on the GUI thread.
        self.pollTimer = qt.QTimer()
        self.pollTimer.setInterval(100)
        self.pollTimer.connect("timeout()", self._collectFinished)
        # Asks the server for the training status while a training runs.
        self.trainTimer = qt.QTimer()
        self.trainTimer.setInterval(2000)
        self.trainTimer.connect("timeout()", self.onTrainTimer)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.onCheckpointChanged(self.ui.checkpointPathLineEdit.currentPath)
        self.updateButtons()

    def cleanup(self):
        self.removeObservers()
        for timer in (getattr(self, "pollTimer", None), getattr(self, "trainTimer", None)):
            if timer is not None:
                timer.stop()
        self._executor.shutdown(wait=False)

    def onSceneEndClose(self, caller, event):
        self.result = None
        self._showResult(None)

    # ------------------------------------------------------------------ helpers

    def _useServer(self):
        return self.ui.sourceTabWidget.currentIndex == 1

    def _showError(self, message):
        self.ui.errorLabel.text = message
        if message:
            logging.warning("SlicerMedClass: %s", message)

    def _status(self, message, msec=5000):
        slicer.util.showStatusMessage(message, msec)

    def _runInBackground(self, key, fn, onDone, message=None):
        """Run ``fn()`` on a worker thread; call ``onDone(value)`` on the GUI thread."""
        if key in self._busy:
            self._status(f"{key} is already running")
            return
        self._busy.add(key)
        if message:
            self._status(message, 0)
        self._pending.append((self._executor.submit(fn), onDone, key))
        if not self.pollTimer.isActive():
            self.pollTimer.start()
        self.updateButtons()

    def _collectFinished(self):
        # Take the list first: a callback may start more background work.
        pending, self._pending = self._pending, []
        still = []
        for future, onDone, key in pending:
            if not future.done():
                still.append((future, onDone, key))
                continue
            self._busy.discard(key)
            self._status("")
            try:
                onDone(future.result())
            except ValueError as e:  # the logic's user-facing errors
                self._showError(str(e))
            except Exception as e:  # a bug: keep the traceback in the log
                logging.exception("SlicerMedClass: %s failed", key)
                self._showError(f"{key} failed unexpectedly ({type(e).__name__}: {e}); see the Python console")
        self._pending = still + self._pending
        if not self._pending:
            self.pollTimer.stop()
        self.updateButtons()

    def _guard(self, fn, *args):
        """Call ``fn`` and show a ValueError in the error label instead of raising it."""
        try:
            return fn(*args)
        except ValueError as e:
            self._showError(str(e))
        except Exception as e:
            logging.exception("SlicerMedClass")
            self._showError(f"unexpected error ({type(e).__name__}: {e}); see the Python console")
        return None

    def _requireClient(self):
        if self.client is None:
            raise ValueError("not connected to a MONAI Label server; enter its URL and click Connect")
        return self.client

    def _requireModel(self):
        model = self.ui.modelComboBox.currentText
        if not model:
            raise ValueError("the server lists no classification model; start it with a classification app")
        return model

    def _currentImageId(self):
        volume = self.ui.inputVolumeSelector.currentNode()
        return volume.GetAttribute(IMAGE_ID_ATTRIBUTE) if volume is not None else None

    def updateButtons(self, *args):
        volume = self.ui.inputVolumeSelector.currentNode()
        server = self._useServer()
        connected = self.client is not None
        hasModel = bool(self.ui.modelComboBox.currentText)
        self.ui.classifyButton.enabled = (volume is not None and "Classify" not in self._busy
                                          and (hasModel if server else bool(self.ui.checkpointPathLineEdit.currentPath)))
        self.ui.submitLabelButton.enabled = ((connected and bool(self._currentImageId())) if server
                                             else volume is not None) and "Submit" not in self._busy
        self.ui.nextSampleButton.enabled = connected and "Next sample" not in self._busy
        self.ui.trainButton.enabled = connected and hasModel and not self.trainTimer.isActive() \
            and "Refit" not in self._busy
        self.ui.fullFineTuneButton.enabled = connected and hasModel and not self.trainTimer.isActive() \
            and "Fine-tune" not in self._busy
        local = bool(self.ui.localFolderPathLineEdit.currentPath)
        self.ui.localRefitButton.enabled = local and "Local refit" not in self._busy
        self.ui.localFineTuneButton.enabled = local and "Local fine-tune" not in self._busy
        self.ui.stopTrainButton.enabled = connected
        self.ui.classifyButton.text = "Classifying..." if "Classify" in self._busy else "Classify"
        imageId = self._currentImageId()
        self.ui.imageIdLabel.text = (f"Image: {imageId} (from the server's datastore)" if imageId
                                     else "Image: none from the server yet (use Next sample).")

    def _setClasses(self, names, multilabel=False):
        """Class buttons, the label combo box and the heat-map class from the model's classes."""
        layout = self.ui.classButtonsLayout
        for button in self.classButtons:
            layout.removeWidget(button)
            button.deleteLater()
        self.classButtons = []
        self.classButtonGroup = qt.QButtonGroup(self.ui.classButtonsWidget)
        self.classButtonGroup.exclusive = not multilabel
        for name in names:
            button = qt.QPushButton(name)
            button.checkable = True
            button.toolTip = f"This image shows: {name}"
            button.connect("clicked(bool)", lambda checked, n=name: self.onClassButton(n, checked))
            self.classButtonGroup.addButton(button)
            layout.addWidget(button)
            self.classButtons.append(button)
        self.ui.labelComboBox.clear()
        self.ui.labelComboBox.addItems(list(names))
        self.ui.explainClassComboBox.clear()
        self.ui.explainClassComboBox.addItems([PREDICTED] + list(names))
        self.multilabel = multilabel

    def onClassButton(self, name, checked):
        if checked:
            self.ui.labelComboBox.setCurrentText(name)

    def _checkedClasses(self):
        return [b.text for b in self.classButtons if b.checked]

    # ------------------------------------------------------------------ model source

    def onVolumeChanged(self, node):
        self.updateButtons()

    def onCheckpointChanged(self, path):
        self.updateButtons()
        if not path or not os.path.exists(path) or self._useServer() or missing_packages():
            return
        names = self._guard(self.logic.classification.class_names, path)
        if names:
            task = self._guard(self.logic.classification.model_card, path) or {}
            self._setClasses(names, multilabel=(task.get("task", {}).get("type") == "multilabel"))

    def onConnect(self):
        self._showError("")
        url = self.ui.serverUrlLineEdit.text.strip()
        client = self._guard(MonaiLabelClient, url, 60.0, f"slicer-{os.getpid()}")
        if client is None:
            return

        def done(info):
            self.client = client
            self.serverInfo = info
            self.serverModels = client.classification_models(info)
            qt.QSettings().setValue("SlicerMedClass/ServerUrl", url)
            self.ui.modelComboBox.clear()
            self.ui.modelComboBox.addItems(list(self.serverModels))
            strategies = client.strategies(info) or list(DEFAULT_STRATEGIES)
            self.ui.strategyComboBox.clear()
            self.ui.strategyComboBox.addItems(strategies)
            name = info.get("name", "MONAI Label app")
            if self.serverModels:
                self.ui.serverInfoLabel.text = f"Connected to {name}: {len(self.serverModels)} classification model(s)."
            else:
                self.ui.serverInfoLabel.text = f"Connected to {name}, but it serves no classification model."
            self.ui.sourceTabWidget.currentIndex = 1
            self.onModelChanged()
            self._showServed(info)

        self._runInBackground("Connect", client.info, done, f"Connecting to {url}...")

    def onModelChanged(self, *args):
        model = self.ui.modelComboBox.currentText
        if model and model in self.serverModels:
            info = (self.serverInfo.get("models") or {}).get(model, {})
            self._setClasses(self.serverModels[model],
                             multilabel=str(info.get("task", "")).lower() == "multilabel")
            if self.client is not None and self.serverInfo:
                self._showServed(self.serverInfo)
        self.updateButtons()

    # ------------------------------------------------------------------ classify

    def onClassify(self):
        self._showError("")
        self._guard(self._classify)

    def _classify(self):
        volume = self.ui.inputVolumeSelector.currentNode()
        explain = self.ui.explainClassComboBox.currentText
        className = None if explain in ("", PREDICTED) else explain
        if self._useServer():
            client, model = self._requireClient(), self._requireModel()
            require_volume(volume)
            imageId = volume.GetAttribute(IMAGE_ID_ATTRIBUTE)
            folder = self.logic.downloadFolder()
            params = {"class_name": className} if className else None
            if imageId:
                call = lambda: client.infer_heatmap(model, folder, image_id=imageId, params=params)  # noqa: E731
            else:  # a volume of this scene: upload it (NRRD keeps its geometry)
                path = self.logic.saveVolumeForUpload(volume)
                call = lambda: client.infer_heatmap(model, folder, file=path, params=params)  # noqa: E731
            source = f"{client.server_url}/{model}"

            def done(value):
                answer, heatFile = value
                result = self.logic.classification.server_result(volume, answer, heatFile,
                                                                  self.serverModels.get(model), source)
                self._showResult(result, volume)

            self._runInBackground("Classify", call, done, f"Classifying with {model} on the server...")
            return
        if not self.logic.installDependencies(askConfirmation=True):
            raise ValueError("SlicerMedClass's Python dependencies are not installed; classify again to install them, "
                             "or use a MONAI Label server")
        classification = self.logic.classification
        job = classification.prepare(volume, self.ui.checkpointPathLineEdit.currentPath, className)
        self._runInBackground("Classify", lambda: classification.compute(job),
                              lambda finished: self._showResult(classification.publish(finished), volume),
                              "Classifying...")

    def _showResult(self, result, volume=None):
        self.result = result
        table = self.ui.probabilitiesTable
        table.setRowCount(0)
        if result is None:
            self.ui.predictionLabel.text = "No result yet."
            return
        rows = result.rows()
        table.setRowCount(len(rows))
        for r, (name, p) in enumerate(rows):
            table.setItem(r, 0, qt.QTableWidgetItem(name))
            item = qt.QTableWidgetItem(f"{p:.3f}")
            item.setTextAlignment(qt.Qt.AlignRight | qt.Qt.AlignVCenter)
            table.setItem(r, 1, item)
        text = f"<b>{result.label_text()}</b>"
        if result.heatmap_node is not None:
            text += f" &nbsp; heat map: {result.method} for '{result.explained_class}'"
            if result.slice_index is not None:
                text += f" (slice {result.slice_index}, the slice a 2D model classifies)"
        if result.note:
            text += f"<br><i>{result.note}</i>"
        self.ui.predictionLabel.text = text
        if isinstance(result.label, str) and result.label in [b.text for b in self.classButtons]:
            self.ui.labelComboBox.setCurrentText(result.label)
        if result.heatmap_node is not None:
            self.logic.classification.show_heatmap(result.heatmap_node, volume, self.ui.heatmapOpacitySlider.value,
                                                   self.ui.heatmapThresholdSlider.value, result.slice_index)
            slicer.util.resetSliceViews()

    def onOpacityChanged(self, value):
        self._guard(self.logic.classification.set_heatmap_opacity, value)

    def onThresholdChanged(self, value):
        if self.result is not None and self.result.heatmap_node is not None:
            self._guard(self.logic.classification.set_heatmap_threshold, self.result.heatmap_node, value)

    # ------------------------------------------------------------------ annotate

    def onSubmitLabel(self):
        self._showError("")
        self._guard(self._submitLabel)

    def _submitLabel(self):
        if not self._useServer():
            self._submitLocalLabel()
            return
        self._requireClient()
        imageId = self._currentImageId()
        if not imageId:
            raise ValueError("this volume did not come from the server's datastore; fetch images with Next sample")
        if getattr(self, "multilabel", False):
            labels = self._checkedClasses()
            label = None
            shown = ", ".join(labels) or "no finding"
        else:
            label = self.ui.labelComboBox.currentText
            if not label:
                raise ValueError("choose a class first (a class button or the Class box)")
            labels = None
            shown = label
        loop = self._loop()

        def done(run):
            # The app refitted the served model on this label (or says why not) before this returns.
            self._status(f"Saved '{shown}' for {imageId}. {run_text(run)}", 10000)
            self.ui.trainStatusLabel.text = run_text(run)
            self.onRefreshServed()
            if self.ui.autoNextCheckBox.checked:
                self.onNextSample()

        self._runInBackground("Submit", lambda: loop.submit(imageId, label, labels), done,
                              f"Submitting '{shown}' for {imageId} and waiting for the server's refit...")

    def _submitLocalLabel(self):
        volume = self.ui.inputVolumeSelector.currentNode()
        require_volume(volume)
        names = self._checkedClasses() if self.multilabel else [self.ui.labelComboBox.currentText]
        if not self.multilabel and not names[0]:
            raise ValueError("choose a class first (a class button or the Class box)")
        trainer = self._localTrainer()
        path = self.logic.saveVolumeForTraining(volume, trainer.folder / "images")
        key = volume.GetName()
        trainer.add_label(key, path, names if self.multilabel else names[0])
        self.ui.localStatusLabel.text = (f"Labelled '{key}' as {', '.join(names) or 'no finding'}; "
                                         f"{len(trainer.labels)} labelled image(s). Refit head to train on them.")

    def onNextSample(self):
        self._showError("")
        self._guard(self._nextSample)

    def _nextSample(self):
        client = self._requireClient()
        strategy = self.ui.strategyComboBox.currentText
        folder = self.logic.downloadFolder()

        def fetch():
            # Scores the datastore first when an uncertainty strategy has no scores yet.
            sample = client.next_sample_scored(strategy, info=self.serverInfo or None)
            if sample is None:
                return None
            return sample["id"], client.download_image(sample["id"], folder)

        def done(value):
            if value is None:
                self._status(f"No unlabelled image left for strategy {strategy}", 10000)
                self.ui.imageIdLabel.text = "Every image in the datastore is labelled."
                return
            imageId, path = value
            volume = slicer.util.loadVolume(str(path))
            volume.SetAttribute(IMAGE_ID_ATTRIBUTE, imageId)
            self.ui.inputVolumeSelector.setCurrentNode(volume)
            for button in self.classButtons:
                button.checked = False
            slicer.util.setSliceViewerLayers(background=volume, foreground=None, fit=True)
            self.updateButtons()
            if self.ui.modelComboBox.currentText:
                self.ui.sourceTabWidget.currentIndex = 1
                self.onClassify()

        self._runInBackground("Next sample", fetch, done, f"Asking the server for the next sample ({strategy})...")

    # ------------------------------------------------------------------ local training (no server)

    def onLocalSettingsChanged(self, *args):
        self.localTrainer = None  # made again, with the new folder / init / classes, on next use
        self.updateButtons()

    def _localTrainer(self):
        if self.localTrainer is not None:
            return self.localTrainer
        folder = self.ui.localFolderPathLineEdit.currentPath
        if not folder:
            raise ValueError("choose a working folder for the local model (Local checkpoint tab)")
        if not self.logic.installDependencies(askConfirmation=True):
            raise ValueError("SlicerMedClass's Python dependencies are not installed; they are needed to train")
        checkpoint = self.ui.checkpointPathLineEdit.currentPath or None
        working = os.path.join(folder, "model.pt")
        if os.path.isfile(working) or (checkpoint and os.path.abspath(checkpoint) == os.path.abspath(working)):
            checkpoint = None  # the folder's own model is the working one
        classes = [c.strip() for c in self.ui.localClassesLineEdit.text.split(",") if c.strip()] or None
        self.localTrainer = LocalTrainer(folder, checkpoint=checkpoint, init=self.ui.initPathLineEdit.currentPath or None,
                                         classes=classes, device=self.logic.classification.device)
        self._setClasses(self.localTrainer.classes, multilabel=self.localTrainer.task.type == "multilabel")
        return self.localTrainer

    def onLocalRefit(self):
        self._showError("")
        self._guard(self._localRun, "Local refit", lambda trainer: trainer.refit(), "Refitting the head...")

    def onLocalFineTune(self):
        self._showError("")
        epochs = int(self.ui.epochsSpinBox.value)
        self._guard(self._localRun, "Local fine-tune", lambda trainer: trainer.fine_tune(epochs=epochs),
                    f"Fine-tuning the local model ({epochs} epochs)...")

    def _localRun(self, key, fn, message):
        trainer = self._localTrainer()

        def done(run):
            self.ui.localStatusLabel.text = run_text(run)
            if run.get("published") and trainer.checkpoint is not None:
                # Classify with the new working model from now on.
                self.ui.checkpointPathLineEdit.currentPath = str(trainer.checkpoint)
            init = trainer.served_init()
            if init:
                self.ui.localStatusLabel.text += f" Encoder initialised from {init.get('name') or init.get('path')}."

        self._runInBackground(key, lambda: fn(trainer), done, message)

    # ------------------------------------------------------------------ training

    def onTrain(self):
        self._showError("")
        self._guard(self._train)

    def _loop(self):
        return AnnotationLoop(self._requireClient(), self._requireModel(), self.ui.strategyComboBox.currentText)

    def _train(self):
        loop = self._loop()

        def done(run):
            self.ui.trainStatusLabel.text = run_text(run)
            self.onRefreshServed()

        self._runInBackground("Refit", loop.refit_now, done, f"Refitting the head of {loop.model} on the server...")

    def onFullFineTune(self):
        self._showError("")
        self._guard(self._fullFineTune)

    def _fullFineTune(self):
        loop = self._loop()
        epochs = int(self.ui.epochsSpinBox.value)

        def done(run):
            self.ui.trainStatusLabel.text = run_text(run)
            self.onRefreshServed()

        self._runInBackground("Fine-tune", lambda: loop.full_fine_tune(epochs), done,
                              f"Fine-tuning {loop.model} on the server ({epochs} epochs)...")
        self.ui.trainStatusLabel.text = f"Full fine-tune of {loop.model} submitted."
        self.ui.trainProgressBar.setRange(0, 0)  # busy until the first status
        self.trainTimer.start()

    def onRefreshServed(self):
        if self.client is not None and "Served model" not in self._busy:
            self._runInBackground("Served model", self.client.info, self._showServed)

    def _showServed(self, info):
        model = self.ui.modelComboBox.currentText
        if not model or self.client is None:
            self.ui.servedModelLabel.text = "Served model: none."
            return
        self.serverInfo = info
        self.ui.servedModelLabel.text = AnnotationLoop(self.client, model).served(info).init_text()

    def onStopTrain(self):
        self._showError("")
        client = self._guard(self._requireClient)
        if client is not None:
            self._runInBackground("Stop", client.stop_train, lambda _: self.onTrainTimer(), "Stopping training...")

    def onTrainTimer(self):
        if self.client is None or "Training status" in self._busy:
            return
        self._runInBackground("Training status", self.client.train_status, self._showTraining)

    def _showTraining(self, task):
        progress = training_progress(task)
        self.ui.trainStatusLabel.text = progress.message
        if progress.fraction is None and progress.running:
            self.ui.trainProgressBar.setRange(0, 0)
        else:
            self.ui.trainProgressBar.setRange(0, 100)
            self.ui.trainProgressBar.value = int(round(100 * (progress.fraction or 0.0)))
        if not progress.running:
            self.trainTimer.stop()
        self.updateButtons()


#
# SlicerMedClassLogic
#


class SlicerMedClassLogic(ScriptedLoadableModuleLogic):
    """Slicer-side logic: dependencies, the scene's ClassificationLogic, files for the server.

    Usable without the widget, e.g. from the Python console::

        logic = slicer.util.getModuleLogic("SlicerMedClass")
        logic.installDependencies()
        result = logic.classification.classify(getNode("MRHead"), "/path/to/model.pt")
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self._classification = None
        self._tempdir = None

    @property
    def classification(self):
        """The GUI-free ClassificationLogic on ``slicer.mrmlScene``."""
        if self._classification is None or self._classification.scene is not slicer.mrmlScene:
            self._classification = ClassificationLogic(slicer.mrmlScene, file_for_instance=self._fileForInstance)
        return self._classification

    @staticmethod
    def _fileForInstance(uid):
        database = getattr(slicer, "dicomDatabase", None)
        return database.fileForInstance(uid) if database is not None and database.isOpen else None

    @staticmethod
    def medclassRequirement():
        """What pip installs for medclass; the setting SlicerMedClass/MedClassRequirement overrides it."""
        return slicer.util.settingsValue("SlicerMedClass/MedClassRequirement", MEDCLASS_REQUIREMENT)

    def missingDependencies(self):
        return missing_packages(self.medclassRequirement())

    def installDependencies(self, askConfirmation=True):
        """Install torch (PyTorch extension) and medclass (pip) if missing, asking first.

        Returns
        -------
        bool
            True when everything is installed; False when the user declined.
        """
        missing = self.missingDependencies()
        if not missing:
            return True
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(install_plan(missing),
                                                                      "SlicerMedClass: install Python packages"):
            return False
        for package in missing:
            if package.module == "torch":
                try:
                    import PyTorchUtils
                except ModuleNotFoundError:
                    raise ValueError("torch is installed through the PyTorch extension, which is missing: install "
                                     "'PyTorch' from the Extensions Manager, restart Slicer and try again") from None
                torchLogic = PyTorchUtils.PyTorchUtilsLogic()
                if not torchLogic.torchInstalled():
                    with slicer.util.WaitCursor():
                        torch = torchLogic.installTorch(askConfirmation=False,
                                                        torchVersionRequirement=TORCH_REQUIREMENT)
                    if torch is None:
                        raise ValueError(f"PyTorch (torch{TORCH_REQUIREMENT}) could not be installed; install it "
                                         "from the PyTorch Utils module and try again")
            else:
                with slicer.util.WaitCursor():
                    slicer.util.pip_install(package.requirement)
        still = self.missingDependencies()
        if still:
            raise ValueError("installed, but still cannot import " + ", ".join(m.module for m in still)
                             + "; restart Slicer and try again")
        return True

    def downloadFolder(self):
        """A per-session folder for images fetched from the server and volumes uploaded to it."""
        if self._tempdir is None or not os.path.isdir(self._tempdir):
            self._tempdir = tempfile.mkdtemp(prefix="SlicerMedClass-", dir=slicer.app.temporaryPath)
        return self._tempdir

    def saveVolumeForTraining(self, volumeNode, folder):
        """Write a volume as NRRD into ``folder`` (the local model's images), named after the volume."""
        require_volume(volumeNode)
        os.makedirs(folder, exist_ok=True)
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in volumeNode.GetName()) or "image"
        path = os.path.join(str(folder), f"{safe}.nrrd")
        if not slicer.util.saveNode(volumeNode, path, {"useCompression": 0}):
            raise ValueError(f"cannot write volume {volumeNode.GetName()!r} to {path}; check the folder's disk space")
        return path

    def saveVolumeForUpload(self, volumeNode):
        """Write a volume as NRRD (geometry kept) for MONAI Label's infer-by-file."""
        require_volume(volumeNode)
        path = os.path.join(self.downloadFolder(), f"{volumeNode.GetID()}.nrrd")
        if not slicer.util.saveNode(volumeNode, path, {"useCompression": 0}):
            raise ValueError(f"cannot write volume {volumeNode.GetName()!r} to {path} for upload; "
                             "check the disk space of Slicer's temporary folder")
        return path


#
# SlicerMedClassTest
#


class SlicerMedClassTest(ScriptedLoadableModuleTest):
    """Self-test, run in Slicer (Developer mode: Reload and Test, or ctest).

    Classifies a real MR image that ships with pydicom (loaded through Slicer's
    DICOM reader) with a small untrained checkpoint made by medclass, and checks
    the probabilities, the heat map's geometry and its place in the scene.
    """

    def setUp(self):
        slicer.mrmlScene.Clear(0)

    def runTest(self):
        self.setUp()
        self.test_ClassifyVolumeHeatMapGeometry()
        self.setUp()
        self.test_ErrorsAreValueErrors()

    def _checkpoint(self):
        from medclass.checkpoint import make_card, save_checkpoint
        from medclass.models import create_model
        from medclass.tasks import Task

        task = Task("binary", ["normal", "abnormal"])
        args = {"spatial_dims": 2, "in_channels": 1, "num_outputs": 2, "image_size": 32}
        card = make_card("resnet18", args, task, {"spatial_dims": 2, "image_size": 32, "channels": 1})
        path = os.path.join(slicer.app.temporaryPath, "SlicerMedClassTest-model.pt")
        return save_checkpoint(path, create_model("resnet18", **args), card)

    def test_ClassifyVolumeHeatMapGeometry(self):
        self.delayDisplay("Installing dependencies if needed")
        logic = SlicerMedClassLogic()
        self.assertTrue(logic.installDependencies(askConfirmation=False))
        from pydicom.data import get_testdata_file

        volume = slicer.util.loadVolume(get_testdata_file("MR_small.dcm"))
        checkpoint = self._checkpoint()
        self.delayDisplay("Classifying")
        result = logic.classification.classify(volume, checkpoint)
        self.assertAlmostEqual(sum(result.probabilities.values()), 1.0, places=4)
        self.assertIn(result.label, ["normal", "abnormal"])
        heat = result.heatmap_node
        self.assertIsNotNone(heat)
        self.assertIs(slicer.mrmlScene.GetNodeByID(heat.GetID()), heat)
        self.assertEqual(heat.GetImageData().GetDimensions(), volume.GetImageData().GetDimensions())
        a, b = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(a)
        heat.GetIJKToRASMatrix(b)
        for i in range(4):
            for j in range(4):
                self.assertAlmostEqual(a.GetElement(i, j), b.GetElement(i, j), places=6)
        values = slicer.util.arrayFromVolume(heat)
        self.assertGreaterEqual(float(values.min()), 0.0)
        self.assertLessEqual(float(values.max()), 1.0)
        logic.classification.show_heatmap(heat, volume, opacity=0.5)
        composite = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceCompositeNode()
        self.assertEqual(composite.GetForegroundVolumeID(), heat.GetID())
        self.delayDisplay("Test passed")

    def test_ErrorsAreValueErrors(self):
        logic = SlicerMedClassLogic()
        with self.assertRaises(ValueError):
            logic.classification.classify(None, "model.pt")
        volume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
        with self.assertRaises(ValueError):
            logic.classification.classify(volume, os.path.join(slicer.app.temporaryPath, "missing.pt"))
        self.delayDisplay("Test passed")
