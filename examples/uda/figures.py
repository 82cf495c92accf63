r"""Pictures of a run: pseudo-label panels (image | static | dynamic | hybrid | ground truth) in the class
table's palette (Cityscapes' by default), and curves of target mIoU and pseudo-label coverage over training."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .classes import CITYSCAPES_PALETTE

# the default colours: the Cityscapes class table's (cityscapesScripts' train-id colours); ignore (255) is black
PALETTE = np.array(CITYSCAPES_PALETTE, dtype=np.uint8)


def colorize(labels: np.ndarray, palette: Sequence[Sequence[int]] | np.ndarray | None = None) -> np.ndarray:
    """(H, W) train ids -> (H, W, 3) uint8 in ``palette`` (K RGB colours; default the Cityscapes palette), ignore
    and ids >= K black."""
    palette = PALETTE if palette is None else np.asarray(palette, dtype=np.uint8)
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[: len(palette)] = palette
    return lut[np.asarray(labels).clip(0, 255).astype(np.uint8)]


def pseudo_label_panel(rows: Sequence[dict[str, np.ndarray]], path: str | Path, *,
                       class_names: Sequence[str] | None = None,
                       palette: Sequence[Sequence[int]] | np.ndarray | None = None, min_height: int = 128) -> Path:
    """Save a panel, one row per image: image | static | dynamic | hybrid | ground truth, and a legend of the
    class colours (the classes that appear in the panel, with ``class_names``; black is ignore / unlabelled).
    ``palette``: the K class colours (the run's class table; default the Cityscapes palette).

    Each row is a dict with ``image`` (H, W, 3) uint8 and ``static``, ``dynamic``, ``hybrid`` and optionally
    ``gt`` (H, W) train ids (the ground-truth column is drawn when the first row has one). The caller hands in
    what it already computed (the pipeline: its last training batch); nothing is read or recomputed here. Small
    images are enlarged (nearest) to ``min_height`` so the labels stay readable.
    """
    keys = ("static", "dynamic", "hybrid") + (("gt",) if rows[0].get("gt") is not None else ())
    titles = ("image", *keys[:3], *(("ground truth",) if "gt" in keys else ()))
    tiles = []
    for row in rows:
        cells = [row["image"]] + [colorize(row[k], palette) for k in keys]
        tiles.append(np.concatenate([np.pad(c, ((0, 0), (0, 4), (0, 0)), constant_values=255) for c in cells], 1))
    grid = np.concatenate([np.pad(t, ((0, 4), (0, 0), (0, 0)), constant_values=255) for t in tiles], 0)
    scale = max(1, int(np.ceil(min_height / rows[0]["image"].shape[0])))
    image = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    palette = PALETTE if palette is None else np.asarray(palette, dtype=np.uint8)
    present = sorted({int(v) for row in rows for k in keys for v in np.unique(row[k]) if v < len(palette)})
    legend = _legend(present, class_names, image.width, palette)
    out = Image.new("RGB", (image.width, 14 + image.height + legend.height), "white")
    draw = ImageDraw.Draw(out)
    cell_w = (rows[0]["image"].shape[1] + 4) * scale
    for i, title in enumerate(titles):
        draw.text((i * cell_w + 2, 1), title, fill="black")
    out.paste(image, (0, 14))
    out.paste(legend, (0, 14 + image.height))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save(path)
    return path


def _legend(classes: Sequence[int], class_names: Sequence[str] | None, width: int,
            palette: np.ndarray = PALETTE) -> Image.Image:
    """Colour swatches with the class names (or train ids), wrapped to ``width``, and black = ignore."""
    entries = [(tuple(int(c) for c in palette[k]), class_names[k] if class_names else str(k)) for k in classes]
    entries.append(((0, 0, 0), "ignore"))
    item_w, line_h = 110, 14
    per_line = max(1, width // item_w)
    lines = -(-len(entries) // per_line)
    legend = Image.new("RGB", (width, 4 + lines * line_h), "white")
    draw = ImageDraw.Draw(legend)
    for i, (colour, name) in enumerate(entries):
        x, y = (i % per_line) * item_w + 2, 2 + (i // per_line) * line_h
        draw.rectangle((x, y + 1, x + 10, y + 11), fill=colour, outline="gray")
        draw.text((x + 14, y), name, fill="black")
    return legend


def training_curves(history: dict[str, list], path: str | Path) -> Path:
    """Plot target mIoU (per evaluation) and pseudo-label coverage (per logged step) against iterations.

    ``history`` holds ``eval_iter``/``eval_miou`` (optionally ``control_iter``/``control_miou``; with round
    decisions ``undone_*``, ``delivered_*`` and ``delivered_control_*``, markers of their own) and
    ``log_iter``/``coverage_static``/``coverage_dynamic``/``coverage_hybrid``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.plot(history.get("eval_iter", []), history.get("eval_miou", []), "o-", label="source-only, then adapted")
    if history.get("control_iter"):
        ax1.plot(history["control_iter"], history["control_miou"], "s--", label="source-only, same budget")
    if history.get("undone_iter"):  # --round-decisions: undone rounds (their budget was spent again)
        ax1.plot(history["undone_iter"], history["undone_miou"], "rx", markersize=9, label="undone round")
    for key, name in (("delivered", "delivered (best-scored)"), ("delivered_control", "control delivered")):
        if history.get(f"{key}_iter"):
            ax1.plot(history[f"{key}_iter"], history[f"{key}_miou"], "*", markersize=12, label=name)
    ax1.legend()
    ax1.set_xlabel("iterations in the model (stage 1 + stage 2)")
    ax1.set_ylabel("target val mIoU (%)")
    ax1.grid(alpha=0.3)
    for key, name in (("coverage_static", "static"), ("coverage_dynamic", "dynamic"), ("coverage_hybrid", "hybrid"),
                      ("pseudo_weight", "confident share (train_daformer's pseudo-label weight)")):
        if history.get(key):
            ax2.plot(history["log_iter"], history[key], label=name)
    ax2.set_xlabel("adaptation iteration")
    ax2.set_ylabel("labelled target pixels (%)")
    ax2.legend()
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
