"""Changes of a volume's grid that keep it where it is in the world: RAS+ reorientation
(flips and transposes, no interpolation) and resampling to a voxel size.

Resampling aligns voxel *centres*: the first voxel centre stays where it was, so
the affine only changes its zooms. Nearest and linear resampling run as
separable 1-D passes on the runtime's CPU pool; higher orders use scipy splines.
"""

from __future__ import annotations

import numpy as np
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation

from .cpu_pool import CHUNK_VOXELS, run_chunks
from .volume import Volume, voxel_sizes

#: the orientation of a grid that is already RAS+ (nibabel's ``ornt`` form); read-only, as
#: :func:`canonical_geometry` returns this very array for such grids
RAS_ORNT = np.array([[0, 1], [1, 1], [2, 1]])
RAS_ORNT.setflags(write=False)


def canonical_geometry(
    shape: tuple[int, ...], affine: np.ndarray
) -> tuple[np.ndarray, tuple[int, int, int], np.ndarray]:
    """The RAS+ closest-canonical grid of a volume, without touching a voxel: ``(ornt, shape,
    affine)`` with ``ornt`` for ``nibabel.orientations.apply_orientation`` (flips / axis
    permutations only). The one place every caller (preprocessing, the shape it gives, the
    refinement's native spacing, streaming reads, figures) gets that grid from."""
    shape3 = tuple(int(n) for n in shape[:3])
    ornt = io_orientation(affine)
    if np.array_equal(ornt, RAS_ORNT):
        return RAS_ORNT, shape3, np.asarray(affine)
    ras_shape = tuple(shape3[int(np.flatnonzero(ornt[:, 0] == axis)[0])] for axis in range(3))
    return ornt, ras_shape, affine @ inv_ornt_aff(ornt, shape3)  # type: ignore[return-value]


def to_canonical(vol: Volume) -> Volume:
    """Reorient to RAS+ closest canonical (flips / axis permutations only, no
    interpolation); identical to ``nibabel.as_closest_canonical``."""
    ornt, _, affine = canonical_geometry(vol.data.shape, vol.affine)
    if ornt is RAS_ORNT:
        return vol
    data = np.ascontiguousarray(apply_orientation(vol.data, ornt))
    return Volume(data=data, affine=affine, source=vol.source)


def resample(vol: Volume, spacing: tuple[float, float, float] | float, order: int = 1) -> Volume:
    """Resample to ``spacing`` mm, keeping the first voxel centre and the directions.

    New shape = round(old_shape * old_spacing / new_spacing) (at least 1); new
    voxel i sits at old index i * new/old along each axis, values beyond the last
    old centre repeat the edge. Orders 0 (nearest, for labels) and 1 (linear)
    run as separable, threaded 1-D passes (two gathers and a multiply-add per
    axis, shrinking axes first), much faster than a trilinear
    ``affine_transform`` on CT-sized volumes; higher orders use scipy splines.
    Axes whose spacing already matches (within 1e-3 mm) are left untouched.
    """
    data, affine = resample_array(vol.data, vol.affine, spacing, order)
    if data is vol.data:
        return vol
    return Volume(data=data, affine=affine, source=vol.source)


