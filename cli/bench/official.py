"""The authors' per-sample augmentation re-implemented in NumPy/SciPy: the "official-style" reference.

GVSL's release damages x1 with Models Genesis on the host, one sample at a
time (a Python loop over 5000 block copies with one shared permutation; a
Bezier intensity curve from ``scipy.special.comb`` Bernstein terms over 100000
points and ``np.interp``; an in-painting loop), then applies a
batchgenerators-style spatial transform (per-axis ``gaussian_filter`` of
uniform noise with radius 4 sigma, affine about the centre, ``map_coordinates``
order 1 of x1, x1', x2). ``gvsl bench --train`` and ``benchmarks/train_step.py``
time gvsl's batched, on-device augmentation (:mod:`gvsl.augment`) against this
reference; it is a benchmark peer, not used for training.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.ndimage import gaussian_filter, map_coordinates
from scipy.special import comb

__all__ = ["official_appearance", "official_spatial"]


def _official_shuffle(x: np.ndarray, rng: np.random.Generator, prob: float = 0.8) -> np.ndarray:
    if rng.random() >= prob:
        return x
    image, orig = x.copy(), x.copy()
    _, rows, cols, deps = x.shape
    n, bx, by, bz = 5000, rows // 20, cols // 20, deps // 20
    sx = rng.integers(0, rows - bx, n)
    sy = rng.integers(0, cols - by, n)
    sz = rng.integers(0, deps - bz, n)
    window = [orig[:, sx[i] : sx[i] + bx, sy[i] : sy[i] + by, sz[i] : sz[i] + bz] for i in range(n)]
    window = np.concatenate(window, axis=0).reshape(n, -1)
    rng.shuffle(window.T)  # as the release: one permutation shared by every block
    window = window.reshape(n, bx, by, bz)
    for i in range(n):
        image[0, sx[i] : sx[i] + bx, sy[i] : sy[i] + by, sz[i] : sz[i] + bz] = window[i]
    return image


def _official_bezier(x: np.ndarray, rng: np.random.Generator, prob: float = 0.9) -> np.ndarray:
    if rng.random() >= prob:
        return x
    pts = np.array([[0, 0], [rng.random(), rng.random()], [rng.random(), rng.random()], [1, 1]])
    t = np.linspace(0.0, 1.0, 100000)
    poly = np.array([comb(3, i) * t ** (3 - i) * (1 - t) ** i for i in range(4)])
    xv, yv = pts[:, 0] @ poly, pts[:, 1] @ poly
    xv = np.sort(xv)
    if rng.random() >= 0.5:  # Models Genesis flips the curve half of the time
        yv = np.sort(yv)
    return np.interp(x, xv, yv)


def _official_inpaint(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    _, rows, cols, deps = x.shape
    cnt = 30
    while cnt > 0 and rng.random() < 0.95:
        bx = rng.integers(rows // 10, rows // 5)
        by = rng.integers(cols // 10, cols // 5)
        bz = rng.integers(deps // 10, deps // 5)
        px = rng.integers(3, rows - bx - 3)
        py = rng.integers(3, cols - by - 3)
        pz = rng.integers(3, deps - bz - 3)
        x[:, px : px + bx, py : py + by, pz : pz + bz] = rng.random((bx, by, bz))
        cnt -= 1
    return x


def official_appearance(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Models Genesis damage of one ``[1, D, H, W]`` volume (the GVSL release's order)."""
    x = _official_shuffle(x, rng)
    x = _official_bezier(x, rng)
    x = _official_inpaint(x.copy(), rng)
    return x.astype(np.float32)


def official_spatial(vols: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    """batchgenerators-style spatial transform of ``[D, H, W]`` volumes with one draw."""
    shape = vols[0].shape
    coords = np.array(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), dtype=float)
    ctr = (np.array(shape, dtype=float) - 1) / 2
    coords -= ctr[:, None, None, None]
    alpha, sigma = rng.uniform(0, 512), rng.uniform(10, 13)
    for d in range(3):
        noise = rng.random(shape) * 2 - 1
        coords[d] += gaussian_filter(noise, sigma, mode="constant", cval=0, truncate=4.0) * alpha
    ax, ay, az = rng.uniform(-math.pi / 9, math.pi / 9, 3)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    sc = np.diag(rng.uniform(0.75, 1.25, 3))
    h = np.tan(rng.uniform(-math.pi / 18, math.pi / 18, 6))
    sh = np.array([[1, h[0], h[1]], [h[2], 1, h[3]], [h[4], h[5], 1]])
    mat = (sh @ sc @ rz @ ry @ rx)[::-1, ::-1]  # (x, y, z) -> array axes (d, h, w)
    coords = (mat @ coords.reshape(3, -1)).reshape(coords.shape)
    shift = rng.uniform(-0.1, 0.1, 3) * np.array(shape)
    coords += (ctr + shift)[:, None, None, None]
    return [map_coordinates(v, coords, order=1, mode="constant", cval=0.0) for v in vols]
