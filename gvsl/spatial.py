"""Spatial operations of GVSL: grids, affine and displacement warps, composition.

The one module every part of gvsl warps with (model heads, augmentation,
export). Everything reduces to a single primitive, :func:`sample`, which reads
a volume at voxel positions with one of two interchangeable samplers:
``"grid_sample"`` (PyTorch's kernel, the default) or ``"gather"`` (8-neighbour
row gathers on the channels-last volume with int32 indices, the same numbers;
TensorRT has no 5-D GridSample, so exported registration graphs use this one).

Every function here is export-friendly: while ``torch.onnx.export`` traces,
spatial sizes arrive as 0-d tensors and are kept as tensors, so the graph
accepts any (multiple-of-16) size; in eager mode they are plain ints and the
arithmetic is exactly the historical one.

Conventions (see GVSL_SPEC.md §3):

* tensors are ``[N, C, D, H, W]``; a voxel position is ``(d, h, w)``;
  displacement channel ``a`` moves along array axis ``a`` in voxels;
* the affine head's matrix ``mat = [M | t]`` acts on positions in
  ``(x=W, y=H, z=D)`` order, read in one of two conventions
  (:data:`AFFINE_CONVENTIONS`, ``ModelConfig.affine_convention``):
  ``"centered"`` (new models) about the grid centre ``(size - 1) / 2`` in
  voxels, ``t`` in voxels, so the same matrix is the same transform on any
  grid shape; ``"official"``, like the authors' code, on PyTorch's normalised
  coordinates with ``align_corners=False``, after the translation of row
  ``i`` is divided by spatial size ``i`` taken in (D, H, W) order (kept for
  checkpoint parity; on a non-cubic grid a rotation shears and a shift's
  size depends on the axis). On a cube the two agree once ``t`` is halved.
  :func:`affine_to_voxel` turns either into an equivalent matrix on voxel
  indices, so affine and deformable warps share one sampler;
* displacement fields are applied in voxel units with ``align_corners=True``
  semantics (voxel ``i`` sits at normalised ``2 i / (n - 1) - 1``): a zero
  field is an exact identity. The official code normalises this way but calls
  ``grid_sample(align_corners=False)``, which shifts and shrinks the grid by
  half a voxel; pass ``align_corners=False`` to reproduce that exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from gvsl.runtime.geometry import (
    AFFINE_CONVENTIONS,
    check_affine_convention,
    dvf_mm_to_voxel,
    dvf_voxel_to_mm,
    voxel_spacing,
)

__all__ = [
    "AFFINE_CONVENTIONS",
    "affine_from_params",
    "affine_to_voxel",
    "affine_warp",
    "compose_affine_dvf",
    "dvf_mm_to_voxel",
    "dvf_voxel_to_mm",
    "dvf_warp",
    "identity_grid",
    "image_gradient",
    "sample",
    "SAMPLERS",
    "voxel_affine_locations",
    "voxel_spacing",
    "ROT_RANGE",
    "SCALE_RANGE",
    "SHEAR_RANGE",
]

#: Limits of the affine head (and of the spatial augmentation): rotation
#: +-pi/9 per axis, scale 1 +- 0.25, shear +-pi/18.
ROT_RANGE = math.pi / 9
SCALE_RANGE = 0.25
SHEAR_RANGE = math.pi / 18

#: The interchangeable implementations of :func:`sample`.
SAMPLERS = ("grid_sample", "gather")


def _traced(shape: Sequence[object]) -> bool:
    """True while ``torch.onnx.export`` traces: sizes are 0-d tensors, not ints."""
    return any(isinstance(n, torch.Tensor) for n in shape)


def _size_vector(shape: Sequence[object], dtype: torch.dtype, device: torch.device | None) -> torch.Tensor:
    """Spatial sizes ``(D, H, W)`` as a float vector that stays dynamic under tracing."""
    if _traced(shape):
        sizes = [n if isinstance(n, torch.Tensor) else torch.tensor(n) for n in shape]
        return torch.stack([n.to(dtype) for n in sizes]).to(device)
    return torch.tensor([float(n) for n in shape], dtype=dtype, device=device)


def identity_grid(
    shape: Sequence[int], device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Voxel indices of a ``(D, H, W)`` grid as ``[1, 3, D, H, W]``."""
    # integer Range then Cast: TensorRT's parser has long restricted float Range
    axes = [torch.arange(n if isinstance(n, torch.Tensor) else int(n), device=device).to(dtype) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))[None]


