"""Instance-optimised refinement of a displacement field: greedy diffeomorphic LNCC ascent.

(About 620 lines: the deformable and the affine ascent share the kernels, the sampler and the
per-level constants, and are traced together into the refine graphs; the mutual-information
similarity lives in :mod:`gvsl.mutual_information`.)

The registration network predicts a transform in one shot; this module
improves it for the one pair at hand, the way ANTs' greedy SyN does, with
plain tensor operations (no autograd), so the same code runs eagerly in
PyTorch and exports, unchanged, as the ``refine.onnx`` graph that the
torch-free runtime runs on every backend.

One iteration, on one grid (voxel units; pull-back convention of
:mod:`gvsl.spatial`: ``warped(p) = moving(p + dvf(p))``). The grid's voxels may
be anisotropic (a chest CT's 3 x 3 x 10 mm): every length of the method (window,
Gaussians, step) is measured in voxels of the finest axis, i.e. in millimetres,
so a coarser axis gets proportionally fewer voxels of each and the same
physical behaviour as on an isotropic grid, at a fraction of its voxels:

1. ``warped = moving ∘ (id + dvf)`` (trilinear);
2. the local normalised cross-correlation ``CC = s_fw^2 / (s_ff s_ww)`` of
   ``fixed`` and ``warped`` over a ``(2r+1)^3`` window, and its analytic
   derivative with respect to ``warped`` (Avants et al. 2008, the form ANTs
   uses): ``dCC/dw = 2 s_fw / (s_ff s_ww) * ((f - mean_f) - s_fw / s_ww * (w - mean_w))``.
   The local means and (co)variances come from one separable box filter
   (three 1-D convolutions over stacked maps, divided by the window's voxel
   count); the fixed image's own mean and variance, the identity grid, the
   per-axis kernels and the border renormalisers depend on the grid alone
   and are computed once per level (:func:`refine_constants`);
3. the force ``dCC/dw * grad(warped)`` is smoothed by a Gaussian
   (``sigma_update``, the "fluid" regulariser) and scaled robustly: the mean
   vector length of the first iteration maps to half of ``step`` voxels for
   the whole run (so steps shrink as the images align) and no vector is
   longer than ``step`` (a max-norm scaling, ANTs' choice, lets one strong
   edge freeze every other voxel; measured 0.76 against 0.81 Dice on MNI
   pairs);
4. the small update ``v`` is composed with the field:
   ``dvf <- v + dvf ∘ (id + v)`` (the field is read with edge clamping), so
   each step is a small diffeomorphism and the composite stays invertible;
5. the total field is pulled towards its Gaussian-smoothed self
   (``sigma_total``) by the fraction ``regularisation`` (0 = none, 1 = full
   smoothing every step): the "elastic" regulariser, one knob at run time.

With ``RefineSettings(similarity="mi")`` step 2 is replaced by the derivative of
the global mutual information of a Parzen joint histogram (:func:`gvsl.mutual_information.mi_force`),
for pairs of two modalities (CT onto MR), the rest being the same; that graph
is exported as ``refine_mi.onnx``.

:func:`affine_step` is the same ascent for a 12-parameter affine about the
grid centre (the voxel force projected on the parameters, each part
normalised to move the grid by ``step`` voxels, the step shrinking to zero
over the run): the stage that aligns two scans before the network sees them.

The Gaussian widths and the window radius are graph constants
(:class:`RefineSettings`, recorded in the export's metadata); the grid's voxel
sizes, step size, regularisation and the iteration count are run-time inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from gvsl.mutual_information import mi_force
from gvsl.spatial import identity_grid, image_gradient

__all__ = [
    "AffineConstants",
    "AffineStep",
    "LevelConstants",
    "RefineConstants",
    "RefineSettings",
    "RefineStep",
    "SIMILARITIES",
    "Window",
    "advance",
    "affine_constants",
    "affine_locations",
    "affine_step",
    "axis_scale",
    "box_taps",
    "box_window",
    "cc_force",
    "fixed_moments",
    "gaussian_taps",
    "local_cc",
    "refine",
    "refine_affine",
    "refine_constants",
    "refine_step",
    "sample_clamped",
    "smooth",
    "smooth_norm",
]

#: guards the CC ratios; far below the product of two local variances of [0, 1] images (~1e-8 for
#: 1 % noise), so flat regions keep a normalised gradient and identical images get none
_EPS = 1e-10
#: Local variance (intensities in [0, 1]) below which a window counts as flat: 1 % noise.
VARIANCE_FLOOR = 1e-4
#: What the refinement can maximise (:class:`RefineSettings`.similarity).
SIMILARITIES = ("ncc", "mi")


@dataclass(frozen=True)
class RefineSettings:
    """Constants of the refinement graph (all in voxels of the finest axis of the grid it runs on).

    ``radius``: half-width of the local-CC window (3 -> 7^3 voxels, 14 mm at
    2 mm); ``sigma_update`` / ``sigma_total``: Gaussian widths of the update
    and of the total-field smoothing; ``truncate``: kernel half-width in
    sigmas. ``radius`` is the best of a sweep on MNI pairs at 4 -> 2 mm
    (radius 1/2/3); ``sigma_update`` 3 with kernels cut at 2 sigmas (13 taps, as
    many as sigma 2 cut at 3) replaced 2 / 3 after a sweep at the 6 -> 3 mm
    pyramid on tuning pairs of other seeds (EVALUATION.md §1.1g): +0.007 to
    +0.011 Dice on MNI and both CT sets, the real brain MRs unchanged.
    ``similarity``: what the ascent maximises, ``"ncc"`` (local CC over the window) or
    ``"mi"`` (global mutual information of a Parzen joint histogram,
    :func:`gvsl.mutual_information.mi_force`: for two modalities, where intensities are related but not alike).
    """

    radius: int = 3
    sigma_update: float = 3.0
    sigma_total: float = 1.0
    truncate: float = 2.0
    similarity: str = "ncc"

    def __post_init__(self) -> None:
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"similarity {self.similarity!r}: use one of {', '.join(SIMILARITIES)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RefineSettings:
        keys = ("radius", "sigma_update", "sigma_total", "truncate", "similarity")
        return cls(**{k: d[k] for k in keys if k in d})


def axis_scale(spacing: torch.Tensor) -> torch.Tensor:
    """Voxel size per axis over the finest axis's, ``[3]`` (ones on an isotropic grid): the unit
    conversion that keeps :class:`RefineSettings` physical on a grid with thick slices."""
    return spacing / spacing.min()


def gaussian_taps(sigma: float, truncate: float = 3.0, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Normalised Gaussian taps per axis, ``[3, 2 ceil(truncate sigma) + 1]``: ``sigma`` is in voxels
    of the finest axis, so an axis ``scale`` times coarser gets ``sigma / scale`` voxels (the same
    width in mm, with the outer taps near zero); ``[3, 1]`` ones for sigma 0."""
    scale = torch.ones(3) if scale is None else scale
    if sigma <= 0:
        return torch.ones(3, 1, dtype=scale.dtype, device=scale.device)
    half = max(1, int(math.ceil(truncate * sigma)))
    x = torch.arange(-half, half + 1, dtype=torch.int64, device=scale.device).to(scale.dtype)
    taps = torch.exp(-0.5 * (x.view(1, -1) * (scale.view(3, 1) / sigma)) ** 2)
    return taps / taps.sum(dim=1, keepdim=True)


