"""The registration network's cost on the padded model grid against the slightly stretched one.

``gvsl register`` runs the network on the fixed image's model grid, whose axes must be
multiples of 16. Padding the chest CT's 98 x 98 x 85 grid makes it 112 x 112 x 96 (+45 %
voxels); :func:`gvsl.runtime.register.network_spacing` instead makes the voxels up to 10 %
larger so the grid is 96 x 96 x 80. This script times the default model's registration graph
(ONNX Runtime CPU) on both grids of one fixed scan, alternating them, and prints the medians
and their ratio.

    python benchmarks/network_grid.py FIXED.nii.gz [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import numpy as np

from gvsl.runtime.default_model import default_model_dir
from gvsl.runtime.io import read_volume
from gvsl.runtime.padding import pad_to_multiple
from gvsl.runtime.preprocess import preprocess
from gvsl.runtime.refine_options import RefineOptions
from gvsl.runtime.register import Registrar, network_spacing
from gvsl.runtime.windows import SIZE_MULTIPLE


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("fixed")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    registrar = Registrar(default_model_dir(), "onnxruntime", "cpu", refine=RefineOptions(iterations=0))
    cfg = registrar.preprocess
    vol = read_volume(args.fixed)
    model_grid = preprocess(vol, cfg).data
    stretched = preprocess(vol, replace(cfg, spacing=network_spacing(cfg.spacing, model_grid.shape))).data
    grids = {"padded": pad_to_multiple(model_grid, SIZE_MULTIPLE)[0], "stretched": stretched}
    seconds: dict[str, list[float]] = {name: [] for name in grids}
    for grid in grids.values():  # warm-up
        registrar.backend.run({"fixed": grid[None, None], "moving": grid[None, None]}, ["affine", "dvf"])
    for _ in range(args.repeats):
        for name, grid in grids.items():
            t0 = time.perf_counter()
            registrar.backend.run({"fixed": grid[None, None], "moving": grid[None, None]}, ["affine", "dvf"])
            seconds[name].append(time.perf_counter() - t0)
    registrar.close()
    print(f"model grid {model_grid.shape} at {cfg.spacing} mm; median of {args.repeats}, alternating\n")
    print("| network grid | shape | voxels | s (median) |")
    print("|---|---|---|---|")
    for name, grid in grids.items():
        print(f"| {name} | {'x'.join(map(str, grid.shape))} | {np.prod(grid.shape) / 1e6:.2f} M | "
              f"{statistics.median(seconds[name]):.2f} |")  # fmt: skip
    ratio = statistics.median(seconds["padded"]) / statistics.median(seconds["stretched"])
    print(f"\npadded / stretched: {ratio:.2f}x")


if __name__ == "__main__":
    main()
