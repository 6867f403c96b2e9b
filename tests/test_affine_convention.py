"""The affine head's two conventions: "centered" means the same transform on any grid,
"official" keeps the authors' normalised-coordinate quirk bit for bit."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from gvsl.augment import AugmentConfig, random_affine, spatial_locations
from gvsl.config import ConfigError, ModelConfig
from gvsl.io import load_model, load_official, save_model
from gvsl.model import GVSL
from gvsl.runtime.geometry import model_affine_convention, network_affine_to_voxel
from gvsl.spatial import affine_from_params, affine_to_voxel, affine_warp, compose_affine_dvf

CUBE = (48, 48, 48)
NON_CUBE = (48, 64, 32)


def official_affine_to_voxel_frozen(mat: torch.Tensor, shape) -> torch.Tensor:
    """The eager official formula exactly as it stood before conventions existed."""
    dt, dev = mat.dtype, mat.device
    lin, t = mat[:, :, :3], mat[:, :, 3]
    d, h, w = (float(n) for n in shape)
    t = t / torch.tensor([d, h, w], dtype=dt, device=dev)
    s = torch.tensor([2.0 / w, 2.0 / h, 2.0 / d], dtype=dt, device=dev)
    c = s / 2.0 - 1.0
    a_xyz = lin * s.view(1, 1, 3) / s.view(1, 3, 1)
    a_vox = a_xyz.flip(1).flip(2)
    b_xyz = (lin @ c + t - c) / s
    b_vox = b_xyz.flip(1)
    return torch.cat([a_vox, b_vox.unsqueeze(-1)], dim=-1)


def random_mats(n: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rot = (torch.rand(n, 3, generator=g, dtype=torch.float64) - 0.5) * 0.7
    scl = 1 + (torch.rand(n, 3, generator=g, dtype=torch.float64) - 0.5) * 0.4
    trans = torch.randn(n, 3, generator=g, dtype=torch.float64) * 4
    shear = (torch.rand(n, 6, generator=g, dtype=torch.float64) - 0.5) * 0.3
    return affine_from_params(rot, scl, trans, shear)


def rotation_and_shift(deg: float = 10.0, shift_voxels: float = 3.0) -> torch.Tensor:
    """A 10-degree rotation about the z (D) axis and a 3-voxel shift along x (W), centered convention."""
    z = torch.zeros(1, 3, dtype=torch.float64)
    rot = torch.tensor([[0.0, 0.0, math.radians(deg)]], dtype=torch.float64)
    trans = torch.tensor([[shift_voxels, 0.0, 0.0]], dtype=torch.float64)
    return affine_from_params(rot, torch.ones(1, 3, dtype=torch.float64), trans, torch.zeros(1, 6, dtype=z.dtype))


def world_map(vox: np.ndarray, shape, spacing: float = 1.5) -> np.ndarray:
    """The voxel map as fixed mm -> moving mm on a grid whose centre sits at the world origin."""
    grid = np.diag([spacing, spacing, spacing, 1.0])
    grid[:3, 3] = -spacing * (np.asarray(shape, dtype=np.float64) - 1) / 2
    full = np.eye(4)
    full[:3] = vox
    return grid @ full @ np.linalg.inv(grid)


# ----------------------------------------------------------------------------- geometry
def test_centered_is_the_same_world_map_on_a_cubic_and_a_non_cubic_grid():
    mat = rotation_and_shift()
    maps = {s: world_map(affine_to_voxel(mat, s, "centered")[0].numpy(), s) for s in (CUBE, NON_CUBE)}
    assert np.abs(maps[CUBE] - maps[NON_CUBE]).max() < 1e-12
    # the expected map itself, in array order (d, h, w): the rotation mixes h and w,
    # the 3-voxel (4.5 mm) shift is along w
    c, s = math.cos(math.radians(10)), math.sin(math.radians(10))
    expected = np.eye(4)
    expected[1:3, 1:3] = [[c, s], [-s, c]]
    expected[2, 3] = 3.0 * 1.5
    assert np.abs(maps[NON_CUBE] - expected).max() < 1e-12
    # the grid centre reads the input 3 voxels further along w on both grids
    for shape in (CUBE, NON_CUBE):
        vox = affine_to_voxel(mat, shape, "centered")[0].numpy()
        centre = (np.asarray(shape) - 1) / 2
        assert np.abs(vox[:, :3] @ centre + vox[:, 3] - (centre + [0, 0, 3])).max() < 1e-12


def test_official_shears_a_rotation_on_a_non_cubic_grid_and_centered_does_not():
    mat = rotation_and_shift()
    for convention, rigid in (("centered", True), ("official", False)):
        a = affine_to_voxel(mat, NON_CUBE, convention)[0, :, :3].numpy()
        assert bool(np.abs(a.T @ a - np.eye(3)).max() < 1e-12) is rigid, convention


def test_centered_equals_official_on_a_cube_with_half_the_translation():
    mat = random_mats()
    half = mat.clone()
    half[:, :, 3] /= 2
    got = affine_to_voxel(half, CUBE, "centered")
    assert (got - affine_to_voxel(mat, CUBE, "official")).abs().max() < 1e-12


@pytest.mark.parametrize("convention", ["centered", "official"])
@pytest.mark.parametrize("shape", [CUBE, NON_CUBE, (16, 32, 80)])
def test_torch_and_numpy_twins_agree(convention, shape):
    mats = random_mats(seed=1)
    torch_vox = affine_to_voxel(mats.float(), shape, convention).double().numpy()
    for i in range(mats.shape[0]):
        numpy_vox = network_affine_to_voxel(mats[i].float().numpy(), shape, convention)
        assert np.abs(torch_vox[i] - numpy_vox).max() < 1e-6 * max(shape)


def test_official_is_bit_for_bit_the_frozen_formula_and_the_default():
    mats = random_mats(seed=2).float()
    frozen = official_affine_to_voxel_frozen(mats, NON_CUBE)
    assert torch.equal(affine_to_voxel(mats, NON_CUBE, "official"), frozen)
    assert torch.equal(affine_to_voxel(mats, NON_CUBE), frozen)


def test_unknown_convention_is_refused():
    with pytest.raises(ValueError, match="affine_convention must be one of"):
        affine_to_voxel(random_mats(1), CUBE, "normalised")
    with pytest.raises(ValueError, match="affine_convention must be one of"):
        network_affine_to_voxel(np.eye(3, 4), CUBE, "normalised")
    with pytest.raises(ConfigError, match="affine_convention"):
        ModelConfig(affine_convention="normalised")


def test_centered_warp_moves_a_point_by_the_shift_on_a_non_cubic_grid():
    shape = (16, 32, 24)
    mat = rotation_and_shift(deg=0.0, shift_voxels=3.0).float()
    x = torch.zeros(1, 1, *shape)
    x[0, 0, 8, 10, 15] = 1.0
    out = affine_warp(x, mat, convention="centered")  # out(p) = x(p + 3 w)
    assert out[0, 0, 8, 10, 12].item() == pytest.approx(1.0, abs=1e-5)
    assert out.sum().item() == pytest.approx(1.0, abs=1e-5)
    # the fused field of an identity local DVF is the shift everywhere
    fused = compose_affine_dvf(mat, torch.zeros(1, 3, *shape), "centered")
    assert (fused - torch.tensor([0.0, 0.0, 3.0]).view(1, 3, 1, 1, 1)).abs().max() < 1e-5


# ----------------------------------------------------------------------------- augmentation
def test_augmentation_centered_matches_official_on_a_cube_and_is_rigid_elsewhere():
    cfg = AugmentConfig(elastic=False, scale=(1.0, 1.0), shear=(0.0, 0.0))
    f64 = torch.float64
    a = spatial_locations(2, (32, 32, 32), cfg, torch.Generator().manual_seed(4), dtype=f64)
    b = spatial_locations(2, (32, 32, 32), cfg, torch.Generator().manual_seed(4), dtype=f64, convention="centered")
    assert (a - b).abs().max() < 1e-9
    shape = (32, 48, 16)
    mats = random_affine(3, shape, cfg, torch.Generator().manual_seed(5), dtype=f64, convention="centered")
    lin = affine_to_voxel(mats, shape, "centered")[:, :, :3]
    assert (lin.transpose(1, 2) @ lin - torch.eye(3, dtype=f64)).abs().max() < 1e-12


# ----------------------------------------------------------------------------- models
def test_new_models_are_centered_and_old_descriptions_read_as_official():
    assert ModelConfig().affine_convention == "centered"
    assert ModelConfig.from_preset("tiny").affine_convention == "centered"
    legacy = ModelConfig.from_preset("tiny").to_dict()
    del legacy["affine_convention"]
    assert ModelConfig.from_dict(legacy).affine_convention == "official"
    assert model_affine_convention(legacy) == "official"
    assert model_affine_convention(ModelConfig().to_dict()) == "centered"


def test_centered_model_round_trips_through_model_json(tmp_path):
    torch.manual_seed(0)
    save_model(GVSL(ModelConfig.from_preset("tiny")), tmp_path / "m")
    on_disk = json.loads((tmp_path / "m" / "model.json").read_text())
    assert on_disk["model"]["affine_convention"] == "centered"
    model, meta = load_model(tmp_path / "m")
    assert model.config.affine_convention == "centered" and meta["model"]["affine_convention"] == "centered"
    # a model.json written before the field existed loads as official (the shipped default's case)
    del on_disk["model"]["affine_convention"]
    (tmp_path / "m" / "model.json").write_text(json.dumps(on_disk))
    assert load_model(tmp_path / "m")[0].config.affine_convention == "official"


def test_official_checkpoints_load_official_whatever_the_config(tmp_path):
    pth = tmp_path / "GVSL_epoch_1.pth"
    torch.save(GVSL(ModelConfig.from_preset("tiny")).state_dict(), pth)
    model = load_official(pth, config=ModelConfig.from_preset("tiny"))
    assert model.config.affine_convention == "official"


@pytest.mark.parametrize("convention", ["centered", "official"])
def test_model_register_reads_its_affine_in_its_convention(convention):
    shape = (16, 32, 48)
    torch.manual_seed(1)
    model = GVSL(ModelConfig.from_preset("tiny", affine_convention=convention)).eval()
    with torch.no_grad():
        for fc in (model.fc_rot, model.fc_scl, model.fc_shear, model.fc_trans, model.out_flow):
            fc.weight.zero_()
            fc.bias.zero_()
        model.fc_trans.bias.copy_(torch.tensor([4.0, 0.0, 0.0]))  # raw t_x = 4
        fixed, moving = torch.rand(1, 1, *shape), torch.rand(1, 1, *shape)
        affine, fused, _ = model.register(fixed, moving)
    # centered: 4 voxels along w; official: 4 / D normalised = 4 / 16 * 48 / 2 = 6 voxels
    expected = 4.0 if convention == "centered" else 6.0
    assert torch.allclose(affine, torch.tensor([[[1.0, 0, 0, 4], [0, 1, 0, 0], [0, 0, 1, 0]]]))
    assert (fused[0, 2] - expected).abs().max() < 1e-4 and fused[0, :2].abs().max() < 1e-4
