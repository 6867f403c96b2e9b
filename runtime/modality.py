"""CT or MR, decided from a volume's values: the one place ``--modality auto`` is decided.

One model for CT and MR needs each input normalised as what it is (a HU window
for CT, robust percentiles for MR). CT values are Hounsfield units, an absolute
scale: air sits near -1000 HU and tissue above it, with a bone tail of several
hundred HU; scanners pad outside the reconstruction circle with -1024, -2048 or
-3024. MR has no absolute scale but is non-negative up to interpolation ringing.
:func:`decide_modality` reads exactly that: a volume with many voxels far below
zero is CT when those voxels cluster near -1000 (air) and there is a tissue/bone
tail; a volume with (almost) no negative values is MR; anything else (e.g. a
z-scored or phase image) is refused with one line naming the file and the
``--modality ct|mr`` override. numpy only (part of the torch-free runtime).
"""

from __future__ import annotations

import numpy as np

from .errors import GvslInputError

__all__ = ["MAX_SAMPLES", "decide_modality"]

#: Voxels read for the decision (a regular subsample of bigger volumes): the statistics
#: below are fractions and high percentiles, stable at this size and fast on any volume.
MAX_SAMPLES = 1 << 20

#: HU range counted as air, and the level below which a voxel counts as "far below zero".
AIR_HU = (-1200.0, -800.0)
LOW_HU = -500.0
#: padding values at or below this are outside the field of view, not anatomy
PADDING_HU = -1500.0


def _sample(data: np.ndarray) -> np.ndarray:
    """Finite values of a regular subsample (every k-th voxel along each axis, as a view,
    so a strided or memory-mapped volume is not copied whole)."""
    arr = np.asarray(data)
    step = max(1, int(np.ceil((arr.size / MAX_SAMPLES) ** (1.0 / max(arr.ndim, 1)))))
    values = np.asarray(arr[(slice(None, None, step),) * arr.ndim], dtype=np.float32).reshape(-1)
    return values[np.isfinite(values)]


def decide_modality(data: np.ndarray, name: str = "<array>") -> str:
    """``"ct"`` or ``"mr"`` for one volume's values; :class:`GvslInputError` (one line naming
    ``name`` and the override) when they look like neither.

    CT: at least 1 % of the voxels below -500, of which (padding at <= -1500 aside) at
    least a third lie in the air range [-1200, -800], and a tissue tail: at least 1 % of
    the voxels above -200 and a 99.9th percentile above 100 HU. MR: fewer than 1 % of the
    voxels negative, or negatives no deeper than 5 % of the 99th percentile (ringing).
    """
    v = _sample(data)
    if v.size == 0 or float(v.max()) == float(v.min()):
        raise GvslInputError(
            f"{name}: --modality auto cannot decide CT or MR for a constant or empty volume; "
            "pass --modality ct or --modality mr",
            name,
        )
    n = v.size
    low = v[v < LOW_HU]
    if low.size >= 0.01 * n:
        anatomy = low[low > PADDING_HU]
        air = np.count_nonzero((anatomy >= AIR_HU[0]) & (anatomy <= AIR_HU[1]))
        tissue = np.count_nonzero(v > -200.0)
        if anatomy.size and air >= anatomy.size / 3 and tissue >= 0.01 * n and float(np.percentile(v, 99.9)) > 100:
            return "ct"
        why = "values far below zero but no air peak near -1000 HU with a tissue tail"
    else:
        negative = v[v < 0]
        hi = float(np.percentile(v, 99))
        if negative.size < 0.01 * n or (hi > 0 and float(negative.min()) >= -0.05 * hi):
            return "mr"
        why = f"{negative.size / n:.0%} negative values, which neither HU nor MR magnitudes have"
    raise GvslInputError(
        f"{name}: --modality auto cannot decide CT or MR ({why}); pass --modality ct or --modality mr", name
    )
