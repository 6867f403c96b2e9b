"""The registration pipeline's torch path on one device: the network, then the default
refinement, for a 160^3 pair (issue 11's GPU target: <= 100 ms per pair).

On ``--device`` (CUDA by default) this times, with the device synchronised and every
tensor resident there (no host round trips between the stages):

* ``network``: the shipped default model's registration network (``gvsl.model``,
  weights from the package) on the pair's model grid (``--size`` mm at 1 mm resampled
  to the model's spacing, padded to a multiple of 16);
* ``refine 6 mm`` / ``refine 3 mm``: :func:`gvsl.refine.refine` — the operations
  ``refine.onnx`` exports — on the default pyramid's grids with the default iterations,
  the first level starting from the network's field;

and prints the median of ``--repeats`` runs per stage and of the whole pair, after
``--warmup`` untimed runs. The images are made here (smooth noise, the moving one
warped by a smooth field; no NIfTI reading, so the box needs no nibabel data): the
timing is the point, not the Dice. Resampling between grids uses ``F.interpolate``
(trilinear), a stand-in for the runtime's numpy resampling on the host.

    python benchmarks/refine_gpu.py [--device cuda] [--size 160] [--repeats 10]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F

from gvsl.io import load_model
from gvsl.refine import RefineSettings, refine
from gvsl.runtime.default_model import default_model_dir
from gvsl.runtime.refine_options import RefineOptions
from gvsl.runtime.windows import SIZE_MULTIPLE
from gvsl.spatial import dvf_warp


def _smooth_pair(size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed: Gaussian-smoothed noise in [0, 1] ``[1, 1, size^3]``; moving: it warped by a smooth field."""
    generator = torch.Generator().manual_seed(0)
    noise = torch.rand(1, 1, size, size, size, generator=generator)
    fixed = F.avg_pool3d(F.avg_pool3d(noise, 9, 1, 4), 9, 1, 4)
    fixed = ((fixed - fixed.min()) / (fixed.max() - fixed.min())).to(device)
    idx = torch.arange(size, dtype=torch.float32, device=device)
    d, h, w = torch.meshgrid(idx, idx, idx, indexing="ij")
    field = torch.stack([3 * torch.sin(h / 17), 3 * torch.cos(w / 19), 3 * torch.sin(d / 23)])[None]
    return fixed, dvf_warp(fixed, field)


def _resize(volume: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return F.interpolate(volume, size=shape, mode="trilinear", align_corners=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", type=int, default=160, help="pair size (voxels of 1 mm per axis)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA GPU (use --device cpu to time the CPU path)")
    model, meta = load_model(default_model_dir(), map_location=device)
    model = model.eval()
    spacing = float((meta.get("preprocess") or {}).get("spacing", [4.0])[0])
    options, settings = RefineOptions(), RefineSettings()
    fixed, moving = _smooth_pair(args.size, device)
    net_n = SIZE_MULTIPLE * math.ceil(args.size / spacing / SIZE_MULTIPLE)
    levels = [(s, max(2, round(args.size / s))) for s in options.levels]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def one_pair() -> dict[str, float]:
        times: dict[str, float] = {}
        sync()
        start = last = time.perf_counter()
        with torch.inference_mode():
            grid = (net_n,) * 3
            _, dvf, _ = model.register(_resize(fixed, grid), _resize(moving, grid))
            sync()
            now = time.perf_counter()
            times["network"], last = now - last, now
            field, field_n = dvf, net_n
            for index, (s, n) in enumerate(levels):
                # the field in voxels of the level grid: resized, lengths scaled by the grid ratio
                start_field = _resize(field, (n,) * 3) * ((n - 1) / max(field_n - 1, 1))
                f, m = _resize(fixed, (n,) * 3), _resize(moving, (n,) * 3)
                field = refine(f, m, start_field, options.level_iterations(index), options.step_size,
                               options.regularisation, settings)  # fmt: skip
                field_n = n
                sync()
                now = time.perf_counter()
                times[f"refine {s:g} mm ({n}^3)"], last = now - last, now
        times["pair"] = time.perf_counter() - start
        return times

    for _ in range(args.warmup):
        one_pair()
    runs = [one_pair() for _ in range(args.repeats)]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{args.size}^3 pair at 1 mm on {name} (torch {torch.__version__}), network grid {net_n}^3, "
          f"median of {args.repeats} after {args.warmup} warm-up runs\n")  # fmt: skip
    print("| stage | ms, median | ms, min |")
    print("|---|---|---|")
    for stage in runs[0]:
        values = [r[stage] * 1000 for r in runs]
        print(f"| {stage} | {statistics.median(values):.1f} | {min(values):.1f} |")


if __name__ == "__main__":
    main()
