"""Padding of the last three axes to the sizes the network takes, and its exact inverse.

The U-Net pools four times by 2, so every input is padded to a multiple of 16
(or up to a window's shape) before it runs, and every output is cut back with
the same pads. Padding is split evenly, so the content stays centred.
"""

from __future__ import annotations

from typing import Any

import numpy as np

Pads = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


def _pads_for(shape: tuple[int, ...], target: tuple[int, ...]) -> Pads:
    pads = []
    for n, t in zip(shape, target, strict=True):
        total = max(0, int(t) - int(n))
        pads.append((total // 2, total - total // 2))
    return tuple(pads)  # type: ignore[return-value]


def _apply_pads(data: np.ndarray, pads: Pads, value: float) -> np.ndarray:
    if not any(b or a for b, a in pads):
        return data
    width = [(0, 0)] * (data.ndim - 3) + [tuple(p) for p in pads]
    return np.pad(data, width, mode="constant", constant_values=value)


def pad_to_multiple(data: np.ndarray, multiple: int = 16, value: float = 0.0) -> tuple[np.ndarray, Pads]:
    """Pad the last 3 axes up to a multiple of ``multiple`` (the U-Net pools 4x by 2).

    Padding is split before = total // 2, after = the rest, so the content stays
    centred; returns the array (unchanged object if no padding is needed) and the
    pads ``((b0, a0), (b1, a1), (b2, a2))`` for :func:`unpad`.
    """
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    shape = data.shape[-3:]
    target = tuple(-(-int(n) // multiple) * multiple for n in shape)
    pads = _pads_for(shape, target)
    return _apply_pads(data, pads, value), pads


def pad_to_shape(data: np.ndarray, shape: tuple[int, int, int], value: float = 0.0) -> tuple[np.ndarray, Pads]:
    """Pad the last 3 axes up to at least ``shape`` (axes already large enough are kept)."""
    pads = _pads_for(data.shape[-3:], tuple(shape))
    return _apply_pads(data, pads, value), pads


def unpad(data: Any, pads: Pads) -> Any:
    """Undo :func:`pad_to_multiple` / :func:`pad_to_shape` on the last 3 axes
    (works on [D,H,W], [C,D,H,W] and torch tensors alike)."""
    idx = tuple(slice(b, n - a) for (b, a), n in zip(pads, data.shape[-3:], strict=True))
    return data[(Ellipsis, *idx)]


__all__ = ["Pads", "pad_to_multiple", "pad_to_shape", "unpad"]
