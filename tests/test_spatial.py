"""Spatial operations: identities, known motions, composition, official conventions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gvsl.spatial import (
    affine_from_params,
    affine_to_voxel,
    affine_warp,
    compose_affine_dvf,
    dvf_mm_to_voxel,
    dvf_voxel_to_mm,
    dvf_warp,
    identity_grid,
)


def blob(shape, centre, sigma=2.5):
    g = identity_grid(shape)[0]
    c = torch.tensor(centre, dtype=torch.float32).view(3, 1, 1, 1)
    return torch.exp(-((g - c) ** 2).sum(0) / (2 * sigma**2))[None, None]


def centroid(x):
    g = identity_grid(x.shape[2:])[0]
    w = x[0, 0]
    return (g * w).sum((1, 2, 3)) / w.sum()


def params(n=1, rot=(0, 0, 0), scale=(1, 1, 1), trans=(0, 0, 0), shear=(0,) * 6):
    t = lambda v: torch.tensor([v] * n, dtype=torch.float32)  # noqa: E731
    return t(rot), t(scale), t(trans), t(shear)


@pytest.mark.parametrize("shape", [(16, 16, 16), (16, 24, 32)])
def test_identity_affine_and_zero_dvf_are_identity(shape):
    x = torch.rand(2, 3, *shape)
    eye = affine_from_params(*params(2))
    assert torch.allclose(eye, torch.eye(3, 4).expand(2, 3, 4))
    assert (affine_warp(x, eye) - x).abs().max() < 1e-5
    assert (dvf_warp(x, torch.zeros(2, 3, *shape)) - x).abs().max() < 1e-5


def test_affine_warp_matches_official_affine_grid():
    torch.manual_seed(0)
    shape = (16, 20, 24)  # non-cubic: exercises the translation-by-size quirk
    x = torch.rand(2, 1, *shape)
    mat = affine_from_params(
        torch.rand(2, 3) * 0.6 - 0.3, 1 + torch.rand(2, 3) * 0.4 - 0.2, torch.randn(2, 3), torch.rand(2, 6) * 0.3 - 0.15
    )
    norm = torch.tensor([[1, 1, 1, shape[0]], [1, 1, 1, shape[1]], [1, 1, 1, shape[2]]], dtype=torch.float32)
    grid = F.affine_grid(mat / norm, [2, 1, *shape], align_corners=False)
    ref = F.grid_sample(x, grid, align_corners=False)
    assert (affine_warp(x, mat) - ref).abs().max() < 5e-5


def test_known_translation_moves_blob():
    shape = (32, 32, 32)
    x = blob(shape, (16, 16, 16))
    # a DVF of +3 voxels along D reads from p+3: content moves by -3
    dvf = torch.zeros(1, 3, *shape)
    dvf[:, 0] = 3.0
    assert torch.allclose(centroid(dvf_warp(x, dvf)), torch.tensor([13.0, 16.0, 16.0]), atol=1e-3)
    # official affine translation: raw t along row 0 (x = W axis) moves by t/2 voxels in W
    mat = affine_from_params(*params(trans=(8.0, 0, 0)))
    vox = affine_to_voxel(mat, shape)
    assert torch.allclose(vox[0, :, 3], torch.tensor([0.0, 0.0, 4.0]), atol=1e-5)
    assert torch.allclose(centroid(affine_warp(x, mat)), torch.tensor([16.0, 16.0, 12.0]), atol=1e-2)


def test_known_rotation_about_centre():
    shape = (32, 32, 32)
    centre = 15.5  # volume centre in voxel indices (align_corners=False convention)
    x = blob(shape, (centre, centre + 8, centre))
    # rotation about z (acting on x=W, y=H) by 90 degrees
    mat = affine_from_params(*params(rot=(0, 0, math.pi / 2)))
    c = centroid(affine_warp(x, mat))
    # output(p) = input(R p): R maps (x, y) -> (-y, x), so the blob at +8 along H goes to +8 along W
    assert torch.allclose(c, torch.tensor([centre, centre, centre + 8]), atol=5e-2)


def test_affine_params_match_spec_order():
    rot = torch.tensor([[0.1, -0.2, 0.3]])
    scale = torch.tensor([[1.1, 0.9, 1.2]])
    shear = torch.tensor([[0.05, -0.04, 0.03, 0.02, -0.01, 0.06]])
    trans = torch.tensor([[1.0, 2.0, 3.0]])
    m = affine_from_params(rot, scale, trans, shear)[0]
    cx, cy, cz = np.cos([0.1, -0.2, 0.3])
    sx, sy, sz = np.sin([0.1, -0.2, 0.3])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    t = np.tan([0.05, -0.04, 0.03, 0.02, -0.01, 0.06])
    sh = np.array([[1, t[0], t[1]], [t[2], 1, t[3]], [t[4], t[5], 1]])
    ref = sh @ np.diag([1.1, 0.9, 1.2]) @ rz @ ry @ rx
    assert np.allclose(m[:, :3].numpy(), ref, atol=1e-6)
    assert np.allclose(m[:, 3].numpy(), [1, 2, 3])


def test_fused_dvf_equals_affine_then_local():
    torch.manual_seed(1)
    shape = (32, 32, 32)
    x = F.avg_pool3d(torch.rand(1, 1, *shape), 5, stride=1, padding=2)  # smooth image
    mat = affine_from_params(*params(rot=(0.1, -0.05, 0.08), scale=(1.05, 0.95, 1.0), trans=(0.5, -0.3, 0.2)))
    local = F.avg_pool3d(torch.randn(1, 3, *shape) * 2, 7, stride=1, padding=3)
    fused = compose_affine_dvf(mat, local)
    two_step = dvf_warp(affine_warp(x, mat), local)
    one_step = dvf_warp(x, fused)
    inner = (slice(None), slice(None), slice(6, -6), slice(6, -6), slice(6, -6))
    assert (two_step - one_step)[inner].abs().max() < 2e-2  # only interpolation differs
    # with a zero local field the fused field is exactly the affine's displacement
    zero = torch.zeros(1, 3, *shape)
    fused0 = compose_affine_dvf(mat, zero)
    assert (dvf_warp(x, fused0) - affine_warp(x, mat)).abs().max() < 1e-4


def test_voxel_mm_round_trip_numpy_and_torch():
    aff = np.array([[0, 0, -2.0, 10], [0, 1.5, 0, -3], [0.8, 0, 0, 5], [0, 0, 0, 1]])
    dvf = np.random.default_rng(0).normal(size=(3, 4, 5, 6)).astype(np.float32)
    mm = dvf_voxel_to_mm(dvf, aff)
    # channel 0 (array axis 0) has 0.8 mm voxels pointing along world z
    assert np.allclose(mm[2], dvf[0] * 0.8, atol=1e-6)
    assert np.allclose(dvf_mm_to_voxel(mm, aff), dvf, atol=1e-5)
    t = torch.from_numpy(dvf)[None]
    assert torch.allclose(dvf_voxel_to_mm(t, aff)[0], torch.from_numpy(mm), atol=1e-6)


def test_gradients_flow_through_affine_params():
    p = [torch.zeros(2, 3, requires_grad=True), torch.ones(2, 3, requires_grad=True)]
    trans = torch.zeros(2, 3, requires_grad=True)
    shear = torch.zeros(2, 6, requires_grad=True)
    x = torch.rand(2, 1, 16, 16, 16)
    affine_warp(x, affine_from_params(p[0], p[1], trans, shear)).square().mean().backward()
    for t in (*p, trans, shear):
        assert t.grad is not None and t.grad.abs().sum() > 0
