"""Checkpoint compatibility and numerical parity with the authors' GVSL code.

The reference outputs (``data/official_parity_32.npz``) come from the authors' code run with the
deterministic weights of :mod:`parity_fixture` (spec: ``data/official_parity_32.md``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from parity_fixture import deterministic_state, official_keys

from gvsl.config import ModelConfig
from gvsl.io import WeightsError, load_official
from gvsl.model import GVSL
from gvsl.spatial import affine_warp, dvf_warp

DATA = Path(__file__).parent / "data"


def test_default_state_dict_matches_official_tsv():
    keys = official_keys()
    own = {k: tuple(v.shape) for k, v in GVSL().state_dict().items()}
    assert own == keys
    assert len(own) == 104
    assert sum(int(np.prod(s)) for s in own.values()) == 32_440_739


@pytest.fixture(scope="module")
def official_model(tmp_path_factory) -> GVSL:
    path = tmp_path_factory.mktemp("ckpt") / "GVSL_epoch_1000.pth"
    # the release wraps nothing; DDP checkpoints carry "module." — cover that here
    torch.save({"state_dict": {"module." + k: v for k, v in deterministic_state().items()}}, path)
    return load_official(path).eval()


@pytest.fixture(scope="module")
def fixture():
    return dict(np.load(DATA / "official_parity_32.npz"))


def rel_err(a: torch.Tensor, ref: np.ndarray) -> float:
    ref_t = torch.from_numpy(ref)
    return float((a - ref_t).abs().max() / ref_t.abs().max())


def test_parity_with_authors_outputs(official_model, fixture):
    fixed = torch.from_numpy(fixture["fixed"])
    moving = torch.from_numpy(fixture["moving"])
    with torch.no_grad():
        fg, fl = official_model.encode(fixed)
        fbg, fbl = official_model.encode(moving)
        affine, local = official_model.match((fg, fl), (fbg, fbl))
        restored = official_model.restore(fl)
        out = official_model(fixed, moving)
        embedding = official_model.embed(fixed)
    sub = (slice(None), slice(None), slice(None, None, 4), slice(None, None, 4), slice(None, None, 4))
    assert rel_err(fg, fixture["bottleneck"]) < 1e-4
    assert rel_err(fg.mean(dim=(2, 3, 4)), fixture["embedding"]) < 1e-4
    assert rel_err(embedding, fixture["embedding"]) < 1e-4
    assert rel_err(fl[sub], fixture["local_features_sub4"]) < 1e-4
    assert rel_err(restored[sub], fixture["restored_sub4"]) < 1e-4
    assert rel_err(affine, fixture["affine"]) < 1e-4
    assert rel_err(local[sub], fixture["local_dvf_sub4"]) < 1e-4
    # the training forward gives the same heads
    assert torch.allclose(out.affine, affine) and torch.allclose(out.local_dvf, local)
    # with the authors' sampling convention the warped image matches too
    warped_official = dvf_warp(affine_warp(moving, affine), local, align_corners=False)
    assert rel_err(warped_official[sub], fixture["warped_sub4"]) < 1e-4
    # ours (align_corners=True, exact identity at zero DVF) differs, but only by the convention
    assert not torch.allclose(out.warped[sub], torch.from_numpy(fixture["warped_sub4"]), atol=1e-3)


def test_official_checkpoint_plain_state_dict(tmp_path):
    path = tmp_path / "plain.pth"
    torch.save(deterministic_state(), path)
    model = load_official(path)
    assert torch.equal(model.state_dict()["fc_rot.bias"], deterministic_state()["fc_rot.bias"])


def test_official_checkpoint_refuses_pickled_code(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": deterministic_state(), "cfg": ModelConfig()}, path)  # arbitrary object
    with pytest.raises(WeightsError, match="evil.pth"):
        load_official(path)


def test_official_checkpoint_wrong_widths(tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save(GVSL(ModelConfig.from_preset("tiny")).state_dict(), path)
    with pytest.raises(WeightsError, match="do not fit widths"):
        load_official(path)


def test_official_checkpoint_corrupt(tmp_path):
    path = tmp_path / "broken.pth"
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(WeightsError, match="broken.pth"):
        load_official(path)
