"""Classic family: HOG + intensity histogram features, SVM or random forest (scikit-learn).

The traditional baseline the deep models are compared against. The builder returns a
:class:`ClassicClassifier`, not a torch module: ``fit`` / ``predict_proba`` on numpy
arrays ``(N, C, H, W)``, and ``state()`` / ``from_state()`` bytes for checkpoints.
"""

from __future__ import annotations

import pickle

import numpy as np
from skimage.feature import hog
from skimage.transform import resize
from sklearn.calibration import CalibratedClassifierCV
from sklearn.ensemble import RandomForestClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from medclass.errors import MedClassError
from medclass.models.registry import register_model

HISTOGRAM_BINS = 32


class ClassicClassifier:
    """Hand-crafted features + a scikit-learn classifier.

    Parameters
    ----------
    kind : {"svm", "rf"}
        RBF SVM with Platt-scaled probabilities, or a random forest.
    num_outputs : int
        Number of classes (at least 2); ``predict_proba`` has this many columns.
    image_size : int
        Side the images are resized to before HOG.
    seed : int
        Random state of the classifier.
    """

    def __init__(self, kind: str, num_outputs: int = 2, image_size: int = 64, seed: int = 0):
        if kind not in ("svm", "rf"):
            raise ValueError(f"kind must be 'svm' or 'rf', got {kind!r}")
        self.kind = kind
        self.num_classes = max(int(num_outputs), 2)
        self.image_size = int(image_size)
        self.seed = seed
        if kind == "svm":
            # An RBF SVC fits 3,000 x ~1,800 features in seconds; balanced weights
            # because medical classes rarely are.
            # Probabilities by Platt scaling, the way scikit-learn >= 1.9 asks for it.
            clf = CalibratedClassifierCV(SVC(class_weight="balanced", random_state=seed), ensemble=False,
                                         method="sigmoid")
        else:
            clf = RandomForestClassifier(n_estimators=300, class_weight="balanced", n_jobs=-1, random_state=seed)
        self.pipeline = Pipeline([("scale", StandardScaler()), ("clf", clf)])
        self.fitted = False

    def features(self, X: np.ndarray) -> np.ndarray:
        """HOG (9 orientations, 8 px cells, 2x2 blocks) + a 32-bin intensity histogram.

        Parameters
        ----------
        X : np.ndarray
            ``(N, C, H, W)`` float images; channels are averaged to grey.

        Returns
        -------
        np.ndarray
            ``(N, F)`` float32.
        """
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 4:
            raise MedClassError(
                f"classic models take 2D images (N, C, H, W), got an array of shape {X.shape}",
                "use a torch model for 3D volumes, or pass slices",
            )
        s = self.image_size
        rows = []
        for img in X.mean(axis=1):
            if img.shape != (s, s):
                img = resize(img, (s, s), anti_aliasing=True, preserve_range=True)
            # Min-max per image so that features do not depend on the scanner's units.
            lo, hi = float(img.min()), float(img.max())
            img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
            h = hog(img, orientations=9, pixels_per_cell=(8, 8), cells_per_block=(2, 2), feature_vector=True)
            hist, _ = np.histogram(img, bins=HISTOGRAM_BINS, range=(0.0, 1.0))
            rows.append(np.concatenate([h, hist / img.size]).astype(np.float32))
        return np.stack(rows) if rows else np.zeros((0, 0), np.float32)

    def fit(self, X: np.ndarray, y: np.ndarray) -> ClassicClassifier:
        """Fit on images ``X (N, C, H, W)`` and integer labels ``y (N,)``."""
        y = np.asarray(y)
        if y.ndim != 1:
            raise MedClassError(
                f"classic models do not support multi-label targets (labels of shape {y.shape})",
                "use a torch model (e.g. densenet121) for multi-label tasks",
            )
        if len(np.unique(y)) < 2:
            raise MedClassError("the training labels hold a single class", "add examples of the other classes")
        self.pipeline.fit(self.features(X), y.astype(int))
        self.fitted = True
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Class probabilities ``(N, num_classes)``; a class absent from training gets 0."""
        if not self.fitted:
            raise MedClassError("this classic model has not been trained", "call fit() or load a checkpoint")
        p = self.pipeline.predict_proba(self.features(X))
        out = np.zeros((p.shape[0], max(self.num_classes, int(self.pipeline.classes_.max()) + 1)))
        out[:, self.pipeline.classes_.astype(int)] = p
        return out

    def state(self) -> bytes:
        """The fitted model as bytes, for a checkpoint."""
        return pickle.dumps(self, protocol=pickle.HIGHEST_PROTOCOL)

    @classmethod
    def from_state(cls, data: bytes) -> ClassicClassifier:
        """Rebuild from :meth:`state` bytes.

        Pickle runs code on load: only load checkpoints you trust, as with
        ``torch.load(weights_only=False)``.
        """
        obj = pickle.loads(data)
        if not isinstance(obj, cls):
            raise MedClassError("the checkpoint's classic model state is not a ClassicClassifier",
                                "re-save it with ClassicClassifier.state()")
        return obj


@register_model("hog-svm", "classic", spatial_dims=(2,), description="HOG + intensity histogram, RBF SVM")
def hog_svm(spatial_dims=2, in_channels=1, num_outputs=2, image_size=64, seed: int = 0) -> ClassicClassifier:
    return ClassicClassifier("svm", num_outputs, image_size, seed)


@register_model("hog-rf", "classic", spatial_dims=(2,), description="HOG + intensity histogram, random forest (300 trees)")
def hog_rf(spatial_dims=2, in_channels=1, num_outputs=2, image_size=64, seed: int = 0) -> ClassicClassifier:
    return ClassicClassifier("rf", num_outputs, image_size, seed)
