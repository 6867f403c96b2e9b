"""Moving data between grids in world space (numpy only, threaded on the runtime's CPU pool).

Two operations carry every result of the runtime back to the user's grid:

* :func:`resample_to_grid` — an array on one voxel grid read at the voxel
  centres of another grid (both given by their voxel->RAS affines): features
  and displacement fields computed on the model's grid go back to the input;
* :func:`warp_by_displacement` — pull an image through a displacement field in
  millimetres: ``out(i) = src(world_to_src(x_i + d(x_i)))`` with ``x_i`` the
  world position of output voxel ``i``, which is exactly what ITK's
  ``DisplacementFieldTransform`` does when resampling.

Both read with :func:`sample`: trilinear (``order=1``) or nearest-neighbour
(``order=0``) at arbitrary voxel positions, outside the source either its edge
(``mode="nearest"``) or ``cval`` (``mode="constant"``; a position counts as inside
when it lies in ``[0, n - 1]`` on every axis), the conventions of
``scipy.ndimage.map_coordinates`` with those modes, which it matches to float32
rounding (tests/test_warp.py). Between grids whose axes are parallel (a scale and
a shift per axis, what canonical grids give) :func:`resample_to_grid` runs
separable 1-D passes instead (:func:`gvsl.runtime.resampling.resample_axis`).

Work is cut into pieces of whole rows of the first output axis; each piece builds
its own sampling positions (memory stays bounded whatever the volume size) and
the pieces run on the CPU pool. Not importing scipy spares every command half a
second of start-up.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .cpu_pool import CHUNK_VOXELS, run_chunks
from .resampling import resample_axis

__all__ = [
    "MODES",
    "grid_world_coordinates",
    "resample_to_grid",
    "row_pieces",
    "sample",
    "warp_by_displacement",
]

#: what a read outside the source gives: its edge value, or ``cval``
MODES = ("nearest", "constant")


def row_pieces(shape: Sequence[int]) -> list[tuple[int, int]]:
    """``(start, stop)`` pieces of whole rows of the first axis, about :data:`CHUNK_VOXELS`
    voxels each: how every pass over a grid here (and ``compose_initial``) is cut for the pool."""
    n0 = int(shape[0])
    per = max(1, CHUNK_VOXELS // max(1, int(np.prod(shape[1:]))))
    return [(a, min(a + per, n0)) for a in range(0, n0, per)]


def grid_world_coordinates(affine: np.ndarray, shape: Sequence[int], rows: slice | None = None) -> np.ndarray:
    """``affine[:3, :3] @ index + affine[:3, 3]`` for the voxel centres of a grid, ``[3, *shape]``
    float64 (optionally only rows ``rows`` of the first axis): world (RAS mm) positions for a
    voxel->world affine, source voxel positions for a voxel->voxel map. Built from three
    broadcast 1-D ranges (two additions per voxel and axis)."""
    m = np.asarray(affine, dtype=np.float64)
    start, stop = (0, int(shape[0])) if rows is None else (rows.start, rows.stop)
    axes = (
        np.arange(start, stop, dtype=np.float64).reshape(-1, 1, 1),
        np.arange(int(shape[1]), dtype=np.float64).reshape(1, -1, 1),
        np.arange(int(shape[2]), dtype=np.float64).reshape(1, 1, -1),
    )
    out = np.empty((3, stop - start, int(shape[1]), int(shape[2])), dtype=np.float64)
    for k in range(3):
        out[k] = m[k, 0] * axes[0] + m[k, 1] * axes[1] + (m[k, 2] * axes[2] + m[k, 3])
    return out


def sample(
    sources: Sequence[np.ndarray], coords: np.ndarray, order: int = 1, mode: str = "constant", cval: float = 0.0
) -> list[np.ndarray]:
    """Each 3-D array of ``sources`` (one grid) read at voxel positions ``coords [3, ...]``.

    ``order`` 1 = trilinear (float32 out), 0 = nearest neighbour (the source's dtype, so
    labels keep their values; halves round up). Outside ``[0, n - 1]`` on any axis:
    the edge (``mode="nearest"``) or ``cval`` (``"constant"``). The channels share one
    set of corner indices and fractions.
    """
    if order not in (0, 1):
        raise ValueError(f"order must be 0 or 1, got {order}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    shape = sources[0].shape
    flat = [np.ravel(s) for s in sources]  # views of C-ordered sources; callers make them so once
    pts = coords.reshape(3, -1)
    hi = np.asarray(shape, dtype=np.float64) - 1.0
    inside = None
    if mode == "constant":
        inside = np.ones(pts.shape[1], dtype=bool)
        for k in range(3):
            inside &= (pts[k] >= 0.0) & (pts[k] <= hi[k])
    strides = (shape[1] * shape[2], shape[2], 1)
    if order == 0:
        index = np.zeros(pts.shape[1], dtype=np.intp)
        for k in range(3):
            index += np.clip(np.floor(pts[k] + 0.5), 0.0, hi[k]).astype(np.intp) * strides[k]
        outs = [np.take(f, index) for f in flat]
    else:
        base = np.zeros(pts.shape[1], dtype=np.intp)
        frac, step = [], []
        for k in range(3):
            clamped = np.clip(pts[k], 0.0, hi[k])
            lo = np.minimum(np.floor(clamped), max(hi[k] - 1.0, 0.0))
            frac.append((clamped - lo).astype(np.float32))
            base += lo.astype(np.intp) * strides[k]
            step.append(strides[k] if shape[k] > 1 else 0)
        fd, fh, fw = frac
        offsets = [od * step[0] + oh * step[1] + ow * step[2] for od in (0, 1) for oh in (0, 1) for ow in (0, 1)]
        outs = []
        for f in flat:  # seven lerps per volume, in place: fewer passes than eight corner weights
            v = [np.take(f, base + off).astype(np.float32, copy=False) for off in offsets]
            for a, b, t in ((0, 1, fw), (2, 3, fw), (4, 5, fw), (6, 7, fw), (1, 3, fh), (5, 7, fh), (3, 7, fd)):
                np.subtract(v[b], v[a], out=v[b])  # v[b] <- v[a] + t (v[b] - v[a])
                v[b] *= t
                v[b] += v[a]
            outs.append(v[7])
    if inside is not None:
        for out in outs:
            out[~inside] = cval
    return [out.reshape(coords.shape[1:]) for out in outs]


def _axis_aligned(m: np.ndarray) -> bool:
    lin = m[:3, :3]
    return bool(np.allclose(lin, np.diag(np.diag(lin)), atol=1e-9))


def _separable(
    data: np.ndarray, m: np.ndarray, dst_shape: tuple[int, ...], order: int, mode: str, cval: float
) -> np.ndarray:
    """``data`` read at ``diag(m) * i + m[:3, 3]`` per axis by three 1-D passes; ``constant``
    marks positions outside the source (per axis) with ``cval`` afterwards."""
    out = data
    for axis in range(3):
        out = resample_axis(out, axis, dst_shape[axis], float(m[axis, axis]), order, offset=float(m[axis, 3]))
    if mode == "constant":
        for axis in range(3):
            x = np.arange(dst_shape[axis], dtype=np.float64) * m[axis, axis] + m[axis, 3]
            outside = (x < 0.0) | (x > data.shape[axis] - 1.0)
            if outside.any():
                index = [slice(None)] * 3
                index[axis] = np.flatnonzero(outside)
                out[tuple(index)] = cval
    return out


def resample_to_grid(
    data: np.ndarray,
    src_affine: np.ndarray,
    dst_affine: np.ndarray,
    dst_shape: Sequence[int],
    order: int = 1,
    mode: str = "nearest",
    cval: float = 0.0,
) -> np.ndarray:
    """Read ``data [..., X, Y, Z]`` (on ``src_affine``) at the voxel centres of the grid
    ``dst_affine`` / ``dst_shape``; leading axes are channels.

    ``mode="nearest"`` repeats the edge, right for fields and features whose
    grid covers the destination up to rounding; images use ``"constant"``.
    """
    m = np.linalg.inv(np.asarray(src_affine, dtype=np.float64)) @ np.asarray(dst_affine, dtype=np.float64)
    shape = tuple(int(s) for s in dst_shape)
    lead = data.shape[:-3]
    flat = data.reshape(-1, *data.shape[-3:])
    out_dtype = data.dtype if order == 0 else np.float32
    out = np.empty((flat.shape[0], *shape), dtype=out_dtype)
    if _axis_aligned(m):
        for c in range(flat.shape[0]):
            out[c] = _separable(flat[c], m, shape, order, mode, cval)
        return out.reshape(*lead, *shape)
    channels = [np.ascontiguousarray(flat[c]) for c in range(flat.shape[0])]  # nibabel gives Fortran order

    def work(start: int, stop: int) -> None:
        read = sample(channels, grid_world_coordinates(m, shape, slice(start, stop)), order, mode, cval)
        for c, values in enumerate(read):
            out[c, start:stop] = values

    run_chunks(work, row_pieces(shape), int(np.prod(shape)))
    return out.reshape(*lead, *shape)


def warp_by_displacement(
    src: np.ndarray,
    src_affine: np.ndarray,
    dst_affine: np.ndarray,
    disp_mm: np.ndarray | None,
    order: int = 1,
    cval: float = 0.0,
    shift_mm: Sequence[float] | None = None,
    dst_shape: Sequence[int] | None = None,
) -> np.ndarray:
    """Pull ``src`` (grid ``src_affine``) onto the grid ``dst_affine`` through a field.

    ``disp_mm [3, *dst_shape]`` is the RAS-mm displacement from each output
    voxel's world position to the point read in ``src`` (``None`` = none);
    ``shift_mm`` adds a constant. ``order=0`` is nearest neighbour (labels come
    back with exactly their values), outside reads ``cval``.
    """
    if disp_mm is not None:
        dst_shape = disp_mm.shape[1:]
    if dst_shape is None:
        raise ValueError("dst_shape is needed when there is no displacement field")
    shape = tuple(int(s) for s in dst_shape)
    inv = np.linalg.inv(np.asarray(src_affine, dtype=np.float64))
    shift = np.zeros(3) if shift_mm is None else np.asarray(shift_mm, dtype=np.float64)
    # output voxel -> source voxel without the field: inv @ (dst_affine @ i + shift)
    m = inv @ np.asarray(dst_affine, dtype=np.float64)
    m[:3, 3] += inv[:3, :3] @ shift
    out_dtype = src.dtype if order == 0 else np.float32
    out = np.empty(shape, dtype=out_dtype)
    # C order once, not a copy per piece (nibabel's arrays are Fortran-ordered)
    source = np.ascontiguousarray(src if order == 0 else np.asarray(src, dtype=np.float32))

    def work(start: int, stop: int) -> None:
        coords = grid_world_coordinates(m, shape, slice(start, stop))
        if disp_mm is not None:
            piece = disp_mm[:, start:stop]
            for k in range(3):
                for j in range(3):
                    if inv[k, j] != 0.0:
                        coords[k] += inv[k, j] * piece[j]
        out[start:stop] = sample([source], coords, order, "constant", cval)[0]

    run_chunks(work, row_pieces(shape), int(np.prod(shape)))
    return out
