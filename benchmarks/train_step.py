"""Benchmark: GVSL augmentation (official-style NumPy/SciPy vs gvsl.augment) and a training step.

Run: ``python benchmarks/train_step.py [--sizes 64 128] [--widths default small]
[--repeats 3] [--train-sizes 64]``. Prints Markdown tables of MEDIAN wall times
(seconds) over ``--repeats`` runs, measured side by side in one process, so the
ratio is meaningful even on a busy machine. Default runtime is a few minutes on
a 2-core CPU.

"official-style" is :mod:`gvsl.cli.bench.official`, a NumPy/SciPy
re-implementation of the authors' per-sample pipeline (Models Genesis damage,
then a batchgenerators-style spatial transform), the same reference
``gvsl bench --train`` uses. Those SciPy calls are single-threaded; gvsl is
also shown with one torch thread.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from functools import partial

import numpy as np
import torch

from gvsl.augment import AugmentConfig, Augmenter, appearance_damage, spatial_transform
from gvsl.cli.bench.official import official_appearance, official_spatial
from gvsl.config import ModelConfig
from gvsl.losses import GVSLLoss
from gvsl.model import GVSL


# -- timing helpers -----------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], object], repeats: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def fmt(t: float | None) -> str:
    if t is None:
        return "-"
    return f"{t:.3f}" if t < 10 else f"{t:.1f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown CPU"


# -- benchmarks ---------------------------------------------------------------
def bench_augmentation(size: int, repeats: int, devices: list[torch.device]) -> list[str]:
    """One table row. All variants run interleaved, once per repeat, so they share the
    machine's conditions (other processes on a shared CPU)."""
    rng = np.random.default_rng(0)
    a = rng.random((1, size, size, size), dtype=np.float32)
    b = rng.random((1, size, size, size), dtype=np.float32)
    damaged = official_appearance(a.copy(), rng)
    cfg = AugmentConfig()
    aug = Augmenter(cfg)
    cpu = torch.device("cpu")
    nt = torch.get_num_threads()
    # name -> (function, device, torch threads or 0 = leave)
    jobs: dict[str, tuple[Callable[[], object], torch.device, int]] = {
        "off spatial": (lambda: official_spatial([a[0], damaged[0], b[0]], rng), cpu, 0),
        "off appear": (lambda: official_appearance(a.copy(), rng), cpu, 0),
    }
    for dev in devices:
        x1, x2 = torch.from_numpy(a)[None].to(dev), torch.from_numpy(b)[None].to(dev)
        pair = torch.cat([x1, x2], 1)
        gen = torch.Generator(device=dev).manual_seed(0)
        threads = [nt, 1] if dev.type == "cpu" else [0]
        jobs[f"{dev.type} spatial"] = (partial(spatial_transform, pair, cfg, gen), dev, nt)
        jobs[f"{dev.type} appear"] = (partial(appearance_damage, x1, cfg, gen), dev, nt)
        for k in threads:
            jobs[f"{dev.type} total {k}"] = (partial(aug, x1, x2, gen), dev, k)
    times: dict[str, list[float]] = {k: [] for k in jobs}
    for r in range(repeats + 1):  # round 0 warms the torch paths up and is not counted
        for name, (fn, dev, k) in jobs.items():
            if r == 0 and name.startswith("off"):
                continue
            torch.set_num_threads(k or nt)
            t = median_time(fn, 1, 0, dev)
            if r:
                times[name].append(t)
    torch.set_num_threads(nt)
    med = {k: statistics.median(v) for k, v in times.items()}
    official = med["off spatial"] + med["off appear"]
    ours, ours1 = med[f"cpu total {nt}"], med["cpu total 1"]
    cells = [f"{size}³", fmt(med["off spatial"]), fmt(med["off appear"]), fmt(official),
             fmt(med["cpu spatial"]), fmt(med["cpu appear"]), fmt(ours), f"{official / ours:.1f}×",
             fmt(ours1), f"{official / ours1:.1f}×", fmt(med.get("cuda total 0"))]
    return cells


def bench_train_step(size: int, widths: str, repeats: int, dev: torch.device) -> list[str]:
    torch.manual_seed(0)
    model = GVSL(ModelConfig.from_preset(widths)).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss_fn = GVSLLoss()
    aug = Augmenter()
    gen = torch.Generator(device=dev).manual_seed(0)
    x1 = torch.rand((1, 1, size, size, size), generator=gen, device=dev)
    x2 = torch.rand((1, 1, size, size, size), generator=gen, device=dev)

    def step() -> None:
        x1a, x1d, x2a = aug(x1, x2, gen)
        out = model(x1d, x2a)
        loss = loss_fn(x1a, out.warped, out.restored, out.local_dvf).total
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t_step = median_time(step, repeats, 1, dev)
    t_aug = median_time(lambda: aug(x1, x2, gen), repeats, 1, dev)
    mem = f"{torch.cuda.max_memory_allocated(dev) / 2**30:.1f}" if dev.type == "cuda" else "-"
    return [f"{size}³", widths, str(dev), fmt(t_aug), fmt(t_step), f"{100 * t_aug / t_step:.1f} %", mem]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128], help="augmentation sizes")
    p.add_argument("--widths", nargs="+", default=["default", "small"], help="width presets")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--train-sizes", type=int, nargs="*", default=None,
                   help="training-step sizes (default: 64 on CPU, --sizes on CUDA; "
                        "default widths at 128³ on a CPU take minutes per step and ~20 GB)")
    p.add_argument("--no-train", action="store_true", help="augmentation table only")
    args = p.parse_args()

    cuda = torch.cuda.is_available()
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if cuda else [])
    print(f"# machine: {cpu_name()}, {torch.get_num_threads()} torch threads"
          + (f", {torch.cuda.get_device_name()}" if cuda else ", no CUDA"))
    print(f"# torch {torch.__version__}, numpy {np.__version__}, python {platform.python_version()}")
    load = os.getloadavg()[0]
    print(f"# median of {args.repeats} runs, seconds per sample (batch 1); load average at start {load:.2f}")
    if load > 0.5 * (os.cpu_count() or 1):
        print("# WARNING: other processes are using the CPU; multi-threaded torch timings suffer most "
              "(OpenMP threads wait for descheduled peers), the 1-thread column least")
    print()

    rows = [bench_augmentation(s, args.repeats, devices) for s in args.sizes]
    nt = torch.get_num_threads()
    print(table(["size", "official spatial", "official appearance", "official total",
                 f"gvsl spatial ({nt} thr)", f"gvsl appearance ({nt} thr)", f"gvsl total ({nt} thr)",
                 "speed-up", "gvsl total (1 thr)", "speed-up (1 thr)", "gvsl total (CUDA)"], rows))
    print()

    if args.no_train:
        return
    rows = []
    for dev in devices:
        sizes = args.train_sizes if args.train_sizes is not None else (
            args.sizes if dev.type == "cuda" else [64])
        for s in sizes:
            for w in args.widths:
                try:
                    rows.append(bench_train_step(s, w, args.repeats, dev))
                except torch.OutOfMemoryError:
                    rows.append([f"{s}³", w, str(dev), "OOM", "OOM", "-", "-"])
                    torch.cuda.empty_cache()
    print("Training step: augmentation + GVSL forward (x1', x2) + GVSLLoss + backward + Adam")
    print(table(["size", "widths", "device", "augmentation", "step total", "aug share",
                 "peak GPU GiB"], rows))
    print(f"\n# load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
