"""Figure helpers written once (matplotlib, headless): image grids for MLflow artifacts and plot folders."""

from __future__ import annotations

from typing import Any

import numpy as np


def pyplot() -> Any:
    """matplotlib.pyplot on the non-interactive Agg backend (stages run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def sample_grid(images: np.ndarray, labels: list[str] | None = None, cols: int = 8, title: str = "") -> Any:
    """A matplotlib figure of uint8 (N, H, W, C) images in a grid, each with its label above it.

    One montage image in one axes (the labels as text in bands above the tiles), ~1 inch per tile: a grid of
    `rows x cols` axes with `tight_layout` drew the same figure 5-8x slower, ~1 CPU-second per figure, which every
    training and evaluation paid.
    """
    plt = pyplot()
    tiles = np.asarray(images)
    if tiles.ndim == 3:
        tiles = tiles[..., None]
    n, h, w, c = tiles.shape
    rows = max(1, -(-n // cols))
    pad = max(1, w // 16)
    band = max(4, round(0.3 * h)) if labels is not None else 0
    cell_h, cell_w = band + h + pad, w + pad
    canvas = np.full((rows * cell_h + pad, cols * cell_w + pad, 3), 255, np.uint8)
    for i in range(n):
        y, x = (i // cols) * cell_h + band + pad, (i % cols) * cell_w + pad
        canvas[y : y + h, x : x + w] = tiles[i] if c == 3 else tiles[i, ..., :1]
    top = 0.3 if title else 0.0
    width, height = canvas.shape[1] / w * 1.1, canvas.shape[0] / w * 1.1
    fig = plt.figure(figsize=(width, height + top), dpi=100)
    ax = fig.add_axes((0.0, 0.0, 1.0, height / (height + top)))
    ax.imshow(canvas, interpolation="nearest", aspect="auto")
    ax.axis("off")
    for i, text in enumerate(labels[:n] if labels is not None else []):
        ax.text((i % cols) * cell_w + pad + w / 2, (i // cols) * cell_h + pad + band / 2, text, fontsize=7,
                ha="center", va="center")
    if title:
        fig.suptitle(title, fontsize=9, y=1.0 - 0.05 / (height + top), va="top")
    return fig
