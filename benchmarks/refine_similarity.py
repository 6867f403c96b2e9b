"""The two refinement graphs side by side on one scan's finest default level: local CC
(``refine.onnx``) against mutual information (``refine_mi.onnx``).

For one fixed scan (e.g. the chest CT of EVALUATION.md), this builds the finest level of the
default pyramid (:func:`gvsl.runtime.refine.plan_levels`), preprocesses the scan onto it and
times each shipped graph (ONNX Runtime CPU, ``--threads``) for the level's iterations from a
zero field, the scan against itself shifted by one voxel, alternating the two graphs. Prints
the medians, the ratio and the seconds per iteration.

    python benchmarks/refine_similarity.py FIXED.nii.gz [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from gvsl.runtime import artifact
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
    cfg = load_backend(model / "registration.onnx", "registration", "onnxruntime", "cpu").info.preprocess
    vol = read_volume(args.fixed)
    defaults = RefineOptions()
    _, grid = plan_levels(defaults.levels, vol, cfg)[-1]
    level = preprocess(vol, replace(cfg, spacing=grid))
    fixed = np.ascontiguousarray(level.data, dtype=np.float32)[None, None]
    iterations = defaults.level_iterations(len(defaults.levels) - 1)
    runs = {}
    for similarity in ("ncc", "mi"):
        kind = artifact.REFINE_KINDS[similarity]
        backend = load_backend(model / f"{kind}.onnx", kind, "onnxruntime", "cpu", threads=args.threads)
        feed = {
            "fixed": fixed,
            "moving": np.roll(fixed, 1, axis=2),
            "dvf": np.zeros((1, 3, *fixed.shape[2:]), np.float32),
            "iterations": np.array(iterations, np.int64),
            "step": np.array([replace(defaults, similarity=similarity).step_size], np.float32),
            "regularisation": np.array([defaults.regularisation], np.float32),
            "spacing": np.asarray(voxel_sizes(level.affine), np.float32),
        }
        backend.run(feed)  # one untimed run each
        runs[similarity] = (backend, feed, [])
    for _ in range(args.repeats):
        for backend, feed, times in runs.values():
            start = time.perf_counter()
            backend.run(feed)
            times.append(time.perf_counter() - start)
    shape = " × ".join(map(str, fixed.shape[2:]))
    print(f"{args.fixed}: finest level {shape} voxels, {iterations} iterations, {args.threads} threads, "
          f"{args.repeats} repeats\n")  # fmt: skip
    print("| graph | seconds, median | ms / iteration | × local CC |")
    print("|---|---|---|---|")
    base = statistics.median(runs["ncc"][2])
    for similarity, (backend, _, times) in runs.items():
        med = statistics.median(times)
        per_iteration = 1000 * med / iterations
        print(f"| {Path(backend.info.path).name} ({similarity}) | {med:.3f} | {per_iteration:.0f} | {med / base:.2f} |")


if __name__ == "__main__":
    main()