def sample(
    src: torch.Tensor,
    locs: torch.Tensor,
    mode: str = "bilinear",
    align_corners: bool = True,
    sampler: str = "grid_sample",
) -> torch.Tensor:
    """Read ``src [N, C, D, H, W]`` at voxel positions ``locs [N, 3, d, h, w]``.

    Trilinear (``mode="bilinear"``) or ``"nearest"``; outside the volume reads
    zero. ``align_corners=False`` applies the official DVF normalisation with
    ``grid_sample``'s default, for parity with the authors' warped output.
    ``sampler`` picks the implementation (:data:`SAMPLERS`); both give the
    same result up to float rounding.
    """
    if sampler == "gather":
        return _gather_sample(src, locs, mode, align_corners)
    if sampler != "grid_sample":
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    shape = src.shape[2:]
    if _traced(shape):
        scale = (2.0 / (_size_vector(shape, locs.dtype, locs.device) - 1.0).clamp(min=1.0)).view(1, 3, 1, 1, 1)
    else:
        scale = torch.tensor(
            [2.0 / max(int(n) - 1, 1) for n in shape], device=locs.device, dtype=locs.dtype
        ).view(1, 3, 1, 1, 1)
    norm = locs * scale - 1.0
    grid = norm.permute(0, 2, 3, 4, 1).flip(-1)  # (d, h, w) -> grid_sample's (x, y, z)
    if grid.shape[0] != src.shape[0]:
        grid = grid.expand(src.shape[0], *grid.shape[1:])
    return F.grid_sample(src, grid, mode=mode, padding_mode="zeros", align_corners=align_corners)


#: Largest ``N * D * H * W`` the int32 flat indices of the gather sampler address
#: (eager mode falls back to int64 beyond it; a traced graph is int32 throughout).
_INT32_VOXELS = 2**31 - 1


def _gather_sample(src: torch.Tensor, locs: torch.Tensor, mode: str, align_corners: bool) -> torch.Tensor:
    """:func:`sample` from elementwise ops and 8 row gathers (ONNX Gather, axis 0).

    Same semantics as ``grid_sample`` with zero padding: each of the 8
    neighbours (1 for nearest) outside the volume contributes zero. The
    volume is read channels-last as rows ``[N * V, C]`` (one copy of ``src``),
    so each corner's flat index is one int32 per sampled point, ``[N * P]``,
    and a gather fetches all C channels of a row at once: no index tensor
    grows with the channels (the earlier GatherElements form expanded int64
    indices to ``[N, C, P]`` per corner). Clamping happens in float (TensorRT
    has no integer Clip); the flat index is formed in integers, exact for any
    volume (int32 while ``N * V`` fits, as always in exported graphs).
    """
    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"mode must be 'bilinear' or 'nearest', got {mode!r}")
    n, c = src.shape[0], src.shape[1]
    shape = src.shape[2:]
    size = _size_vector(shape, locs.dtype, locs.device).view(1, 3, 1)
    pts = locs.reshape(locs.shape[0], 3, -1)  # [N|1, 3, P]
    if not align_corners:  # grid_sample(align_corners=False) of the align-corners normalisation
        pts = pts * (size / (size - 1.0).clamp(min=1.0)) - 0.5
    if pts.shape[0] != n:
        pts = pts.expand(n, 3, pts.shape[2])
    traced = _traced(shape)
    h, w = shape[1], shape[2]
    voxels = h * w * shape[0]
    index_dtype = torch.int32
    if not traced and int(n) * int(voxels) > _INT32_VOXELS:
        index_dtype = torch.int64
    rows = src.reshape(n, c, -1).transpose(1, 2).reshape(-1, c)  # [N * V, C], channels last
    batch_offset = (torch.arange(n, device=src.device) * voxels).to(index_dtype).view(-1, 1)  # [N, 1]
    hi = size - 1.0
    if mode == "nearest":
        base, frac = torch.round(pts), None
        steps: tuple[int, ...] = (0,)
    else:
        base = torch.floor(pts)
        frac = pts - base
        steps = (0, 1)
    # per axis and step: clamped integer coordinate times the axis stride, and in-volume mask
    strides = (h * w, w, 1)
    terms: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
    for axis in range(3):
        per_step = []
        for step in steps:
            coord = base[:, axis] + float(step)  # [N, P], integral floats
            ok = (coord >= 0.0) & (coord <= hi[:, axis])
            clamped = torch.minimum(coord.clamp(min=0.0), hi[:, axis]).to(index_dtype)
            stride = strides[axis]
            if isinstance(stride, torch.Tensor):
                stride = stride.to(index_dtype)
            per_step.append((clamped * stride if axis < 2 else clamped, ok))
        terms.append(per_step)
    out = None
    for sd in steps:
        for sh in steps:
            for sw in steps:
                (ld, okd), (lh, okh), (lw, okw) = terms[0][sd], terms[1][sh], terms[2][sw]
                weight = (okd & okh & okw).to(src.dtype)  # zero padding, [N, P]
                if frac is not None:
                    for axis, step in enumerate((sd, sh, sw)):
                        weight = weight * (frac[:, axis] if step else 1.0 - frac[:, axis])
                lin = (ld + lh + lw + batch_offset).reshape(-1)  # [N * P] rows of `rows`
                vals = rows.index_select(0, lin)  # [N * P, C]
                term = vals * weight.reshape(-1, 1)
                out = term if out is None else out + term
    assert out is not None
    return out.reshape(n, -1, c).transpose(1, 2).reshape(n, c, *locs.shape[2:])


