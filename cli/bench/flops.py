"""FLOPs of one call of the encoder or the registration network, from the ModelConfig alone.

The count follows PyTorch's ``FlopCounterMode`` (tests/test_bench.py checks it
against the counter), so achieved TFLOP/s can be reported for backends that
have no counter of their own (ONNX Runtime, TensorRT).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["model_flops"]


def _conv(cin: int, cout: int, k: int, voxels: int) -> int:
    return 2 * cin * cout * k**3 * voxels  # PyTorch's counter: 2 x MACs, bias not counted


def _double_conv(cin: int, cout: int, voxels: int) -> int:
    return _conv(cin, cout, 3, voxels) + _conv(cout, cout, 3, voxels)


def _unet_flops(w: Sequence[int], cin: int, n: int) -> int:
    """Convolutions of the U-Net at ``n`` voxels (full resolution)."""
    total = _double_conv(cin, w[0], n)
    for level in range(1, 5):
        total += _double_conv(w[level - 1], w[level], n // 8**level)
    up_in = [w[4] + w[3], w[5] + w[2], w[6] + w[1], w[7] + w[0]]
    for i, level in enumerate((3, 2, 1, 0)):
        total += _double_conv(up_in[i], w[5 + i], n // 8**level)
    return total


def model_flops(model: dict[str, Any], kind: str, batch: int, spatial: Sequence[int]) -> int:
    """FLOPs of one call, counted like PyTorch's ``FlopCounterMode``: convolutions,
    linear layers and matrix products (2 x multiply-accumulates); sampling, norms
    and pooling are not counted. ``model`` is a ModelConfig dict."""
    w = [int(x) for x in model["widths"]]
    cin = int(model.get("in_channels", 1))
    n = int(np.prod([int(s) for s in spatial]))
    enc = _unet_flops(w, cin, n)
    if kind == "encoder":
        return batch * enc
    aw, dw = int(model.get("affine_width", 256)), int(model.get("deform_width", 16))
    head = _double_conv(2 * w[4], aw, n // 8**4) + 2 * aw * (3 + 3 + 3 + 6)
    head += _double_conv(2 * w[8], dw, n) + _conv(dw, 3, 3, n)
    head += 2 * 18 * n  # sampling positions: two [n, 3] x [3, 3] products (feature warp, fused field)
    return batch * (2 * enc + head)
