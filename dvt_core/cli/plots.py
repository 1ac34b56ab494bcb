"""Pictures the CLI writes: the accuracy-MACs curve of ``dvt evaluate`` and the exit gallery of ``dvt demo``.

matplotlib is imported lazily with the non-interactive Agg backend, so no display is needed; every
figure is written atomically (a temporary file renamed into place) as PNG.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        from dvt_core.errors import InputError

        raise InputError("writing a picture needs matplotlib: pip install 'dvt[plots]'") from None

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


PLOT_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".svg": "svg", ".pdf": "pdf"}


def _save(fig, path, dpi: int = 120, force: bool = False) -> Path:
    """Write ``fig`` in the format its suffix names (PNG, JPEG, SVG, PDF); an existing file needs ``force``."""
    from dvt_core.checkpoint.files import atomic_path
    from dvt_core.errors import InputError

    path = Path(path)
    fmt = PLOT_FORMATS.get(path.suffix.lower())
    if fmt is None:
        _pyplot().close(fig)
        raise InputError(f"{path}: a picture is written as {', '.join(PLOT_FORMATS)}; name it with one of these")
    with atomic_path(path, force=force, parents=False) as tmp:
        fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def accuracy_macs_plot(path, model: str, exit_macs: Sequence[float], anytime_accuracy: Sequence[float],
                       budgets: Sequence[dict] = (), baselines: Sequence[dict] = (), grids: Sequence[int] = (),
                       title: Optional[str] = None, force: bool = False, default: Optional[dict] = None,
                       unit: tuple = ("average MACs per image (millions)", 1e6, "M MACs")) -> Path:
    """Accuracy (percent) against average MACs per image (or another cost: ``unit`` is the axis label, the
    scale its values are divided by and the suffix of a printed value; the costs stay under ``macs`` keys).

    ``default``: the checkpoint's default operating point (``macs``, ``accuracy``), marked with a star.
    ``budgets``: dicts with ``macs`` and ``accuracy`` (the DVT budget curve, drawn as a line);
    ``exit_macs``/``anytime_accuracy``: every exit on all images (markers); ``baselines``: dicts with
    ``model``, ``macs``, ``accuracy`` (static models, points). MACs are shown in millions.
    """
    plt = _pyplot()
    label, scale, suffix = unit
    fig, ax = plt.subplots(figsize=(7.0, 4.8))
    if budgets:
        pts = sorted((b["macs"], b["accuracy"]) for b in budgets)
        ax.plot([m / scale for m, _ in pts], [a for _, a in pts], "-", color="tab:blue", lw=1.8, marker=".",
                ms=4, label=f"{model}: budgeted early exit")
    ax.plot([m / scale for m in exit_macs], list(anytime_accuracy), "D", color="tab:orange", ms=7, ls="none",
            label=f"{model}: every image at one exit")
    for k, (m, a) in enumerate(zip(exit_macs, anytime_accuracy)):
        tag = f"exit {k + 1}" + (f" ({grids[k]}x{grids[k]})" if k < len(grids) else "")
        last = k == len(exit_macs) - 1  # the rightmost label goes to the left of its point, inside the axes
        ax.annotate(tag, (m / scale, a), textcoords="offset points", xytext=(-6 if last else 6, -12), fontsize=8,
                    color="tab:orange", ha="right" if last else "left", annotation_clip=True)
    if default:
        ax.plot([default["macs"] / scale], [default["accuracy"]], "*", color="tab:red", ms=14, ls="none",
                label=f"default thresholds: {default['accuracy']:.2f}% at {default['macs'] / scale:.2f}{suffix}")
    markers = ["s", "^", "v", "P", "X", "o"]
    for i, b in enumerate(baselines):
        ax.plot([b["macs"] / scale], [b["accuracy"]], markers[i % len(markers)], color=f"C{(i + 2) % 10}", ms=8,
                ls="none", label=f"{b['model']} (static)")
    ax.set_xlabel(label)
    ax.set_ylabel("top-1 accuracy (%)")
    import textwrap

    ax.set_title(textwrap.fill(title or f"{model}: accuracy vs. computation", 80), fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.08, y=0.08)  # markers and their labels stay inside the axes
    # below the axes: inside, wherever it goes, it can hide a marker (the last exit's, top right, or a baseline's)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    fig.tight_layout()
    return _save(fig, path, force=force)


def exit_gallery(path, images: np.ndarray, exit_index: Sequence[int], predictions: Sequence[str],
                 labels: Optional[Sequence[str]], exit_names: Sequence[str], per_row: int = 12,
                 title: Optional[str] = None, force: bool = False) -> Path:
    """Sample images grouped by the exit they took: one row per exit, at most ``per_row`` images each.

    Each image is titled with its predicted class (and the true one when ``labels`` is given); wrong
    predictions are drawn in red and marked with an ``x``. ``images`` are uint8 (N, H, W[, 3]).
    """
    plt = _pyplot()
    exit_index = np.asarray(exit_index)
    n_exits = len(exit_names)
    rows = [np.flatnonzero(exit_index == k) for k in range(n_exits)]
    cols = max(1, min(per_row, max((len(r) for r in rows), default=1)))
    fig, axes = plt.subplots(n_exits, cols, figsize=(1.45 * cols + 1.2, 1.85 * n_exits), squeeze=False)
    for k, members in enumerate(rows):
        # Wrong predictions first in line for a place in a full row, shown in their original order.
        if labels is not None and len(members) > cols:
            wrong_m = [i for i in members if predictions[i] != labels[i]][:cols]
            right_m = [i for i in members if predictions[i] == labels[i]][:cols - len(wrong_m)]
            shown = np.sort(np.asarray(wrong_m + right_m, dtype=np.int64))
        else:
            shown = members[:cols]
        for j in range(cols):
            ax = axes[k, j]
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_visible(False)
            if j >= len(shown):
                continue
            i = shown[j]
            img = images[i]
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255)
            wrong = labels is not None and predictions[i] != labels[i]
            text = predictions[i] if labels is None else f"{predictions[i]}\n(true: {labels[i]})"
            if wrong:
                text = "x " + text
                for side in ax.spines.values():
                    side.set_visible(True)
                    side.set_edgecolor("red")
                    side.set_linewidth(2)
            ax.set_title(text, fontsize=7, color="red" if wrong else "black")
        more = f"\n(+{len(members) - len(shown)} more)" if len(members) > len(shown) else ""
        axes[k, 0].set_ylabel(f"{exit_names[k]}\n{len(members)} image(s){more}", fontsize=8, rotation=0,
                              ha="right", va="center", labelpad=10)
    fig.suptitle(title or "Images grouped by the exit they took", fontsize=10)
    fig.tight_layout()
    return _save(fig, path, force=force)
