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


#: How the affine head's ``[M | t]`` is read (``ModelConfig.affine_convention``):
#: ``"centered"`` about the grid centre in voxel units, the same transform on
#: any grid; ``"official"`` the authors' normalised-coordinate quirk (official
#: checkpoints). A model description without the key predates the choice and
#: was trained (or converted) with the quirk, so it reads as ``"official"``.
AFFINE_CONVENTIONS = ("centered", "official")
LEGACY_AFFINE_CONVENTION = "official"


def check_affine_convention(convention: str) -> str:
    """Return ``convention`` if it is one of :data:`AFFINE_CONVENTIONS`, else raise ValueError."""
    if convention not in AFFINE_CONVENTIONS:
        raise ValueError(f"affine_convention must be one of {AFFINE_CONVENTIONS}, got {convention!r}")
    return convention


def model_affine_convention(model: dict[str, Any]) -> str:
    """The affine convention of a model description (``ModelConfig.to_dict()``, as
    exported in ``model.json`` / ONNX metadata); missing means legacy ``"official"``."""
    return check_affine_convention(model.get("affine_convention", LEGACY_AFFINE_CONVENTION))


def network_affine_to_voxel(mat: Any, shape: Any, convention: str) -> Any:
    """The affine head's ``[3, 4]`` matrix as a ``[3, 4]`` map on voxel indices
    ``(d, h, w)``: output voxel ``p`` reads input ``A p + b``.

    ``mat = [M | t]`` acts on ``(x=W, y=H, z=D)``. ``"centered"``: ``q -> M (q - c)
    + c + t`` with ``q`` the voxel position in (x, y, z) order and ``c`` the grid
    centre ``(size - 1) / 2``, ``t`` in voxels, so the map does not depend on
    the grid's shape. ``"official"``: ``M`` acts on ``grid_sample``'s normalised
    coordinates (``align_corners=False``) after row ``i``'s translation is
    divided by ``shape[i]`` in (D, H, W) order. NumPy twin of
    :func:`gvsl.spatial.affine_to_voxel` (float64; the runtime stays torch-free).
    """
    import numpy as np

    check_affine_convention(convention)
    d, h, w = (float(n) for n in shape)
    m = np.asarray(mat, dtype=np.float64)
    lin, t = m[:, :3], m[:, 3]
    if convention == "centered":
        a_vox = lin[::-1, ::-1]
        centre = (np.array([d, h, w]) - 1.0) / 2.0
        b_vox = centre - a_vox @ centre + t[::-1]
        return np.concatenate([a_vox, b_vox[:, None]], axis=1)
    t = t / np.array([d, h, w])  # the size quirk
    s = np.array([2.0 / w, 2.0 / h, 2.0 / d])
    c = s / 2.0 - 1.0
    a_vox = (lin * s[None, :] / s[:, None])[::-1, ::-1]
    b_vox = ((lin @ c + t - c) / s)[::-1]
    return np.concatenate([a_vox, b_vox[:, None]], axis=1)