def box_taps(radius: int, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Box-filter taps per axis, ``[3, 2 radius + 1]`` (ones inside the window, zeros outside): a
    half-width of ``radius`` voxels of the finest axis, ``round(radius / scale)`` on a coarser one."""
    scale = torch.ones(3) if scale is None else scale
    x = torch.arange(-radius, radius + 1, dtype=torch.int64, device=scale.device).to(scale.dtype)
    reach = torch.floor(radius / scale + 0.5).view(3, 1)
    return (torch.abs(x).view(1, -1) <= reach).to(scale.dtype)


def _separable(volume: torch.Tensor, taps: torch.Tensor, channels: int) -> torch.Tensor:
    """``volume [N, channels, D, H, W]`` filtered along axis ``a`` by ``taps[a]`` (zero padding)."""
    size = taps.shape[1]
    half = size // 2
    out = volume
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = size
        pad = [0, 0, 0]
        pad[axis] = half
        weight = taps[axis].to(volume.dtype).reshape(shape)
        out = F.conv3d(out, weight.expand(channels, *shape[1:]), padding=tuple(pad), groups=channels)
    return out


def smooth_norm(like: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """The border renormaliser of :func:`smooth` (and, for :func:`box_taps`, the window's voxel
    count) on the grid of ``like`` ``[N, C, D, H, W]``: the zero-padded filter of ones,
    ``[N, 1, D, H, W]``. It depends on the grid alone, so a refinement computes it once per level."""
    return _separable(torch.ones_like(like[:, :1]), taps, 1)


def smooth(field: torch.Tensor, taps: torch.Tensor, norm: torch.Tensor | None = None) -> torch.Tensor:
    """Separable Gaussian of each channel of a field ``[N, 3, D, H, W]`` (per-axis ``taps`` of
    :func:`gaussian_taps`; zero padding, renormalised at the border so a constant field stays
    constant; ``norm`` is :func:`smooth_norm` of the grid, computed here when not given)."""
    if taps.shape[1] == 1:
        return field
    # 3 channels: displacement fields; a literal so that tracing keeps the kernel shape static
    return _separable(field, taps, 3) / (smooth_norm(field, taps) if norm is None else norm)


#: The local-CC window of one grid: :func:`box_taps` and their window sizes (:func:`smooth_norm`).
Window = tuple[torch.Tensor, torch.Tensor]


def box_window(like: torch.Tensor, radius: int, scale: torch.Tensor | None = None) -> Window:
    """The local-CC window on the grid of ``like``: ``radius`` voxels of the finest axis, border
    windows cropped."""
    taps = box_taps(radius, scale).to(like)  # dtype and device of the images
    return taps, smooth_norm(like, taps)


def _box(maps: torch.Tensor, window: Window, channels: int) -> torch.Tensor:
    """Local means of ``maps [N, channels, ...]`` over the window (border windows are cropped)."""
    taps, count = window
    return _separable(maps, taps, channels) / count


def fixed_moments(fixed: torch.Tensor, window: Window) -> tuple[torch.Tensor, torch.Tensor]:
    """Local mean and variance of ``fixed`` over the CC window: constant while ``warped``
    changes, so a refinement computes them once per level."""
    means = _box(torch.cat([fixed, fixed * fixed], dim=1), window, 2)
    mean_f, mean_ff = means[:, 0:1], means[:, 1:2]  # slices, not Split
    return mean_f, (mean_ff - mean_f * mean_f).clamp(min=0.0)


def _local_moments(
    fixed: torch.Tensor,
    warped: torch.Tensor,
    window: Window,
    moments: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, ...]:
    """Local means and (co)variances of the pair; ``moments`` are :func:`fixed_moments`
    of ``fixed`` when already known (three maps go through the box filter, not five)."""
    mean_f, s_ff = fixed_moments(fixed, window) if moments is None else moments
    means = _box(torch.cat([warped, warped * warped, fixed * warped], dim=1), window, 3)
    mean_w, mean_ww, mean_fw = (means[:, k : k + 1] for k in range(3))  # slices, not Split
    s_ww = (mean_ww - mean_w * mean_w).clamp(min=0.0)
    s_fw = mean_fw - mean_f * mean_w
    return mean_f, mean_w, s_ff, s_ww, s_fw


def local_cc(
    fixed: torch.Tensor,
    warped: torch.Tensor,
    radius: int = 2,
    window: Window | None = None,
    moments: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Mean local normalised cross-correlation (squared, as ANTs' CC metric) of two volumes, over
    an isotropic ``radius`` window or the given ``window`` (``moments``: :func:`fixed_moments`)."""
    window = box_window(fixed, radius) if window is None else window
    _, _, s_ff, s_ww, s_fw = _local_moments(fixed, warped, window, moments)
    return (s_fw * s_fw / (s_ff * s_ww + _EPS)).mean()


def cc_force(
    fixed: torch.Tensor,
    warped: torch.Tensor,
    radius: int = 2,
    moments: tuple[torch.Tensor, torch.Tensor] | None = None,
    window: Window | None = None,
) -> torch.Tensor:
    """Ascent direction of local CC for the pull-back field: ``dCC/dw * grad(warped)``, ``[N, 3, ...]``,
    the gradient per voxel of each axis (``moments``: :func:`fixed_moments` of ``fixed``, when
    already known; ``window``: the CC window, else an isotropic ``radius``)."""
    window = box_window(fixed, radius) if window is None else window
    mean_f, mean_w, s_ff, s_ww, s_fw = _local_moments(fixed, warped, window, moments)
    # The prefactor's variances have a noise floor: where a window is nearly flat, the exact CC
    # gradient is so steep that fixed-size steps oscillate. The bracket stays exact, so aligned
    # images (warped = fixed) get no force at all.
    prefactor = 2.0 * s_fw / ((s_ff + VARIANCE_FLOOR) * (s_ww + VARIANCE_FLOOR))
    coeff = prefactor * ((fixed - mean_f) - s_fw / (s_ww + _EPS) * (warped - mean_w))
    return coeff * image_gradient(warped)


def _sizes(volume: torch.Tensor) -> list[Any]:
    """Spatial sizes of ``volume``: ints in eager mode, 0-d tensors while tracing (dynamic export)."""
    return [volume.shape[2 + axis] for axis in range(3)]


def _grid_sample_border(src: torch.Tensor, locs: torch.Tensor) -> torch.Tensor:
    sizes = [2.0 / max(int(n) - 1, 1) for n in src.shape[2:]]
    scale = torch.tensor(sizes, dtype=locs.dtype, device=locs.device).view(1, 3, 1, 1, 1)
    grid = (locs * scale - 1.0).permute(0, 2, 3, 4, 1).flip(-1)
    return F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=True)


