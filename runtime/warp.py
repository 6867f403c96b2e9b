"""Moving data between grids in world space (numpy / scipy only).

Two operations carry every result of the runtime back to the user's grid:

* :func:`resample_to_grid` — an array on one voxel grid read at the voxel
  centres of another grid (both given by their voxel->RAS affines): features
  and displacement fields computed on the model's grid go back to the input;
* :func:`warp_by_displacement` — pull an image through a displacement field in
  millimetres: ``out(i) = src(world_to_src(x_i + d(x_i)))`` with ``x_i`` the
  world position of output voxel ``i``, which is exactly what ITK's
  ``DisplacementFieldTransform`` does when resampling.

Work is split into slabs along the first output axis, so memory for
coordinates stays bounded whatever the volume size.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

__all__ = ["grid_world_coordinates", "resample_to_grid", "warp_by_displacement"]

#: voxels per slab when building sampling coordinates (3 x float64 each)
_SLAB_VOXELS = 1 << 21


def _slabs(shape: Sequence[int]) -> list[slice]:
    n0 = int(shape[0])
    per = max(1, _SLAB_VOXELS // max(1, int(np.prod(shape[1:]))))
    return [slice(a, min(a + per, n0)) for a in range(0, n0, per)]


def grid_world_coordinates(affine: np.ndarray, shape: Sequence[int], rows: slice | None = None) -> np.ndarray:
    """World (RAS mm) positions ``[3, *shape]`` of the voxel centres of a grid (optionally
    only rows ``rows`` of the first axis)."""
    rows = rows or slice(0, int(shape[0]))
    idx = np.meshgrid(
        np.arange(rows.start, rows.stop, dtype=np.float64),
        np.arange(int(shape[1]), dtype=np.float64),
        np.arange(int(shape[2]), dtype=np.float64),
        indexing="ij",
    )
    a = np.asarray(affine, dtype=np.float64)
    return np.einsum("ij,j...->i...", a[:3, :3], np.stack(idx)) + a[:3, 3].reshape(3, 1, 1, 1)


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
    lead = data.shape[:-3]
    flat = data.reshape(-1, *data.shape[-3:])
    out_dtype = data.dtype if order == 0 else np.float32
    out = np.empty((flat.shape[0], *(int(s) for s in dst_shape)), dtype=out_dtype)
    lin, off = m[:3, :3], m[:3, 3]
    diagonal = np.allclose(lin, np.diag(np.diag(lin)), atol=1e-9)
    for c in range(flat.shape[0]):
        src = flat[c] if order == 0 else flat[c].astype(np.float32, copy=False)
        ndimage.affine_transform(
            src,
            np.diag(lin) if diagonal else lin,  # 1-D matrix: scipy's faster zoom/shift path
            offset=off,
            output_shape=tuple(int(s) for s in dst_shape),
            output=out[c],
            order=order,
            mode=mode,
            cval=cval,
        )
    return out.reshape(*lead, *out.shape[1:])


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
    inv = np.linalg.inv(np.asarray(src_affine, dtype=np.float64))
    shift = np.zeros(3) if shift_mm is None else np.asarray(shift_mm, dtype=np.float64)
    out_dtype = src.dtype if order == 0 else np.float32
    out = np.empty(tuple(int(s) for s in dst_shape), dtype=out_dtype)
    source = src if order == 0 else np.asarray(src, dtype=np.float32)
    for rows in _slabs(dst_shape):
        world = grid_world_coordinates(dst_affine, dst_shape, rows)
        if disp_mm is not None:
            world += disp_mm[:, rows]
        world += shift.reshape(3, 1, 1, 1)
        coords = np.einsum("ij,j...->i...", inv[:3, :3], world) + inv[:3, 3].reshape(3, 1, 1, 1)
        out[rows] = ndimage.map_coordinates(source, coords, order=order, mode="constant", cval=cval)
    return out
