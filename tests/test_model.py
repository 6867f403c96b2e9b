"""GVSL network: shapes, batch sizes, gradients, losses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gvsl.config import ConfigError, ModelConfig
from gvsl.losses import GVSLLoss, box_sum, local_ncc_loss, smoothness_loss
from gvsl.model import GVSL

TINY = ModelConfig.from_preset("tiny")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return GVSL(TINY)


@pytest.mark.parametrize("shape,batch", [((16, 16, 16), 1), ((32, 16, 48), 2), ((32, 32, 32), 3)])
def test_shapes(tiny, shape, batch):
    a, b = torch.rand(batch, 1, *shape), torch.rand(batch, 1, *shape)
    with torch.no_grad():
        fg, fl = tiny.encode(a)
        out = tiny(a, b)
        affine, fused, warped = tiny.register(a, b)
    assert fg.shape == (batch, TINY.widths[4], *(s // 16 for s in shape))
    assert fl.shape == (batch, TINY.widths[8], *shape)
    assert tiny.embed(a).shape == (batch, TINY.embedding_dim)
    assert out.restored.shape == out.warped.shape == (batch, 1, *shape)
    assert out.affine.shape == affine.shape == (batch, 3, 4)
    assert out.local_dvf.shape == fused.shape == (batch, 3, *shape)
    assert warped.shape == (batch, 1, *shape)


def test_batch_items_are_independent(tiny):
    a, b = torch.rand(2, 1, 16, 16, 16), torch.rand(2, 1, 16, 16, 16)
    with torch.no_grad():
        both = tiny(a, b)
        one = tiny(a[1:], b[1:])
    assert torch.allclose(both.affine[1:], one.affine, atol=1e-5)
    assert torch.allclose(both.warped[1:], one.warped, atol=1e-5)


def test_rejects_sizes_not_multiple_of_16(tiny):
    with pytest.raises(ValueError, match="multiples of 16"):
        tiny.encode(torch.rand(1, 1, 20, 16, 16))


def test_gradients_reach_every_parameter_including_affine_head():
    torch.manual_seed(0)
    model = GVSL(TINY)
    # a rotated copy gives the affine head something to do
    a = F.avg_pool3d(torch.rand(2, 1, 32, 32, 32), 3, stride=1, padding=1)
    b = torch.rot90(a, 1, dims=(3, 4))
    out = model(a, b)
    loss = GVSLLoss()(a, out.warped, out.restored, out.local_dvf).total
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    for head in ("f_conv", "fc_rot", "fc_scl", "fc_trans", "fc_shear"):
        g = sum(p.grad.abs().sum() for n, p in model.named_parameters() if n.startswith(head))
        assert g > 0, head


def test_config_validation_and_round_trip():
    with pytest.raises(ConfigError):
        ModelConfig(widths=(8, 16))
    with pytest.raises(ConfigError):
        ModelConfig.from_preset("huge")
    with pytest.raises(ConfigError):
        ModelConfig(widths=(12, 16, 16, 32, 32, 32, 16, 16, 8))
    assert ModelConfig.from_json(TINY.to_json()) == TINY
    assert ModelConfig.from_preset("8,16,16,32,32,32,16,16,8").widths == TINY.widths
    assert (TINY.affine_width, TINY.deform_width, TINY.restore_width) == (32, 8, 8)
    assert ModelConfig.from_preset("default") == ModelConfig()


def test_box_sum_equals_ones_convolution():
    x = torch.randn(2, 1, 11, 12, 13)
    ref = F.conv3d(x, torch.ones(1, 1, 9, 9, 9), padding=4)
    assert torch.allclose(box_sum(x, 9), ref, atol=1e-3, rtol=1e-5)


def reference_ncc(i, j, win=9):
    """The authors' NCC with a literal 9^3 ones convolution."""
    filt = torch.ones(1, 1, win, win, win)
    s = [F.conv3d(t, filt, padding=win // 2) for t in (i, j, i * i, j * j, i * j)]
    n = win**3
    ui, uj = s[0] / n, s[1] / n
    cross = s[4] - uj * s[0] - ui * s[1] + ui * uj * n
    vi = s[2] - 2 * ui * s[0] + ui * ui * n
    vj = s[3] - 2 * uj * s[1] + uj * uj * n
    return 1 - (cross * cross / (vi * vj + 1e-5)).mean()


def test_local_ncc():
    torch.manual_seed(0)
    a = torch.rand(2, 1, 16, 16, 16)
    b = torch.rand(2, 1, 16, 16, 16)
    assert local_ncc_loss(a, a).item() == pytest.approx(0.0, abs=1e-4)
    assert local_ncc_loss(a, 3 * a).item() == pytest.approx(0.0, abs=1e-4)  # contrast invariant
    # an offset is not invisible: zero padding at the borders sees it
    assert local_ncc_loss(a, a + 1).item() > 1e-3
    assert local_ncc_loss(a, b).item() == pytest.approx(reference_ncc(a, b).item(), abs=1e-5)
    assert local_ncc_loss(a, b).item() > 0.5


def test_smoothness():
    assert smoothness_loss(torch.zeros(1, 3, 8, 8, 8)).item() == 0.0
    assert smoothness_loss(torch.full((1, 3, 8, 8, 8), 2.5)).item() == 0.0  # constant shift is smooth
    ramp = torch.arange(8.0).view(1, 1, 8, 1, 1).expand(1, 3, 8, 8, 8)
    assert smoothness_loss(ramp).item() == pytest.approx(1.0 / 3.0)


def test_loss_weights_apply():
    from gvsl.config import LossWeights

    a, w, r = torch.rand(1, 1, 16, 16, 16), torch.rand(1, 1, 16, 16, 16), torch.rand(1, 1, 16, 16, 16)
    d = torch.randn(1, 3, 16, 16, 16)
    t1 = GVSLLoss()(a, w, r, d)
    t2 = GVSLLoss(LossWeights(ncc=2.0, mse=0.0, smooth=0.5))(a, w, r, d)
    assert t1.total.item() == pytest.approx((t1.ncc + t1.mse + t1.smooth).item(), rel=1e-6)
    assert t2.total.item() == pytest.approx((2 * t1.ncc + 0.5 * t1.smooth).item(), rel=1e-6)