def sample_clamped(src: torch.Tensor, locs: torch.Tensor) -> torch.Tensor:
    """Trilinear read of ``src [1, C, D, H, W]`` at voxel positions ``locs [1, 3, D', H', W']``,
    positions clamped into the grid (edge values outside: right for fields, and for
    images whose border is background).

    Each channel is read by eight ``gather`` calls (ONNX GatherElements, the fastest
    gather of ONNX Runtime's CPU provider) on the flattened volume, all sharing one
    int32 index vector per corner (half the bytes of int64; a level grid has far fewer
    than 2^31 voxels): index memory does not scale with the channel count. One channel
    is blended by seven lerps (21 element-wise operations), several by the eight corner
    weights they share; at 128 x 128 x 112 this reads an image in 0.70x and a field in
    0.85x the time of int64 indices and weights throughout (ONNX Runtime, 2 threads).
    """
    if not torch.jit.is_tracing():  # eager: PyTorch's kernel computes the same clamped trilinear read
        return _grid_sample_border(src, locs)
    d, h, w = _sizes(src)
    c = src.shape[1]
    channels = [src[:, k].reshape(1, -1) for k in range(c)]
    pts = locs.reshape(3, -1)
    hi = torch.stack([torch.as_tensor(n).to(locs.dtype) - 1.0 for n in (d, h, w)]).view(3, 1)
    pts = torch.minimum(pts.clamp(min=0.0), hi)
    base = torch.minimum(torch.floor(pts), (hi - 1.0).clamp(min=0.0))
    frac = pts - base
    ib = base.to(torch.int32)
    stride_d = torch.as_tensor(h * w).to(torch.int32)
    stride_h = torch.as_tensor(w).to(torch.int32)
    i000 = (ib[0:1] * stride_d + ib[1:2] * stride_h + ib[2:3]).reshape(1, -1)
    i100 = i000 + stride_d
    i010, i110 = i000 + stride_h, i100 + stride_h
    corners = (i000, i000 + 1, i010, i010 + 1, i100, i100 + 1, i110, i110 + 1)  # bits (d, h, w)
    fd, fh, fw = frac[0:1], frac[1:2], frac[2:3]
    if c == 1:
        v = [torch.gather(channels[0], 1, index) for index in corners]
        along_w = [v[k] + fw * (v[k + 1] - v[k]) for k in (0, 2, 4, 6)]
        along_h = [along_w[k] + fh * (along_w[k + 1] - along_w[k]) for k in (0, 2)]
        return (along_h[0] + fd * (along_h[1] - along_h[0])).reshape(1, 1, *locs.shape[2:])
    gd, gh, gw = 1.0 - fd, 1.0 - fh, 1.0 - fw
    dh = (gd * gh, gd * fh, fd * gh, fd * fh)
    out: list[torch.Tensor] = []
    for k, index in enumerate(corners):
        weight = dh[k // 2] * (fw if k % 2 else gw)
        terms = [torch.gather(channel, 1, index) * weight for channel in channels]
        out = terms if not out else [acc + term for acc, term in zip(out, terms, strict=True)]
    return torch.cat(out, dim=0).reshape(1, c, *locs.shape[2:])


#: Smallest reference update length (mean over voxels, before scaling): images normalised to
#: [0, 1] give about 0.07 when misaligned (0.006 at a tenth of the contrast) and 5e-8 when identical,
#: so already aligned pairs are not pushed around by their residual noise.
MIN_REFERENCE = 1e-2


class LevelConstants(NamedTuple):
    """What every iteration on one grid shares (:func:`refine_constants`): the identity grid, the
    fixed image's local mean and variance, the axis scale ``[1, 3, 1, 1, 1]``
    (:func:`axis_scale`), the update / total-field Gaussians and the CC window's taps
    (``[3, K]`` each), the window's voxel counts and the Gaussians' border renormalisers."""

    grid: torch.Tensor
    fixed_mean: torch.Tensor
    fixed_variance: torch.Tensor
    scale: torch.Tensor
    update_taps: torch.Tensor
    total_taps: torch.Tensor
    box_taps: torch.Tensor
    box_count: torch.Tensor
    update_norm: torch.Tensor
    total_norm: torch.Tensor

    @property
    def window(self) -> Window:
        return self.box_taps, self.box_count

    @property
    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fixed_mean, self.fixed_variance


def refine_constants(
    fixed: torch.Tensor, settings: RefineSettings | None = None, spacing: torch.Tensor | None = None
) -> LevelConstants:
    """:class:`LevelConstants` of the grid of ``fixed`` with voxel sizes ``spacing`` (``[3]``,
    any unit; ``None`` = isotropic): the settings' kernels per axis in physical units, then
    the fixed image's local moments and the renormalisers, all computed once per level."""
    settings = settings or RefineSettings()
    scale = torch.ones(3, dtype=fixed.dtype, device=fixed.device) if spacing is None else axis_scale(spacing.to(fixed))
    update_taps = gaussian_taps(settings.sigma_update, settings.truncate, scale)
    total_taps = gaussian_taps(settings.sigma_total, settings.truncate, scale)
    window = box_window(fixed, settings.radius, scale)
    mean_f, s_ff = fixed_moments(fixed, window)
    grid = identity_grid(_sizes(fixed), fixed.device, fixed.dtype)
    return LevelConstants(
        grid,
        mean_f,
        s_ff,
        scale.view(1, 3, 1, 1, 1),
        update_taps,
        total_taps,
        *window,
        smooth_norm(fixed, update_taps),
        smooth_norm(fixed, total_taps),
    )


def refine_step(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    dvf: torch.Tensor,
    step: torch.Tensor,
    regularisation: torch.Tensor,
    iteration: torch.Tensor,
    reference: torch.Tensor,
    level: LevelConstants,
    similarity: str = "ncc",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One greedy iteration (module docstring; ``similarity`` "ncc" or "mi", the force of
    :func:`cc_force` or :func:`gvsl.mutual_information.mi_force`); returns the new field and the reference length.

    ``step``/``regularisation``/``reference`` are 1-element tensors, ``iteration`` the
    0-based iteration number: at iteration 0 the mean update length becomes the
    ``reference`` that maps to half a step for the rest of the run, so updates shrink
    as the images come into alignment. ``level`` is :func:`refine_constants` of the grid.
    """
    warped = sample_clamped(moving, level.grid + dvf)
    if similarity == "mi":
        force = mi_force(fixed, warped)
    else:
        force = cc_force(fixed, warped, moments=level.moments, window=level.window)
    # the gradient per voxel of each axis, made per voxel of the finest axis (physical units)
    return advance(dvf, force / level.scale, step, regularisation, iteration, reference, level)


def advance(
    dvf: torch.Tensor,
    force: torch.Tensor,
    step: torch.Tensor,
    regularisation: torch.Tensor,
    iteration: torch.Tensor,
    reference: torch.Tensor,
    level: LevelConstants,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The part of an iteration that follows the similarity's ``force [1, 3, ...]`` (steps 3-5 of
    the module docstring: smoothing, step control, composition, regularisation), whatever
    similarity made the force, given per voxel of the grid's finest axis; returns the new
    field (voxels of each axis) and the reference length."""
    update = smooth(force, level.update_taps, level.update_norm)
    length = torch.sqrt((update * update).sum(dim=1, keepdim=True))
    current = torch.clamp(length.mean(), min=MIN_REFERENCE).reshape(1)
    reference = torch.where(iteration.reshape(1) == 0, current, reference.reshape(1))
    gain = (0.5 * step / reference).view(1, 1, 1, 1, 1)
    # no vector longer than one step (of the finest axis), then in voxels of each axis
    update = update * gain / torch.clamp(length * gain / step.view(1, 1, 1, 1, 1), min=1.0) / level.scale
    composed = update + sample_clamped(dvf, level.grid + update)
    smoothed = smooth(composed, level.total_taps, level.total_norm)
    return composed + regularisation.view(1, 1, 1, 1, 1) * (smoothed - composed), reference


def refine(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    dvf: torch.Tensor | None = None,
    iterations: int = 30,
    step: float = 0.5,
    regularisation: float = 0.3,
    settings: RefineSettings | None = None,
    spacing: Sequence[float] | None = None,
) -> torch.Tensor:
    """``iterations`` greedy LNCC steps from ``dvf`` (zero when ``None``); returns the refined field.

    ``fixed``/``moving`` ``[1, 1, D, H, W]`` on one grid of voxel sizes ``spacing`` (``None`` =
    isotropic), ``dvf`` ``[1, 3, D, H, W]`` voxels.
    """
    settings = settings or RefineSettings()
    module = RefineStep(settings)
    like = {"dtype": fixed.dtype, "device": fixed.device}  # on the images' device (CPU or GPU)
    field = torch.zeros(fixed.shape[0], 3, *fixed.shape[2:], **like) if dvf is None else dvf
    step_t = torch.tensor([float(step)], **like)
    reg_t = torch.tensor([float(regularisation)], **like)
    reference = torch.ones(1, **like)
    spacing_t = torch.ones(3, **like) if spacing is None else torch.tensor(spacing, **like)
    with torch.no_grad():
        constants = RefineConstants(settings)(fixed, spacing_t)
        for k in range(int(iterations)):
            iteration = torch.tensor(k, device=fixed.device)
            field, reference = module(fixed, moving, field, step_t, reg_t, iteration, reference, *constants)
    return field


class RefineConstants(nn.Module):
    """:func:`refine_constants` for fixed settings: the part of ``refine.onnx`` that runs once,
    before the ``Loop`` (``spacing`` is a run-time input of the graph)."""

    def __init__(self, settings: RefineSettings | None = None) -> None:
        super().__init__()
        self.settings = settings or RefineSettings()

    def forward(self, fixed: torch.Tensor, spacing: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(refine_constants(fixed, self.settings, spacing))


class RefineStep(nn.Module):
    """:func:`refine_step`: the body traced into ``refine.onnx``; the trailing inputs are the
    fields of :class:`LevelConstants` (the outputs of :class:`RefineConstants`, same grid)."""

    def __init__(self, settings: RefineSettings | None = None) -> None:
        super().__init__()
        self.settings = settings or RefineSettings()

    def forward(
        self,
        fixed: torch.Tensor,
        moving: torch.Tensor,
        dvf: torch.Tensor,
        step: torch.Tensor,
        regularisation: torch.Tensor,
        iteration: torch.Tensor,
        reference: torch.Tensor,
        *constants: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        level = LevelConstants(*constants)
        similarity = self.settings.similarity
        return refine_step(fixed, moving, dvf, step, regularisation, iteration, reference, level, similarity)


def _centred_grid(sizes: list[Any], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Voxel positions ``[1, 3, V]`` about the grid centre, and the centre ``[1, 3, 1]``."""
    grid = identity_grid(sizes, like.device, like.dtype).reshape(1, 3, -1)
    centre = torch.stack([torch.as_tensor(n).to(like.dtype) for n in sizes]).view(1, 3, 1) * 0.5 - 0.5
    return grid - centre, centre


def affine_locations(matrix: torch.Tensor, sizes: list[Any]) -> torch.Tensor:
    """Sampling positions ``c + M (p - c) + t`` of a centred voxel affine ``[1, 3, 4] = [M | t]``."""
    centred, centre = _centred_grid(sizes, matrix)
    locs = matrix[:, :, :3] @ centred + matrix[:, :, 3:] + centre
    return locs.reshape(1, 3, *sizes)


def affine_constants(fixed: torch.Tensor, radius: int) -> tuple[torch.Tensor, ...]:
    """What every affine step on one grid shares, computed once: the CC window's taps and voxel
    counts (:func:`box_window`) and the fixed image's local mean and variance."""
    window = box_window(fixed, radius)
    return (*window, *fixed_moments(fixed, window))


def affine_step(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    matrix: torch.Tensor,
    step: torch.Tensor,
    iteration: torch.Tensor,
    iterations: torch.Tensor,
    radius: int = 2,
    constants: tuple[torch.Tensor, ...] | None = None,
) -> torch.Tensor:
    """One gradient-ascent step of local CC for a centred voxel affine ``[1, 3, 4]``.

    The voxel force of :func:`cc_force` is projected on the 12 parameters
    (``sum F q^T`` and ``sum F``, with ``q`` the centred voxel position); the
    linear part is scaled by the grid's half-extent so that one ``step``
    moves no voxel of the grid much more than ``step`` voxels, and the step
    shrinks linearly to zero over ``iterations``. ``constants`` are :func:`affine_constants`
    of the grid (computed here when not given).
    """
    box_taps, box_count, mean_f, s_ff = affine_constants(fixed, radius) if constants is None else constants
    sizes = _sizes(fixed)
    centred, _ = _centred_grid(sizes, matrix)
    warped = sample_clamped(moving, affine_locations(matrix, sizes))
    force = cc_force(fixed, warped, moments=(mean_f, s_ff), window=(box_taps, box_count)).reshape(1, 3, -1)
    extent = torch.sqrt((centred * centred).sum(dim=1)).amax().clamp(min=1.0)
    grad_linear = force @ centred.transpose(1, 2)  # [1, 3, 3]
    grad_shift = force.sum(dim=2, keepdim=True)  # [1, 3, 1]
    # each part is normalised on its own: the shift moves by `step` voxels, the linear part moves
    # the grid's edge by `step` voxels, so neither starves the other
    norm_linear = torch.sqrt((grad_linear * grad_linear).sum()).clamp(min=1e-12)
    norm_shift = torch.sqrt((grad_shift * grad_shift).sum()).clamp(min=1e-12)
    decay = 1.0 - iteration.to(matrix.dtype) / iterations.to(matrix.dtype).clamp(min=1.0)
    size = step.view(1, 1, 1) * decay
    linear = matrix[:, :, :3] + grad_linear * (size / (norm_linear * extent))
    return torch.cat([linear, matrix[:, :, 3:] + grad_shift * (size / norm_shift)], dim=2)


def refine_affine(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    matrix: torch.Tensor | None = None,
    iterations: int = 40,
    step: float = 1.0,
    settings: RefineSettings | None = None,
) -> torch.Tensor:
    """``iterations`` steps of :func:`affine_step` from ``matrix`` (identity when ``None``)."""
    settings = settings or RefineSettings()
    like = {"dtype": fixed.dtype, "device": fixed.device}
    current = torch.eye(3, 4, **like)[None] if matrix is None else matrix
    step_t = torch.tensor([float(step)], **like)
    total = torch.tensor(int(iterations), device=fixed.device)
    with torch.no_grad():
        constants = affine_constants(fixed, settings.radius)
        for k in range(int(iterations)):
            iteration = torch.tensor(k, device=fixed.device)
            current = affine_step(fixed, moving, current, step_t, iteration, total, settings.radius, constants)
    return current


class AffineStep(nn.Module):
    """:func:`affine_step` with the window radius fixed: the body traced into ``refine_affine.onnx``;
    the trailing inputs are the outputs of :class:`AffineConstants` for the same grid."""

    def __init__(self, settings: RefineSettings | None = None) -> None:
        super().__init__()
        self.settings = settings or RefineSettings()

    def forward(
        self,
        fixed: torch.Tensor,
        moving: torch.Tensor,
        matrix: torch.Tensor,
        step: torch.Tensor,
        iteration: torch.Tensor,
        iterations: torch.Tensor,
        *constants: torch.Tensor,
    ) -> torch.Tensor:
        return affine_step(fixed, moving, matrix, step, iteration, iterations, self.settings.radius, constants)


class AffineConstants(nn.Module):
    """:func:`affine_constants` for fixed settings: the part of ``refine_affine.onnx`` that runs
    once, before the ``Loop``."""

    def __init__(self, settings: RefineSettings | None = None) -> None:
        super().__init__()
        self.settings = settings or RefineSettings()

    def forward(self, fixed: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return affine_constants(fixed, self.settings.radius)