def affine_from_params(
    rot: torch.Tensor, scale: torch.Tensor, trans: torch.Tensor, shear: torch.Tensor
) -> torch.Tensor:
    """Batched, differentiable ``[N, 3, 4]`` affine ``[Shear Scale Rz Ry Rx | t]``.

    ``rot`` (x, y, z) and ``shear`` (xy, xz, yx, yz, zx, zy) in radians,
    ``scale`` as factors, ``trans`` raw. Built with tensor ops only, so the
    gradient reaches the affine head (the official release lost it by going
    through Python floats) and any batch size works.
    """
    one = torch.ones_like(rot[:, 0])
    zero = torch.zeros_like(one)
    cx, cy, cz = torch.cos(rot).unbind(1)
    sx, sy, sz = torch.sin(rot).unbind(1)

    def mat(*rows: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.stack([torch.stack(list(r), dim=-1) for r in rows], dim=-2)

    rx = mat((one, zero, zero), (zero, cx, -sx), (zero, sx, cx))
    ry = mat((cy, zero, sy), (zero, one, zero), (-sy, zero, cy))
    rz = mat((cz, -sz, zero), (sz, cz, zero), (zero, zero, one))
    s0, s1, s2 = scale.unbind(1)
    sc = mat((s0, zero, zero), (zero, s1, zero), (zero, zero, s2))  # diag_embed has no ONNX export
    t = torch.tan(shear)
    sh = mat((one, t[:, 0], t[:, 1]), (t[:, 2], one, t[:, 3]), (t[:, 4], t[:, 5], one))
    m = sh @ sc @ rz @ ry @ rx
    return torch.cat([m, trans.unsqueeze(-1)], dim=-1)


def affine_to_voxel(mat: torch.Tensor, shape: Sequence[int], convention: str = "official") -> torch.Tensor:
    """Affine head ``[N, 3, 4]`` in ``convention`` -> the same map on voxel indices ``(d, h, w)``.

    Output voxel ``p`` reads input voxel ``A p + b`` (``[N, 3, 4] = [A | b]``).
    ``"centered"``: ``q -> M (q - c) + c + t`` on voxel positions ``q`` in
    (x, y, z) order about the centre ``c = (size - 1) / 2``. ``"official"``:
    with ``align_corners=False`` a voxel index ``w`` sits at normalised
    ``(2 w + 1) / W - 1``; the translation of row ``i`` is divided by
    ``shape[i]`` (D, H, W order) before ``affine_grid``. The NumPy twin is
    :func:`gvsl.runtime.geometry.network_affine_to_voxel`.
    """
    check_affine_convention(convention)
    dt, dev = mat.dtype, mat.device
    lin, t = mat[:, :, :3], mat[:, :, 3]
    if convention == "centered":
        a_vox = lin.flip(1).flip(2)
        centre = (_size_vector(shape, dt, dev) - 1.0) / 2.0  # (D, H, W)
        b_vox = centre - a_vox @ centre + t.flip(1)
        return torch.cat([a_vox, b_vox.unsqueeze(-1)], dim=-1)
    if _traced(shape):  # keep the sizes in the graph (dynamic spatial export)
        dhw = _size_vector(shape, dt, dev)
        t = t / dhw  # the size quirk
        s = 2.0 / dhw.flip(0)
    else:
        d, h, w = (float(n) for n in shape)
        t = t / torch.tensor([d, h, w], dtype=dt, device=dev)  # the size quirk
        # normalised (x, y, z) = S * (w, h, d) + c; flip converts between orders.
        s = torch.tensor([2.0 / w, 2.0 / h, 2.0 / d], dtype=dt, device=dev)
    c = s / 2.0 - 1.0
    # voxel-space linear part: P^T S^-1 A S P, with P the axis reversal.
    a_xyz = lin * s.view(1, 1, 3) / s.view(1, 3, 1)
    a_vox = a_xyz.flip(1).flip(2)
    b_xyz = (lin @ c + t - c) / s
    b_vox = b_xyz.flip(1)
    return torch.cat([a_vox, b_vox.unsqueeze(-1)], dim=-1)


def voxel_affine_locations(vox_mat: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Sampling positions ``A p + b`` for every voxel ``p`` of ``shape``: ``[N, 3, D, H, W]``."""
    grid = identity_grid(shape, vox_mat.device, vox_mat.dtype).flatten(2)  # [1, 3, V]
    locs = vox_mat[:, :, :3] @ grid + vox_mat[:, :, 3:]
    return locs.view(vox_mat.shape[0], 3, *shape)


def affine_warp(
    src: torch.Tensor,
    mat: torch.Tensor,
    mode: str = "bilinear",
    sampler: str = "grid_sample",
    convention: str = "official",
) -> torch.Tensor:
    """Warp ``src`` with the affine head's ``[N, 3, 4]``, read in ``convention``."""
    shape = src.shape[2:]
    vox = affine_to_voxel(mat, shape, convention)
    return sample(src, voxel_affine_locations(vox, shape), mode=mode, sampler=sampler)


def dvf_warp(
    src: torch.Tensor,
    dvf: torch.Tensor,
    mode: str = "bilinear",
    align_corners: bool = True,
    sampler: str = "grid_sample",
) -> torch.Tensor:
    """Warp ``src`` by a displacement field in voxels: ``out(p) = src(p + dvf(p))``."""
    grid = identity_grid(dvf.shape[2:], dvf.device, dvf.dtype)
    return sample(src, grid + dvf, mode=mode, align_corners=align_corners, sampler=sampler)


def compose_affine_dvf(mat: torch.Tensor, dvf: torch.Tensor, convention: str = "official") -> torch.Tensor:
    """Fused displacement ``psi(p) = T(p + dvf(p)) - p`` in voxels.

    ``T`` is the affine head's map (read in ``convention``); the local field acts first, in the fixed
    image's grid (GVSL supplement). ``dvf_warp(moving, fused)`` equals
    ``dvf_warp(affine_warp(moving, mat), dvf)`` up to interpolation, with a
    single resampling.
    """
    shape = dvf.shape[2:]
    vox = affine_to_voxel(mat, shape, convention)
    grid = identity_grid(shape, dvf.device, dvf.dtype)
    q = (grid + dvf).flatten(2)
    mapped = vox[:, :, :3] @ q + vox[:, :, 3:]
    return mapped.view_as(dvf) - grid


def image_gradient(volume: torch.Tensor) -> torch.Tensor:
    """Central-difference gradient ``[N, 3, D, H, W]`` of ``volume [N, 1, D, H, W]`` (edge-replicated)."""
    padded = F.pad(volume, (1, 1, 1, 1, 1, 1), mode="replicate")
    gd = (padded[:, :, 2:, 1:-1, 1:-1] - padded[:, :, :-2, 1:-1, 1:-1]) * 0.5
    gh = (padded[:, :, 1:-1, 2:, 1:-1] - padded[:, :, 1:-1, :-2, 1:-1]) * 0.5
    gw = (padded[:, :, 1:-1, 1:-1, 2:] - padded[:, :, 1:-1, 1:-1, :-2]) * 0.5
    return torch.cat([gd, gh, gw], dim=1)
