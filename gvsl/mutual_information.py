"""Mutual information of two images, and its analytic gradient: the similarity that lets the
refinement (:mod:`gvsl.refine`, ``RefineSettings(similarity="mi")``, ``refine_mi.onnx``)
register scans of two modalities (a CT onto an MR), whose intensities are related but not alike.

Plain tensor operations (no autograd, no scatter: MatMul and gathers, which every backend
runs), so the eager PyTorch path and the exported graph compute the same thing. The joint
histogram is Parzen-windowed as Mattes et al. do (triangles for the fixed image, a quadratic
B-spline for the moving one, whose continuous derivative keeps the force free of jumps where
an intensity crosses a bin centre) and counted on a subsample of the voxels; the force reads
it at every voxel.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from gvsl.spatial import image_gradient

__all__ = ["MI_BINS", "joint_histogram", "mi_force", "mutual_information"]

#: guards the logarithms and the normalisation (as :data:`gvsl.refine._EPS`)
_EPS = 1e-10
#: Mutual information: intensity bins of the joint histogram (ANTs' Mattes MI default), the
#: Gaussian (in bins) that smooths it, and the stride of the voxels it is counted on (every
#: second voxel along each axis: an eighth of the voxels, still ~10^5 counts for 32^2 bins on
#: a 6 mm grid; the force reads the histogram at every voxel).
MI_BINS = 32
MI_SMOOTHING = 1.0
MI_STRIDE = 2


def _bin_positions(volume: torch.Tensor, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each voxel of ``volume`` (intensities clamped to [0, 1]) as a position on ``bins``
    bin centres: the lower bin ``[1, V]`` (float, ``0 .. bins - 2``) and the fraction towards the next."""
    position = volume.reshape(1, -1).clamp(0.0, 1.0) * float(bins - 1)
    low = torch.clamp(torch.floor(position), max=float(bins - 2))
    return low, position - low


def _spline(u: torch.Tensor) -> torch.Tensor:
    """The quadratic B-spline (support ``|u| < 1.5``, sums to one over integer shifts)."""
    a = torch.abs(u)
    return torch.where(a < 0.5, 0.75 - u * u, 0.5 * torch.relu(1.5 - a) ** 2)


def _spline_slope(u: torch.Tensor) -> torch.Tensor:
    """Derivative of :func:`_spline`: continuous, so the force does not jump where an intensity
    crosses a bin centre."""
    a = torch.abs(u)
    return torch.where(a < 0.5, -2.0 * u, -torch.sign(u) * torch.relu(1.5 - a))


def joint_histogram(fixed: torch.Tensor, warped: torch.Tensor, bins: int = MI_BINS) -> torch.Tensor:
    """Joint intensity distribution ``p [bins (fixed), bins (warped)]`` (sums to 1) of two images in
    [0, 1], Parzen-windowed as Mattes et al. (the fixed intensities by triangles, the warped
    ones by a quadratic B-spline, whose derivative :func:`mi_force` needs), counted on every
    :data:`MI_STRIDE`-th voxel as one matrix product of the two soft bin assignments (no
    scatter: every backend has MatMul), then smoothed by a Gaussian of :data:`MI_SMOOTHING` bins."""
    centres = torch.arange(bins, dtype=fixed.dtype, device=fixed.device).view(1, bins)

    def positions(image: torch.Tensor) -> torch.Tensor:
        sub = image[:, :, ::MI_STRIDE, ::MI_STRIDE, ::MI_STRIDE]
        return sub.reshape(-1, 1).clamp(0.0, 1.0) * float(bins - 1) - centres  # [V', bins]

    fixed_weights = torch.relu(1.0 - torch.abs(positions(fixed)))
    counts = torch.matmul(fixed_weights.transpose(0, 1), _spline(positions(warped)))
    radius = int(math.ceil(2.0 * MI_SMOOTHING))
    offsets = torch.arange(-radius, radius + 1, dtype=fixed.dtype, device=fixed.device)
    taps = torch.exp(-offsets * offsets / (2.0 * MI_SMOOTHING**2))
    taps = taps / taps.sum()
    # edge-replicated: the background bins (0) hold most of the counts, and zero padding would
    # take a share of them out of the table
    smoothed = F.pad(counts.view(1, 1, bins, bins), (radius, radius, 0, 0), mode="replicate")
    smoothed = F.conv2d(smoothed, taps.view(1, 1, 1, -1))
    smoothed = F.conv2d(F.pad(smoothed, (0, 0, radius, radius), mode="replicate"), taps.view(1, 1, -1, 1))
    smoothed = smoothed.view(bins, bins)
    return smoothed / smoothed.sum().clamp(min=_EPS)


def mutual_information(fixed: torch.Tensor, warped: torch.Tensor, bins: int = MI_BINS) -> torch.Tensor:
    """Mutual information (nats) of :func:`joint_histogram`, a 0-d tensor."""
    p = joint_histogram(fixed, warped, bins)
    marginals = p.sum(dim=1, keepdim=True) * p.sum(dim=0, keepdim=True)
    return (p * (torch.log(p + _EPS) - torch.log(marginals + _EPS))).sum()


def mi_force(fixed: torch.Tensor, warped: torch.Tensor, bins: int = MI_BINS) -> torch.Tensor:
    """Ascent direction of the mutual information for the pull-back field, ``[N, 3, ...]``: the
    analytic derivative with respect to each warped intensity times ``grad(warped)``.

    With ``p`` the joint histogram and ``p_w`` its warped marginal, ``dMI/dw(x) ∝ sum_j
    beta'(y(x) - j) sum_i phi_i(f(x)) L_ij``, ``L = log p - log p_w``, ``y`` the warped
    intensity in bins (the fixed marginal does not move, and the ``+1`` terms cancel because
    the bin weights sum to one; the histogram's smoothing is left out of the derivative).
    Only the two fixed bins around ``f(x)`` and the three warped bins around ``y(x)`` count,
    so each voxel reads six entries of ``L`` (gathers from a ``bins^2`` table). Voxels whose
    warped intensity is clamped (at 0 or 1: outside the scan, or beyond the window) get none,
    faded in over the first and last bin.
    """
    p = joint_histogram(fixed, warped, bins)
    table = (torch.log(p + _EPS) - torch.log(p.sum(dim=0, keepdim=True) + _EPS)).reshape(1, -1)
    fixed_low, fixed_frac = _bin_positions(fixed, bins)
    flat = warped.reshape(1, -1)
    position = flat.clamp(0.0, 1.0) * float(bins - 1)
    centre = torch.clamp(torch.floor(position + 0.5), min=1.0, max=float(bins - 2))
    row = fixed_low * float(bins)
    slope = torch.zeros_like(position)
    for offset in (-1.0, 0.0, 1.0):
        column = centre + offset
        index = (row + column).to(torch.int64)
        entry = torch.gather(table, 1, index)
        entry = entry + fixed_frac * (torch.gather(table, 1, index + bins) - entry)
        slope = slope + _spline_slope(position - column) * entry
    # no force where the intensity is clamped, faded over one bin so that it has no jump there
    inside = torch.clamp(flat * float(bins - 1), 0.0, 1.0) * torch.clamp((1.0 - flat) * float(bins - 1), 0.0, 1.0)
    return (slope * inside * float(bins - 1)).reshape(warped.shape) * image_gradient(warped)