def resample_array(
    data: np.ndarray, affine: np.ndarray, spacing: tuple[float, float, float] | float, order: int
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`resample` on a bare array, which may be any strided view (``preprocess``
    passes the un-copied RAS+ view); returns ``data`` itself when nothing changes."""
    plan = resample_plan(data.shape, affine, spacing)
    if plan is None:
        return data, affine
    passes, scale, new_shape, new_affine = plan
    if order in (0, 1):
        for ax in passes:
            data = resample_axis(data, ax, int(new_shape[ax]), float(scale[ax]), order)
        return np.ascontiguousarray(data, dtype=np.float32), new_affine
    from scipy import ndimage

    out = ndimage.affine_transform(
        np.asarray(data, dtype=np.float32),
        scale,
        output_shape=tuple(int(s) for s in new_shape),
        order=order,
        mode="nearest",
        output=np.float32,
    )
    return out, new_affine


def resample_plan(
    shape: tuple[int, ...], affine: np.ndarray, spacing: tuple[float, float, float] | float
) -> tuple[list[int], np.ndarray, np.ndarray, np.ndarray] | None:
    """(axes to resample, shrinking ones first; old-index step per new voxel; new shape;
    new affine) for :func:`resample`, or None when every axis already has ``spacing``."""
    target = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,))
    if not (np.isfinite(target).all() and (target > 0).all()):
        raise ValueError(f"spacing must be positive mm values, got {spacing}")
    old = voxel_sizes(affine)
    redo = np.abs(old - target) > 1e-3
    if not redo.any():
        return None
    scale = np.where(redo, target / old, 1.0)
    size = np.asarray(shape)
    new_shape = np.where(redo, np.maximum(1, np.round(size / scale)), size).astype(int)
    new_affine = affine.copy()
    new_affine[:3, :3] = affine[:3, :3] * scale[None, :]
    # shrink first: later passes then touch fewer voxels
    passes = [int(a) for a in sorted(np.flatnonzero(redo), key=lambda a: new_shape[a] / size[a])]
    return passes, scale, new_shape, new_affine


def resample_axis(
    data: np.ndarray, axis: int, n_new: int, step: float, order: int, offset: float = 0.0
) -> np.ndarray:
    """1-D nearest/linear interpolation of ``data`` along ``axis`` at ``offset + i * step``,
    positions clamped into the axis (edge values outside; ``step`` may be negative, a flip).
    Nearest keeps the dtype (labels keep their values); linear gives float32.

    The output is cut into pieces of about :data:`~gvsl.runtime.cpu_pool.CHUNK_VOXELS` voxels along another
    axis, so each piece's gathers and temporaries stay in the CPU cache, and the
    pieces run on a thread pool (numpy releases the GIL in gathers and
    arithmetic). The arithmetic per voxel does not depend on the cut.
    """
    n_old = data.shape[axis]
    x = np.clip(offset + np.arange(n_new, dtype=np.float64) * step, 0.0, n_old - 1.0)
    if order == 0:
        i0 = np.minimum(np.floor(x + 0.5).astype(np.intp), n_old - 1)
        i1 = w = None
    else:
        i0 = np.floor(x).astype(np.intp)
        i1 = np.minimum(i0 + 1, n_old - 1)
        wshape = [1, 1, 1]
        wshape[axis] = n_new
        w = (x - i0).astype(np.float32).reshape(wshape)
    out_shape = list(data.shape)
    out_shape[axis] = n_new
    out = np.empty(out_shape, dtype=data.dtype if order == 0 else np.float32)
    split = 1 if axis == 0 else 0

    def work(start: int, stop: int) -> None:
        sl = [slice(None)] * 3
        sl[split] = slice(start, stop)
        src, dst = data[tuple(sl)], out[tuple(sl)]
        if i1 is None:
            dst[...] = np.take(src, i0, axis=axis)
            return
        lo = np.take(src, i0, axis=axis)
        hi = np.take(src, i1, axis=axis)
        if lo.dtype != np.float32:  # integer input (load_volume(keep_dtype=True)): convert here, piece by piece
            lo, hi = lo.astype(np.float32), hi.astype(np.float32)
        np.subtract(hi, lo, out=hi)
        hi *= w
        np.add(hi, lo, out=dst)

    n_split = out.shape[split]
    per = max(1, out.size // max(n_split, 1))
    step_n = max(1, CHUNK_VOXELS // per)
    run_chunks(work, [(a, min(a + step_n, n_split)) for a in range(0, n_split, step_n)], out.size)
    return out


__all__ = [
    "RAS_ORNT",
    "canonical_geometry",
    "resample",
    "resample_array",
    "resample_axis",
    "resample_plan",
    "to_canonical",
]
