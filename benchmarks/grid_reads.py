"""Seconds of the runtime's grid reads (``gvsl.runtime.warp``, numpy on the CPU pool) against
the scipy.ndimage calls they replaced, side by side in one run, with the largest difference.

Cases: a field carried from a model grid to a scan grid (``resample_to_grid``, axis-aligned:
separable passes), the same through a 10-degree rotation (trilinear gathers), and an image
and a label map pulled through a displacement field (``warp_by_displacement``):

    python benchmarks/grid_reads.py --size 256 --repeats 3 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
from scipy import ndimage

from gvsl.runtime import cpu_pool
from gvsl.runtime.warp import resample_to_grid, warp_by_displacement


def _seconds(fn: Callable[[], np.ndarray], repeats: int) -> tuple[float, np.ndarray]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def _rotation(deg: float) -> np.ndarray:
    t = np.deg2rad(deg)
    m = np.eye(4)
    m[:2, :2] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=256, help="scan grid: SIZE^3 voxels of 1 mm")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    cpu_pool.set_threads(args.threads)
    n = args.size
    rng = np.random.default_rng(0)
    scan_affine = np.eye(4)
    shape = (n, n, n)
    model_affine = np.diag([2.0, 2.0, 2.0, 1.0])  # a 2 mm model grid over the scan
    model_affine[:3, 3] = 0.5
    coarse = (n // 2,) * 3
    field = rng.normal(0.0, 2.0, (3, *coarse)).astype(np.float32)
    image = rng.random(shape, dtype=np.float32)
    labels = rng.integers(0, 8, shape).astype(np.int16)
    disp = rng.normal(0.0, 1.5, (3, *shape)).astype(np.float32)
    rotated = _rotation(10.0) @ model_affine

    def scipy_resample(data, src_affine):
        m = np.linalg.inv(src_affine) @ scan_affine
        lin = m[:3, :3]
        matrix = np.diag(lin) if np.allclose(lin, np.diag(np.diag(lin))) else lin
        return np.stack([ndimage.affine_transform(c, matrix, offset=m[:3, 3], output_shape=shape, order=1,
                                                  mode="nearest") for c in data])  # fmt: skip

    def scipy_warp(src, order):
        coords = np.indices(shape, dtype=np.float64) + disp  # 1 mm identity grids: voxel = mm
        return ndimage.map_coordinates(src, coords, order=order, mode="constant", cval=0)

    cases = [
        ("field to scan grid, axis-aligned (3 ch)",
         lambda: resample_to_grid(field, model_affine, scan_affine, shape),
         lambda: scipy_resample(field, model_affine)),
        ("field to scan grid, rotated 10 deg (3 ch)",
         lambda: resample_to_grid(field, rotated, scan_affine, shape), lambda: scipy_resample(field, rotated)),
        ("image through a field (linear)",
         lambda: warp_by_displacement(image, scan_affine, scan_affine, disp, order=1), lambda: scipy_warp(image, 1)),
        ("labels through a field (nearest)",
         lambda: warp_by_displacement(labels, scan_affine, scan_affine, disp, order=0), lambda: scipy_warp(labels, 0)),
    ]  # fmt: skip
    print(f"{n}^3 scan grid, {args.threads} threads, median of {args.repeats}\n")
    print("| case | gvsl.runtime.warp s | scipy.ndimage s | scipy / gvsl | max abs difference |")
    print("|---|---|---|---|---|")
    for name, ours, theirs in cases:
        t_ours, a = _seconds(ours, args.repeats)
        t_theirs, b = _seconds(theirs, args.repeats)
        diff = float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())
        print(f"| {name} | {t_ours:.2f} | {t_theirs:.2f} | {t_theirs / t_ours:.2f}x | {diff:.2g} |", flush=True)


if __name__ == "__main__":
    main()
