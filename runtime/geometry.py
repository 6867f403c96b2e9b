"""Voxel <-> world geometry shared by training, export and the runtime.

Written with ``@`` and reshapes only, so every function works on NumPy arrays
and on torch tensors alike (pass the affine as the same kind of array as the
field). That keeps one implementation and leaves ``gvsl.runtime`` torch-free.

Conventions: volumes are indexed (i, j, k) along array axes (D, H, W) after
the channel axis; a displacement field has 3 channels, channel a = shift along
array axis a, in voxels or millimetres; ``affine`` is the 4x4 NIfTI
voxel->world (RAS mm) matrix of the grid the field lives on.
"""

from __future__ import annotations

from typing import Any


def _as_like(affine: Any, like: Any) -> Any:
    """Return ``affine`` as the same array type, dtype and device as ``like`` (a torch tensor's
    own ``new_tensor`` makes the copy, so this module never imports torch)."""
    import numpy as np

    if type(like).__module__.startswith("torch"):
        if type(affine).__module__.startswith("torch"):
            return affine.to(dtype=like.dtype, device=like.device)
        return like.new_tensor(np.asarray(affine, dtype=np.float64), dtype=like.dtype)
    return np.asarray(affine, dtype=like.dtype)


def voxel_to_world(points: Any, affine: Any) -> Any:
    """Map voxel coordinates ``[..., 3]`` to world mm ``[..., 3]``."""
    a = _as_like(affine, points)
    return points @ a[:3, :3].T + a[:3, 3]


def world_to_voxel(points: Any, affine: Any) -> Any:
    """Map world mm ``[..., 3]`` to voxel coordinates ``[..., 3]``."""
    import numpy as np

    inv = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    a = _as_like(inv, points)
    return points @ a[:3, :3].T + a[:3, 3]


def _apply_linear(field: Any, m: Any) -> Any:
    """Apply the 3x3 matrix ``m`` to each vector of a ``[..., 3, *spatial]`` field."""
    shape = field.shape
    lead = shape[: len(shape) - 4]  # batch dims (possibly none)
    flat = field.reshape(*lead, 3, -1)
    out = m @ flat
    return out.reshape(shape)


def dvf_voxel_to_mm(dvf: Any, affine: Any) -> Any:
    """Displacements in voxels -> world mm vectors (rotation/zoom part of ``affine``).

    ``dvf`` is ``[3, D, H, W]`` or ``[N, 3, D, H, W]``.
    """
    a = _as_like(affine, dvf)
    return _apply_linear(dvf, a[:3, :3])


def dvf_mm_to_voxel(dvf_mm: Any, affine: Any) -> Any:
    """World mm displacement vectors -> voxel displacements on the grid of ``affine``."""
    import numpy as np

    inv = np.linalg.inv(np.asarray(affine, dtype=np.float64)[:3, :3])
    return _apply_linear(dvf_mm, _as_like(inv, dvf_mm))


def voxel_spacing(affine: Any) -> tuple[float, float, float]:
    """Voxel size in mm along each array axis (column norms of the 3x3 part)."""
    import numpy as np

    a = np.asarray(affine, dtype=np.float64)
    return tuple(float(x) for x in np.sqrt((a[:3, :3] ** 2).sum(axis=0)))
