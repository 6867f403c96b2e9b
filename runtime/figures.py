"""A registration overview PNG: fixed, moving, warped and a fixed/warped checkerboard
in three planes (axial, coronal, sagittal through the centre).

Arrays are reoriented to RAS+ for display only (so every figure reads the
same way: anterior up in axial, superior up in coronal/sagittal, voxel aspect
from the spacing). matplotlib is optional (``pip install 'gvsl[viz]'``) and
used through its object API with the Agg canvas — no pyplot global state, so
figures can be made from several threads.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from nibabel.orientations import apply_orientation

from .errors import GvslInputError
from .io import atomic_write
from .resampling import canonical_geometry
from .volume import voxel_sizes

__all__ = ["checkerboard", "display_scaled", "save_registration_png"]


def checkerboard(a: np.ndarray, b: np.ndarray, tiles: int = 8) -> np.ndarray:
    """2-D checkerboard of two same-shape images, ``tiles`` squares along the longer side."""
    step = max(1, max(a.shape) // tiles)
    ii, jj = np.indices(a.shape)
    return np.where(((ii // step) + (jj // step)) % 2 == 0, a, b)


def _planes(vol: np.ndarray, spacing: np.ndarray) -> list[tuple[str, np.ndarray, float]]:
    """(name, 2-D slice for imshow with rows = vertical axis, pixel aspect) for RAS data."""
    cx, cy, cz = (s // 2 for s in vol.shape)
    sx, sy, sz = spacing
    return [
        ("axial", vol[:, :, cz].T[::-1], sy / sx),  # rows: anterior at the top
        ("coronal", vol[:, cy, :].T[::-1], sz / sx),  # rows: superior at the top
        ("sagittal", vol[cx, :, :].T[::-1], sz / sy),
    ]


def display_scaled(fixed: np.ndarray, moving: np.ndarray, warped: np.ndarray) -> list[np.ndarray]:
    """The three images mapped to [0, 1] for display: the fixed image by its own 1st-99th
    percentiles, moving and warped (the same intensities, resampled) by the moving image's,
    so two scans with different intensity scales are both visible, in the checkerboard too."""

    def window(v: np.ndarray) -> tuple[float, float]:
        lo, hi = (float(x) for x in np.percentile(v, (1, 99)))
        return lo, hi if hi > lo else lo + 1.0

    out = []
    for v, (lo, hi) in zip((fixed, moving, warped), (window(fixed), window(moving), window(moving)), strict=True):
        out.append(np.clip((np.asarray(v, dtype=np.float32) - lo) / (hi - lo), 0.0, 1.0))
    return out


def save_registration_png(
    path: str | os.PathLike[str],
    fixed: np.ndarray,
    moving: np.ndarray,
    warped: np.ndarray,
    affine: np.ndarray,
    title: str | None = None,
    metrics: Mapping[str, float] | None = None,
    dpi: int = 110,
) -> Path:
    """Write the overview PNG (atomically). All three images on the fixed grid ``affine``."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise GvslInputError("--png needs matplotlib: pip install 'gvsl[viz]'") from None
    ornt, _, ras_affine = canonical_geometry(np.shape(fixed), affine)
    ras = [apply_orientation(np.asarray(v, dtype=np.float32), ornt) for v in (fixed, moving, warped)]
    spacing = voxel_sizes(ras_affine)
    ras = display_scaled(*ras)
    lo, hi = 0.0, 1.0
    cols = ["fixed", "moving", "warped", "checkerboard fixed/warped"]
    fig = Figure(figsize=(12, 9.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, 4)
    planes = [_planes(v, spacing) for v in ras]
    for r in range(3):
        for c in range(4):
            ax = axes[r, c]
            name, img, aspect = planes[min(c, 2)][r]
            if c == 3:
                img = checkerboard(planes[0][r][1], planes[2][r][1])
            ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(cols[c], fontsize=10)
            if c == 0:
                ax.set_ylabel(name, fontsize=10)
    head = title or "gvsl register"
    if metrics:
        head += (
            f"   NCC {metrics.get('ncc_before', float('nan')):.3f} -> {metrics.get('ncc_after', float('nan')):.3f}"
            f"   min det J {metrics.get('jacobian_min', float('nan')):.3f}"
            f"   folding {metrics.get('folding_percent', float('nan')):.3f}%"
        )
    fig.suptitle(head, fontsize=11)
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
