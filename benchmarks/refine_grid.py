"""The refinement graph on a thick-slice scan's finest level: isotropic grid against the
default grid that keeps half the slice spacing, side by side.

For one fixed scan (e.g. the chest CT of EVALUATION.md, 3.05 x 3.05 x 10 mm), this
builds the finest default level both ways (:func:`gvsl.runtime.refine.plan_levels`
with and without anisotropic grids), preprocesses the scan onto each, and times the
shipped ``refine.onnx`` (ONNX Runtime CPU, ``--threads``) for the level's iterations
from a zero field with the scan against itself shifted by one voxel, alternating the
two grids. Prints the medians, their ratio and each grid's voxels.

    python benchmarks/refine_grid.py FIXED.nii.gz [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import numpy as np

from gvsl.runtime.backends import load_backend
from gvsl.runtime.default_model import default_model_dir
from gvsl.runtime.io import read_volume
from gvsl.runtime.preprocess import preprocess
from gvsl.runtime.refine import plan_levels
from gvsl.runtime.refine_options import RefineOptions
from gvsl.runtime.volume import voxel_sizes


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("fixed")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    model = default_model_dir()
    backend = load_backend(model / "refine.onnx", "refine", "onnxruntime", "cpu", threads=args.threads)
    registration = load_backend(model / "registration.onnx", "registration", "onnxruntime", "cpu")
    cfg = registration.info.preprocess
    options = RefineOptions()
    vol = read_volume(args.fixed)
    iterations = options.level_iterations(len(options.levels) - 1)
    feeds = {}
    for name, anisotropic in (("isotropic", False), ("half slice spacing", True)):
        _, grid = plan_levels(options.levels, vol, cfg, anisotropic=anisotropic)[-1]
        level = preprocess(vol, replace(cfg, spacing=grid))
        fixed = np.ascontiguousarray(level.data, dtype=np.float32)[None, None]
        feeds[name] = {
            "fixed": fixed,
            "moving": np.roll(fixed, 1, axis=2),
            "dvf": np.zeros((1, 3, *fixed.shape[2:]), np.float32),
            "iterations": np.array(iterations, np.int64),
            "step": np.array([options.step_size], np.float32),
            "regularisation": np.array([options.regularisation], np.float32),
            "spacing": np.asarray(voxel_sizes(level.affine), np.float32),
        }
    times: dict[str, list[float]] = {name: [] for name in feeds}
    for feed in feeds.values():  # one untimed run each
        backend.run(feed)
    for _ in range(args.repeats):
        for name, feed in feeds.items():
            start = time.perf_counter()
            backend.run(feed)
            times[name].append(time.perf_counter() - start)
    print(f"{args.fixed}: finest level, {iterations} iterations, {args.threads} threads, {args.repeats} repeats\n")
    print("| level grid | mm | voxels | seconds, median | × isotropic |")
    print("|---|---|---|---|---|")
    base = statistics.median(times["isotropic"])
    for name, feed in feeds.items():
        shape = feed["fixed"].shape[2:]
        mm = " × ".join(f"{s:.2f}" for s in feed["spacing"])
        med = statistics.median(times[name])
        print(f"| {name} | {mm} | {' × '.join(map(str, shape))} | {med:.3f} | {base / med:.2f} |")


if __name__ == "__main__":
    main()
