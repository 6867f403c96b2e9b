"""Tests of gvsl.augment: determinism, geometry of the spatial draw, Models Genesis damage."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from gvsl.augment import (
    AugmentConfig,
    Augmenter,
    _gaussian_kernels,
    appearance_damage,
    apply_intensity_lut,
    bezier_lut,
    in_painting,
    local_pixel_shuffle,
    nonlinear_intensity,
    random_affine,
    random_elastic,
    spatial_locations,
    spatial_transform,
)
from gvsl.spatial import affine_to_voxel, identity_grid

NO_SPATIAL = AugmentConfig(
    rotation=(0.0, 0.0), scale=(1.0, 1.0), shear=(0.0, 0.0), translation=(0.0, 0.0), elastic=False
)
NO_DAMAGE = {"p_shuffle": 0.0, "p_nonlinear": 0.0, "p_inpaint": 0.0}


def gen(seed: int, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def vol(n: int = 1, size: int = 32, seed: int = 0, c: int = 1) -> torch.Tensor:
    return torch.rand((n, c, size, size, size), generator=gen(seed))


def blob(shape: tuple[int, int, int], centre: tuple[float, float, float], width: float = 3.0):
    axes = torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in shape], indexing="ij")
    r2 = sum((a - c) ** 2 for a, c in zip(axes, centre, strict=True))
    return torch.exp(-r2 / (2 * width**2))[None, None]


def centre_of_mass(x: torch.Tensor) -> torch.Tensor:
    v = x[0, 0]
    axes = torch.meshgrid(*[torch.arange(s, dtype=v.dtype) for s in v.shape], indexing="ij")
    return torch.stack([(a * v).sum() / v.sum() for a in axes])


# -- determinism and batching ---------------------------------------------
def test_same_seed_same_output_and_different_seed_differs():
    x1, x2 = vol(2, 32, 0), vol(2, 32, 1)
    aug = Augmenter()
    a = aug(x1, x2, gen(7))
    b = aug(x1, x2, gen(7))
    c = aug(x1, x2, gen(8))
    for u, v, w in zip(a, b, c, strict=True):
        assert torch.equal(u, v)
        assert not torch.allclose(u, w)


def test_batch_samples_get_different_draws():
    x = vol(1, 32, 0).expand(3, -1, -1, -1, -1).contiguous()
    x1a, x1d, x2a = Augmenter(AugmentConfig(p_shuffle=1.0, p_nonlinear=1.0))(x, x, gen(3))
    for t in (x1a, x1d, x2a):
        assert t.shape == x.shape
        assert not torch.allclose(t[0], t[1]) and not torch.allclose(t[1], t[2])


def test_dtype_device_and_input_untouched():
    for dtype in (torch.float32, torch.float64):
        x1, x2 = vol(1, 32, 0).to(dtype), vol(1, 32, 1).to(dtype)
        k1, k2 = x1.clone(), x2.clone()
        for cfg in (AugmentConfig(), AugmentConfig(damage_before_spatial=True)):
            outs = Augmenter(cfg)(x1, x2, gen(0))
            for t in outs:
                assert t.dtype == dtype and t.device == x1.device and t.shape == x1.shape
            assert 0.0 <= outs[1].min() and outs[1].max() <= 1.0
        assert torch.equal(x1, k1) and torch.equal(x2, k2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_runs_with_cuda_generator():
    x1, x2 = vol(2, 32, 0).cuda(), vol(2, 32, 1).cuda()
    a = Augmenter()(x1, x2, gen(0, "cuda"))
    b = Augmenter()(x1, x2, gen(0, "cuda"))
    for u, v in zip(a, b, strict=True):
        assert u.is_cuda and torch.equal(u, v)
    with pytest.raises(ValueError, match="generator"):
        Augmenter()(x1, x2, gen(0))


def test_config_round_trip():
    cfg = AugmentConfig(p_shuffle=0.5, elastic_alpha=(0.0, 100.0))
    d = json.loads(json.dumps(cfg.to_dict()))
    assert AugmentConfig.from_dict(d) == cfg
    with pytest.raises(ValueError):
        AugmentConfig(p_flip=1.5)
    with pytest.raises(ValueError):
        AugmentConfig(scale=(1.2, 0.8))


# -- spatial ---------------------------------------------------------------
def test_zero_ranges_are_identity():
    x = vol(2, 40, 0, c=2)
    out = spatial_transform(x, NO_SPATIAL, gen(0))
    assert (out - x).abs().max() <= 1e-5
    off = spatial_transform(x, dataclasses.replace(AugmentConfig(), spatial=False), gen(0))
    assert torch.equal(off, x) and off.data_ptr() != x.data_ptr()


def test_all_channels_and_x1_x2_share_the_draw():
    x = vol(2, 32, 0)
    out = spatial_transform(torch.cat([x, x], 1), AugmentConfig(), gen(1))
    assert torch.equal(out[:, 0], out[:, 1])
    assert not torch.allclose(out[:, 0], x[:, 0], atol=1e-2)
    x1a, x1d, x2a = Augmenter(AugmentConfig(**NO_DAMAGE))(x, x, gen(2))
    assert torch.equal(x1a, x2a) and torch.equal(x1d, x1a)  # damage only, never extra motion


@pytest.mark.parametrize("shape", [(40, 40, 40), (32, 40, 48)])
def test_pure_translation_moves_blob_by_ten_percent(shape):
    # output(p) = input(p + 0.1 * size): the blob moves by -0.1 * size along every axis
    cfg = dataclasses.replace(NO_SPATIAL, translation=(0.1, 0.1))
    centre = tuple(s / 2 for s in shape)
    src = blob(shape, centre)
    out = spatial_transform(src, cfg, gen(0))
    moved = centre_of_mass(out) - centre_of_mass(src)
    expect = -0.1 * torch.tensor(shape, dtype=torch.float64)
    assert torch.allclose(moved, expect, atol=0.05), (moved, expect)


def test_translation_draws_span_plus_minus_ten_percent():
    shape = (32, 40, 48)
    cfg = dataclasses.replace(NO_SPATIAL, translation=(-0.1, 0.1))
    vox = affine_to_voxel(random_affine(512, shape, cfg, gen(0), dtype=torch.float64), shape)
    frac = vox[:, :, 3] / torch.tensor(shape, dtype=torch.float64)  # voxel shift / size
    assert torch.allclose(vox[:, :, :3], torch.eye(3, dtype=torch.float64).expand(512, 3, 3))
    assert frac.abs().max() <= 0.1 + 1e-9
    assert (frac.max(0).values > 0.09).all() and (frac.min(0).values < -0.09).all()


@pytest.mark.parametrize("step", [0, 1])
def test_locations_apply_elastic_in_output_grid_then_affine(step):
    # out(p) = in(A (p + u(p)) + b), as the release's affine warp followed by its elastic warp
    f64 = torch.float64
    shape = (32, 40, 48) if step == 0 else (16, 24, 32)  # step 1: the slow full-resolution field
    cfg = AugmentConfig(elastic_step=step, elastic_sigma=(10.0, 11.0))
    locs = spatial_locations(2, shape, cfg, gen(3), dtype=f64)
    g = gen(3)  # same stream: affine draw, then elastic draw
    vox = affine_to_voxel(random_affine(2, shape, cfg, g, dtype=f64), shape)
    pts = identity_grid(shape, dtype=f64) + random_elastic(2, shape, cfg, g, dtype=f64)
    ref = torch.einsum("nij,nj...->ni...", vox[:, :, :3], pts) + vox[:, :, 3].view(2, 3, 1, 1, 1)
    assert torch.allclose(locs, ref, atol=1e-9)
    assert (locs - identity_grid(shape, dtype=f64)).abs().amax() > 1.0


def test_elastic_scales_with_alpha():
    base = AugmentConfig(elastic_sigma=(11.0, 11.0))
    u = {a: random_elastic(2, (32, 32, 32), dataclasses.replace(base, elastic_alpha=(a, a)), gen(5))
         for a in (0.0, 100.0, 300.0)}
    assert torch.equal(u[0.0], torch.zeros_like(u[0.0]))
    assert u[100.0].abs().max() > 0.05
    assert torch.allclose(u[300.0], 3 * u[100.0], rtol=1e-5, atol=1e-6)


def _release_field_rms(sigma: float, alpha: float, size: int) -> float:
    """Expected RMS of the release's full-resolution field: per voxel
    ``alpha^2 / 3 * prod_axes sum_{q in volume} k(p - q)^2`` (zero padding), averaged."""
    k = _gaussian_kernels(torch.tensor([sigma], dtype=torch.float64), 4.0, sigma)[0]
    r = k.numel() // 2
    d = torch.arange(size)[:, None] - torch.arange(size)[None, :]
    m = torch.where(d.abs() <= r, k[(d + r).clamp(0, 2 * r)], 0.0).pow(2).sum(1)
    var = alpha**2 / 3 * m[:, None, None] * m[None, :, None] * m[None, None, :]
    return float(var.mean().sqrt())


@pytest.mark.parametrize("sigma", [10.0, 13.0])
def test_coarse_elastic_matches_full_resolution_statistics(sigma):
    cfg = AugmentConfig(elastic_sigma=(sigma, sigma), elastic_alpha=(512.0, 512.0))
    ref = _release_field_rms(sigma, 512.0, 64)
    coarse = random_elastic(24, (64, 64, 64), cfg, gen(0)).pow(2).mean().sqrt().item()
    assert abs(coarse / ref - 1) < 0.15, (coarse, ref)
    # the full-resolution path (elastic_step=1, the release's field) agrees with the formula
    full_cfg = dataclasses.replace(cfg, elastic_step=1)
    full = random_elastic(4, (48, 48, 48), full_cfg, gen(1)).pow(2).mean().sqrt().item()
    assert abs(full / _release_field_rms(sigma, 512.0, 48) - 1) < 0.15


# -- appearance damage -----------------------------------------------------
def test_bezier_identity_and_flip():
    x = vol(2, 32, 0)
    pts = torch.tensor([[1 / 3, 1 / 3], [2 / 3, 2 / 3]]).expand(2, 2, 2)
    ident = apply_intensity_lut(x, bezier_lut(pts, torch.tensor([False, False])))
    assert (ident - x).abs().max() < 1e-4
    flipped = apply_intensity_lut(x, bezier_lut(pts, torch.tensor([True, True])))
    assert (flipped - (1 - x)).abs().max() < 1e-4


def test_bezier_random_curves_are_monotone_maps_of_unit_interval():
    lut = bezier_lut(torch.rand((8, 2, 2), generator=gen(0)), torch.zeros(8, dtype=torch.bool))
    assert (lut[:, 1:] >= lut[:, :-1] - 1e-6).all()
    assert torch.allclose(lut[:, 0], torch.zeros(8), atol=1e-4)
    assert torch.allclose(lut[:, -1], torch.ones(8), atol=1e-4)
    x = vol(3, 32, 1)
    assert torch.equal(nonlinear_intensity(x, gen(0), p=0.0), x)
    y = nonlinear_intensity(x, gen(0), p=1.0)
    assert not torch.allclose(y, x) and y.min() >= 0 and y.max() <= 1


def test_single_block_shuffle_permutes_within_one_block():
    x = torch.randperm(40**3, generator=gen(0)).float().view(1, 1, 40, 40, 40)
    out = local_pixel_shuffle(x, gen(1), p=1.0, blocks=1, divisor=10)  # one 4^3 block
    assert torch.equal(out.flatten().sort().values, x.flatten().sort().values)
    changed = (out != x)[0, 0].nonzero()
    assert len(changed) > 32
    assert ((changed.max(0).values - changed.min(0).values) <= 3).all()


def test_overlapping_blocks_read_values_from_their_neighbourhood():
    # 5000 blocks of 2^3 in 48^3 overlap; every output value must come from an input voxel
    # at most one voxel away per axis (inside its block), and many voxels must move.
    x = torch.randperm(48**3, generator=gen(0)).double().view(1, 1, 48, 48, 48)
    out = local_pixel_shuffle(x, gen(2), p=1.0, blocks=5000, divisor=20)
    pad = torch.nn.functional.pad(x, (1, 1) * 3, value=-1.0)[0, 0]
    found = torch.zeros(48, 48, 48, dtype=torch.bool)
    for i in range(3):
        for j in range(3):
            for k in range(3):
                found |= pad[i : i + 48, j : j + 48, k : k + 48] == out[0, 0]
    assert found.all()
    assert (out != x).float().mean() > 0.2  # 1 - exp(-40000 / 48^3) covered, 7/8 of it moves
    assert torch.equal(local_pixel_shuffle(x, gen(2), p=0.0), x)


@pytest.mark.parametrize("perms", [0, 16])
def test_shuffle_matches_sequential_release_loop(perms):
    # Replays the function's draws (flag, starts, keys) and runs the release's loop: each
    # block reads the original image, blocks are written in order, so later blocks win.
    x = torch.randperm(2 * 32**3, generator=gen(0)).float().view(2, 1, 32, 32, 32)
    blocks, b = 300, 4
    out = local_pixel_shuffle(x, gen(9), p=1.0, blocks=blocks, divisor=8, perms=perms)
    g = gen(9)
    torch.rand(2, generator=g)
    starts = [torch.randint(0, 32 - b, (2, blocks, 1), generator=g) for _ in range(3)]
    if perms == 0:
        perm = torch.rand((2, blocks, b**3), generator=g).argsort(dim=-1)
    else:  # each block picks one of `perms` permutations drawn per sample
        pool = torch.rand((2, perms, b**3), generator=g).argsort(dim=-1)
        perm = pool[torch.arange(2)[:, None], torch.randint(0, perms, (2, blocks, 1), generator=g)[..., 0]]
    ref = x.clone()
    for n in range(2):
        for i in range(blocks):
            d, h, w = (int(s[n, i, 0]) for s in starts)
            win = x[n, 0, d : d + b, h : h + b, w : w + b].reshape(-1)[perm[n, i]]
            ref[n, 0, d : d + b, h : h + b, w : w + b] = win.view(b, b, b)
    assert torch.equal(out, ref)


def test_in_painting_changes_exactly_one_box():
    x = torch.full((2, 1, 40, 40, 40), 2.0)  # noise is in [0, 1), so every painted voxel differs
    out = in_painting(x, gen(0), max_boxes=1, p_continue=1.0)
    for n in range(2):
        changed = out[n, 0] != 2.0
        idx = changed.nonzero()
        lo, hi = idx.min(0).values, idx.max(0).values + 1
        side = hi - lo
        assert changed[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].all()  # a full box
        assert int(changed.sum()) == int(side.prod())
        assert ((side >= 4) & (side < 8)).all() and (lo >= 3).all() and (hi <= 37).all()
        assert (out[n, 0][changed] < 1).all()


def test_in_painting_only_touches_boxes_and_respects_count():
    x = torch.full((3, 1, 32, 32, 32), 2.0)
    none = in_painting(x, gen(0), p_continue=0.0)
    assert torch.equal(none, x)
    many = in_painting(x, gen(0), max_boxes=30, p_continue=1.0)
    changed = many != 2.0
    border = torch.ones(32, 32, 32, dtype=torch.bool)
    border[3:-3, 3:-3, 3:-3] = False
    assert not changed[:, 0][:, border].any()  # boxes stay inside the 3-voxel margin
    assert (changed.flatten(1).float().mean(1) > 0.05).all()
    assert torch.equal(many[~changed], x[~changed])


def test_appearance_damage_is_seeded_and_leaves_input():
    x = vol(2, 48, 0)
    keep = x.clone()
    a = appearance_damage(x, AugmentConfig(), gen(4))
    b = appearance_damage(x, AugmentConfig(), gen(4))
    assert torch.equal(a, b) and torch.equal(x, keep)
    assert not torch.allclose(a, x)
    off = appearance_damage(x, AugmentConfig(**NO_DAMAGE), gen(4))
    assert torch.equal(off, x)


def test_p_damage_damages_that_share_of_samples_and_keeps_the_stream_at_one():
    x = vol(64, 16, 0)
    full = appearance_damage(x, AugmentConfig(), gen(7))
    assert torch.equal(full, appearance_damage(x, AugmentConfig(p_damage=1.0), gen(7)))  # the spec's default
    assert torch.equal(appearance_damage(x, AugmentConfig(p_damage=0.0), gen(7)), x.clamp(0, 1))
    half = appearance_damage(x, AugmentConfig(p_damage=0.5), gen(7))
    clean = torch.tensor([torch.equal(h, c) for h, c in zip(half, x.clamp(0, 1), strict=True)])
    assert 16 <= int(clean.sum()) <= 48  # about half of 64 samples untouched
    assert all(torch.equal(h, f) for h, f, c in zip(half, full, clean, strict=True) if not c)
