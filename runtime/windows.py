"""Sliding-window geometry: where the encoder's windows go on a padded volume, and how they blend.

Windows have the training patch size (cut to the volume along axes shorter
than the patch), cover the volume, start at 0 and end flush with it, and
overlap at least ``overlap`` of the window. Every volume is padded to a
multiple of :data:`SIZE_MULTIPLE` first, because the U-Net pools four times.
The Embedder, int8 calibration and the benchmarks all cut windows here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

#: Spatial sizes the network takes are multiples of this (four 2x poolings).
SIZE_MULTIPLE = 16

WindowSlices = tuple[slice, slice, slice]


def window_starts(size: int, window: int, overlap: float) -> list[int]:
    """Start offsets of windows of ``window`` voxels covering ``size`` voxels with at
    least ``overlap`` fractional overlap; first at 0, last flush with the end."""
    if size <= window:
        return [0]
    stride = max(1, int(window * (1.0 - overlap)))
    n = math.ceil((size - window) / stride) + 1
    return sorted({int(round(x)) for x in np.linspace(0, size - window, n)})


def window_slices(
    shape: Sequence[int], patch: Sequence[int], overlap: float
) -> tuple[tuple[int, int, int], list[WindowSlices]]:
    """(window size, the slices of every window) for a padded volume of ``shape``."""
    win = tuple(min(int(p), int(s)) for p, s in zip(patch, shape, strict=True))
    starts = [window_starts(int(s), w, overlap) for s, w in zip(shape, win, strict=True)]
    slices = [
        (slice(a, a + win[0]), slice(b, b + win[1]), slice(c, c + win[2]))
        for a in starts[0]
        for b in starts[1]
        for c in starts[2]
    ]
    return win, slices  # type: ignore[return-value]


def gaussian_weight(shape: Sequence[int], sigma_scale: float = 0.125) -> np.ndarray:
    """Separable Gaussian blending weight, 1 at the centre, floored at 1e-3 so edges count."""
    axes = []
    for n in shape:
        x = np.arange(n, dtype=np.float64) - (n - 1) / 2.0
        s = max(n * sigma_scale, 1e-6)
        axes.append(np.exp(-0.5 * (x / s) ** 2))
    w = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    return np.maximum(w / w.max(), 1e-3).astype(np.float32)


__all__ = ["SIZE_MULTIPLE", "gaussian_weight", "window_slices", "window_starts"]
