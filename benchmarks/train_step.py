"""Benchmark: GVSL augmentation (official-style NumPy/SciPy vs gvsl.augment) and a training step.

Run: ``python benchmarks/train_step.py [--sizes 64 128] [--widths default small]
[--repeats 3] [--train-sizes 64]``. Prints Markdown tables of MEDIAN wall times
(seconds) over ``--repeats`` runs, measured side by side in one process, so the
ratio is meaningful even on a busy machine. Default runtime is a few minutes on
a 2-core CPU.

"official-style" is a faithful NumPy/SciPy re-implementation, kept in this file,
of the authors' per-sample pipeline: Models Genesis damage of x1 as in the GVSL
release (Python loop over 5000 block copies, one shared permutation; Bézier
curve with ``scipy.special.comb`` Bernstein terms over 100000 points and
``np.interp``; in-painting loop), then a batchgenerators-style spatial
transform (per-axis ``gaussian_filter`` of uniform noise with radius 4σ,
affine about the centre, ``map_coordinates`` order 1 of x1, x1', x2). Those
SciPy calls are single-threaded; gvsl is also shown with one torch thread.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from functools import partial

import numpy as np
import torch
from scipy.ndimage import gaussian_filter, map_coordinates
from scipy.special import comb

from gvsl.augment import AugmentConfig, Augmenter, appearance_damage, spatial_transform
from gvsl.config import ModelConfig
from gvsl.losses import GVSLLoss
from gvsl.model import GVSL


# -- official-style reference (NumPy / SciPy, per sample) --------------------
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
