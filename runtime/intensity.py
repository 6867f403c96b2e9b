"""Intensity normalisation: voxel values to [0, 1] float32, CT by a HU window, MR by
robust percentiles of its nonzero voxels.

CT values are absolute (Hounsfield units), so one window serves every scan; MR
has no absolute scale, and its zero background would dominate any statistics
taken over all voxels. ``auto`` picks one of the two per volume from its values
(:func:`gvsl.runtime.modality.decide_modality`). The passes run in cache-sized
pieces on the runtime's CPU pool.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from .cpu_pool import CHUNK_VOXELS, run_chunks
from .preprocess_config import PreprocessConfig


def normalize_intensity(
    data: np.ndarray, cfg: PreprocessConfig, name: str = "<array>", *, inplace: bool = False
) -> np.ndarray:
    """Map intensities to [0, 1] float32 (``ct``: HU window; ``mr``: robust min/max
    of nonzero voxels, because MR has no absolute scale and its zero background
    would otherwise dominate the statistics; ``auto``: whichever of the two
    :func:`resolve_modality` decides for these values); ``none`` only casts to float32.

    ``name`` is the volume's name in the error ``auto`` raises when it cannot decide.
    ``inplace=True`` lets the result overwrite ``data`` when it is already float32:
    for a caller that owns its array (``preprocess`` owns its resampled one) and
    so saves a volume-sized allocation. The values do not depend on it.
    """
    data = np.asarray(data, dtype=np.float32)
    if cfg.modality == "auto":
        cfg = replace(cfg, modality=resolve_modality(data, cfg, name))
    if cfg.modality == "ct":
        lo, hi = cfg.ct_window
        f_lo, f_scale = np.float32(lo), np.float32(1.0 / (hi - lo))
        if not data.flags.c_contiguous:
            out = np.clip(data, lo, hi)
            out -= f_lo
            out *= f_scale
            return out
        out = data if inplace else np.empty(data.shape, np.float32)
        src, dst = data.reshape(-1), out.reshape(-1)

        def ct(a: int, b: int) -> None:
            piece = dst[a:b]
            np.clip(src[a:b], lo, hi, out=piece)
            piece -= f_lo
            piece *= f_scale

        run_chunks(ct, _flat_pieces(dst.size), dst.size)
        return out
    if cfg.modality == "mr":
        nonzero = data[data != 0]
        if nonzero.size == 0:
            return np.zeros_like(data)
        lo, hi = (float(v) for v in np.percentile(nonzero, cfg.mr_percentiles))
        if not hi > lo:  # constant image: nothing to scale, keep it finite
            return np.zeros_like(data)
        out = data if inplace else np.empty(data.shape, np.float32)
        np.subtract(data, np.float32(lo), out=out)
        out *= np.float32(1.0 / (hi - lo))
        np.clip(out, 0.0, 1.0, out=out)
        return out
    return data


def resolve_modality(data: np.ndarray, cfg: PreprocessConfig, name: str = "<array>") -> str:
    """The normalisation ``cfg`` means for this volume: its modality, or for ``auto`` the
    decision of :func:`gvsl.runtime.modality.decide_modality` (one-line error when it cannot)."""
    if cfg.modality != "auto":
        return cfg.modality
    from .modality import decide_modality

    return decide_modality(data, name)


def _flat_pieces(n: int) -> list[tuple[int, int]]:
    """Cache-sized ``(start, stop)`` runs of a flat array of ``n`` voxels."""
    return [(a, min(a + CHUNK_VOXELS, n)) for a in range(0, n, CHUNK_VOXELS)]


__all__ = ["normalize_intensity", "resolve_modality"]
