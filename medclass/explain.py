"""Why did the model say that? Grad-CAM for CNNs, attention maps for attention models.

The heat map comes back at the size of the preprocessed input and, with
:func:`to_image_space`, at the size of the original image, so that the Slicer
module can show it aligned with the volume and the CLI can overlay it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medclass.errors import MedClassError
from medclass.inference import Classifier, calibrated_probabilities


@dataclass
class Explanation:
    """A heat map in [0, 1] and what it explains."""

    heatmap: np.ndarray  # (H, W) or (D, H, W), preprocessed input size
    input: np.ndarray  # the preprocessed image, (C, H, W) or (C, D, H, W)
    class_name: str
    method: str  # "gradcam" | "saliency" | "attention"
    probability: float | None = None  # the model's probability of ``class_name``
    note: str | None = None  # why the map is not the method first asked for (e.g. no positive Grad-CAM evidence)
    slice_index: int | None = None  # the slice of a volume a 2D model classified (its middle one)
    slices: int | None = None  # how many slices that volume has


def target_index(classifier: Classifier, probs: np.ndarray, class_name: str | None) -> tuple[int, str]:
    """Which logit to explain: the named class, else the predicted (binary: positive) one."""
    task = classifier.task
    if class_name is not None:
        if class_name not in task.classes:
            raise MedClassError(f"unknown class {class_name!r}", f"choose one of {', '.join(task.classes)}")
        k = task.classes.index(class_name)
    elif task.type == "binary":
        k = 1
    else:  # multi-class, ordinal and multi-label: the most probable class
        k = int(np.argmax(probs))
    name = task.classes[k]
    if task.type == "ordinal":  # logit j is "grade > j": explain the evidence for reaching grade k
        k = max(0, k - 1)
    return k, name


def explain(classifier: Classifier, image, class_name: str | None = None) -> Explanation:
    """Heat map for one :class:`~medclass.io.ImageData`.

    Grad-CAM (MONAI's implementation) on the model's ``cam_layer``; models
    without one (ViT, attention-MIL) return their own attention map.

    A Grad-CAM map is never silently blank: when every channel weight is negative
    (the ReLU'd map is all zero, i.e. the layer holds no evidence *for* the class),
    the map falls back to input-gradient saliency (:func:`saliency`), ``method`` says
    ``"saliency"`` and ``note`` says why.
    """
    loaded = classifier.loaded
    if not loaded.is_torch:
        raise MedClassError(f"{loaded.name} is a classic feature model and has no heat map",
                            "explain a CNN or attention model instead")
    model = loaded.model
    x = classifier.preprocess(image)[None].to(loaded.device)
    extra = classifier.extra_inputs([image.meta])
    extra = {k: v.to(loaded.device) for k, v in (extra or {}).items()}
    with torch.no_grad():
        probs = calibrated_probabilities(loaded, model(x, **extra)).cpu().numpy()[0]
    k, name = target_index(classifier, probs, class_name)
    probability = float(probs[classifier.classes.index(name)])
    method = model.explanation_method(x) if hasattr(model, "explanation_method") else "gradcam"
    note = None
    if method == "gradcam" and getattr(model, "cam_layer", None):
        from monai.visualize import GradCAM

        # MONAI's default post-processing rescales to [1, 0], i.e. *inverts* the
        # map; keep the raw (ReLU'd, upsampled) CAM and normalise it below.
        cam = GradCAM(nn_module=model, target_layers=model.cam_layer, postprocessing=lambda a: a)
        with torch.enable_grad():
            heat = cam(x, class_idx=k, **extra)[0, 0].detach().float().cpu().numpy()
        if not heat.max() > heat.min():
            heat = saliency(model, x, k, extra)
            method = "saliency"
            note = (f"Grad-CAM found no positive evidence for {name!r} in {model.cam_layer}; "
                    "showing input-gradient saliency instead")
    elif hasattr(model, "attention_map"):
        with torch.no_grad():
            heat = model.attention_map(x)[0].float().cpu().numpy()
        method = "attention"
    else:
        raise MedClassError(f"{loaded.name} has neither a Grad-CAM layer nor an attention map",
                            "register a cam_layer for it")
    heat = heat - heat.min()
    heat = heat / heat.max() if heat.max() > 0 else heat
    slice_index = slices = None
    if image.array.ndim == 4 and x.dim() == 4:  # a volume given to a 2D model: SelectSpatialDims took D // 2
        slices = int(image.array.shape[1])
        slice_index = slices // 2
    return Explanation(heat.astype(np.float32), x[0].cpu().numpy(), name, method, probability, note,
                       slice_index, slices)


def saliency(model: torch.nn.Module, x: torch.Tensor, k: int, extra: dict | None = None) -> np.ndarray:
    """Input-gradient saliency of logit ``k``: ``|d logit / d x|``, summed over channels, lightly smoothed.

    The fallback when Grad-CAM is all zero. Unlike Grad-CAM it needs no positive
    channel weight, so it is zero only where the model does not depend on the input
    at all. A Gaussian (sigma 1 pixel) removes the checkerboard of strided convolutions.
    """
    from monai.transforms import GaussianSmooth

    x = x.detach().clone().requires_grad_(True)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            logit = model(x, **(extra or {}))[0, k]
            (grad,) = torch.autograd.grad(logit, x)
    finally:
        model.train(was_training)
    sal = grad[0].abs().sum(dim=0, keepdim=True).float().cpu()
    return GaussianSmooth(sigma=1.0)(sal)[0].numpy()


def to_image_space(heatmap: np.ndarray, spatial_shape: tuple[int, ...]) -> np.ndarray:
    """Resize a heat map to the original image's spatial shape (H, W) or (D, H, W).

    Exact when the preprocessing is a plain resize (no foreground crop), which
    is the default.
    """
    t = torch.from_numpy(np.ascontiguousarray(heatmap))[None, None].float()
    mode = "bilinear" if t.dim() == 4 else "trilinear"
    if t.dim() - 2 != len(spatial_shape):
        raise ValueError(f"heat map of shape {heatmap.shape} cannot be resized to {spatial_shape}")
    return F.interpolate(t, size=tuple(spatial_shape), mode=mode, align_corners=False)[0, 0].numpy()


def overlay_titles(explanation: Explanation) -> tuple[str, str]:
    """The titles :func:`save_overlay` gives its two panels: where the image is from, and what the map says.

    The input's title names the slice shown (the one a 2D model classified, or a 3D
    map's middle slice); the map's names the method, the class and the model's
    probability of it.
    """
    where = ""
    if explanation.slice_index is not None:
        where = f", slice {explanation.slice_index + 1} of {explanation.slices}"
    if explanation.heatmap.ndim == 3:  # a volume: the overlay shows its middle slice
        depth = explanation.heatmap.shape[0]
        where = f", slice {depth // 2 + 1} of {depth}"
    p = "" if explanation.probability is None else f" (p = {explanation.probability:.2f})"
    return f"input{where}", f"{explanation.method}: {explanation.class_name}{p}"


def save_overlay(explanation: Explanation, path: str | Path, title: str | None = None) -> Path:
    """Write the input in grey with the heat map in colour over it, as PNG (titles: :func:`overlay_titles`)."""
    # An Agg canvas of our own: switching matplotlib's global backend would
    # disturb a host application's GUI (Slicer runs Qt).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    img, heat = explanation.input, explanation.heatmap
    if heat.ndim == 3:  # a volume: show its middle slice
        mid = heat.shape[0] // 2
        heat, img = heat[mid], img[:, mid]
    base = img.mean(axis=0) if img.shape[0] != 3 else np.moveaxis(img, 0, -1)
    base = (base - base.min()) / (np.ptp(base) or 1.0)
    fig = Figure(figsize=(8, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for ax in axes:
        ax.imshow(base, cmap="gray" if base.ndim == 2 else None)
        ax.axis("off")
    im = axes[1].imshow(heat, cmap="jet", alpha=0.45, vmin=0, vmax=1)
    fig.colorbar(im, ax=axes[1], fraction=0.046)
    input_title, map_title = overlay_titles(explanation)
    axes[0].set_title(input_title)
    axes[1].set_title(map_title)
    if explanation.note:
        fig.text(0.5, 0.01, explanation.note, ha="center", fontsize=8, wrap=True)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
