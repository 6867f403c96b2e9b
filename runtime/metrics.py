"""Registration quality figures: NCC, Dice, Jacobian determinant and folding.

Reported with every registration so that a server can flag a bad result
without a human looking: NCC before/after says whether the images got closer,
the Jacobian determinant of the transform says whether the field stays
invertible (``det <= 0`` = folding, anatomy turned inside out).
"""

from __future__ import annotations

import numpy as np

__all__ = ["dice", "folding_stats", "jacobian_determinant", "label_dice", "max_displacement", "ncc"]

#: voxels per float64 piece of the NCC sums
_SUM_CHUNK = 1 << 20


def ncc(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Global normalised cross-correlation (Pearson r) of two images on the same grid,
    over ``mask`` if given; 0 when either image is constant there. Centred sums in float64,
    a million voxels at a time (no float64 copy of a whole volume)."""
    x = np.asarray(a)[mask] if mask is not None else np.ravel(a)
    y = np.asarray(b)[mask] if mask is not None else np.ravel(b)
    n = x.size
    if n == 0:
        return 0.0
    mx, my = float(x.sum(dtype=np.float64)) / n, float(y.sum(dtype=np.float64)) / n
    sxx = syy = sxy = 0.0
    for start in range(0, n, _SUM_CHUNK):
        xc = x[start : start + _SUM_CHUNK].astype(np.float64) - mx
        yc = y[start : start + _SUM_CHUNK].astype(np.float64) - my
        sxx += float(xc @ xc)
        syy += float(yc @ yc)
        sxy += float(xc @ yc)
    den = float(np.sqrt(sxx * syy))
    return sxy / den if den > 0 else 0.0


def max_displacement(disp: np.ndarray) -> float:
    """Largest vector length of a field ``[3, ...]`` (its units), in float32 in place: the
    figure needs no float64 copy of three volumes."""
    d = np.asarray(disp, dtype=np.float32)
    sq = d[0] * d[0]
    for c in range(1, d.shape[0]):
        sq += d[c] * d[c]
    return float(np.sqrt(sq.max(initial=0.0)))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two binary masks (1 when both are empty)."""
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def label_dice(warped: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Dice of every non-zero label of ``reference`` (and of ``warped``) between the two maps,
    keyed by the label value as text, plus ``"mean"`` over those labels."""
    a = np.asarray(warped)
    b = np.asarray(reference)
    values = sorted({int(v) for v in np.unique(b) if v != 0} | {int(v) for v in np.unique(a) if v != 0})
    out = {str(v): dice(a == v, b == v) for v in values}
    out["mean"] = float(np.mean(list(out.values()))) if out else 1.0
    return out


def jacobian_determinant(disp_mm: np.ndarray, affine: np.ndarray, slab_voxels: int = 1 << 18) -> np.ndarray:
    """det of the Jacobian of ``x -> x + d(x)`` at every voxel, float32 ``[X, Y, Z]``.

    ``disp_mm [3, X, Y, Z]`` in world mm on the grid ``affine``. Derivatives
    along array axes (central differences, one-sided at the border) are
    turned into world derivatives with the inverse of the affine's 3x3 part,
    so anisotropic and oblique grids are handled. Computed in slabs along the
    first axis (each with a one-voxel halo, so memory stays bounded) on the
    runtime's CPU pool; the 3x3 determinant is written out (float64), several
    times faster than a batched ``numpy.linalg.det``.
    """
    from .cpu_pool import run_chunks

    d = np.asarray(disp_mm)
    inv = np.linalg.inv(np.asarray(affine, dtype=np.float64)[:3, :3])
    n0 = d.shape[1]
    slab = max(1, slab_voxels // max(1, d.shape[2] * d.shape[3]))
    out = np.empty(d.shape[1:], dtype=np.float32)

    def work(a: int, b: int) -> None:
        lo, hi = max(0, a - 1), min(n0, b + 1)
        keep = slice(a - lo, a - lo + (b - a))
        # grad[c][k] = d d_c / d index_k (every axis has >= 2 voxels: inputs are validated 3-D)
        grad = [[g[keep] for g in np.gradient(d[c, lo:hi].astype(np.float64))] for c in range(3)]
        # chain rule to world coordinates, plus the identity: j[c][i] = delta_ci + sum_k grad[c][k] inv[k, i]
        j = [[None] * 3 for _ in range(3)]
        for c in range(3):
            for i in range(3):
                acc = np.full(grad[c][0].shape, 1.0 if c == i else 0.0)
                for k in range(3):
                    if inv[k, i] != 0.0:
                        acc += grad[c][k] * inv[k, i]
                j[c][i] = acc
        det = j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
        det -= j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
        det += j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0])
        out[a:b] = det

    run_chunks(work, [(a, min(a + slab, n0)) for a in range(0, n0, slab)], out.size)
    return out


def folding_stats(det: np.ndarray, mask: np.ndarray | None = None) -> tuple[float, float]:
    """(minimum Jacobian determinant, % of voxels with det <= 0)."""
    d = det if mask is None else det[mask]
    if d.size == 0:
        return float("nan"), 0.0
    return float(d.min()), 100.0 * float(np.count_nonzero(d <= 0)) / d.size
