"""The training benchmark: an official-style step against gvsl's step, in samples/s.

official-style: batch 1, fp32, NCDHW; x1's Models Genesis damage in NumPy on
the host (:mod:`gvsl.cli.bench.official`, as the authors' loader does),
spatial augmentation on the device (cheaper than the authors' host version, so
the ratio is conservative). gvsl: :func:`gvsl.train.make_train_step` (what
``gvsl train`` runs) at ``batch`` with augmentation on the device, autocast
(bf16 on GPUs that have it; fp32 on CPUs, as ``gvsl train``), channels-last and
optionally ``torch.compile``. Both steps run interleaved, once per round.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from gvsl.cli.bench.machine import summarize
from gvsl.cli.bench.official import official_appearance

__all__ = ["bench_train"]

Step = Callable[[], None]


def bench_train(
    sizes: Sequence[int] = (128,),
    widths: str = "default",
    device: str = "cuda",
    batch: int = 4,
    repeats: int = 5,
    warmup: int = 2,
    compile: bool = False,
    channels_last: bool = True,
    amp: bool = True,
    deadline: float | None = None,
) -> list[dict[str, Any]]:
    """One record per (size, variant): step time, samples/s and the ratio to official-style.

    ``deadline`` (a ``time.monotonic()`` value) skips sizes that would start later.
    """
    from gvsl.train import resolve_device

    dev = resolve_device(device)
    records: list[dict[str, Any]] = []
    for size in sizes:
        base = {"kind": "train", "size": size, "widths": widths, "device": str(dev)}
        if deadline is not None and time.monotonic() > deadline:
            records.append({**base, "status": "skipped: time limit"})
            continue
        records += _train_case(base, dev, size, widths, batch, repeats, warmup, compile, channels_last, amp)
    return records


def _official_step(dev: Any, widths: str, host: list[np.ndarray], sync: Step) -> Step:
    """The authors' step: NumPy damage of x1 on the host, batch 1, fp32, NCDHW."""
    import torch

    from gvsl.augment import AugmentConfig, spatial_transform
    from gvsl.config import ModelConfig
    from gvsl.losses import GVSLLoss
    from gvsl.model import GVSL

    rng = np.random.default_rng(0)
    gen = torch.Generator(device=dev).manual_seed(0)
    aug_cfg = AugmentConfig()
    torch.manual_seed(0)
    model = GVSL(ModelConfig.from_preset(widths)).to(dev).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss_fn = GVSLLoss()

    def step() -> None:
        a, b = host[0], host[1]
        damaged = official_appearance(a.copy(), rng)
        x = torch.from_numpy(np.stack([a, damaged, b], 1)).to(dev)  # [1, 3, D, H, W]
        with torch.no_grad():
            x1a, x1d, x2a = spatial_transform(x, aug_cfg, gen).split(1, dim=1)
        out = model(x1d, x2a)
        loss = loss_fn(x1a, out.warped, out.restored, out.local_dvf).total
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sync()

    return step


def _gvsl_step(
    dev: Any, widths: str, host: list[np.ndarray], batch: int, sync: Step, compile: bool, channels_last: bool,
    amp: bool,
) -> tuple[Step, str]:  # fmt: skip
    """gvsl's step as ``gvsl train`` runs it, and its precision's name."""
    import torch

    from gvsl.augment import AugmentConfig, Augmenter
    from gvsl.config import ModelConfig
    from gvsl.losses import GVSLLoss
    from gvsl.model import GVSL
    from gvsl.train import _amp_dtype, make_train_step

    gen = torch.Generator(device=dev).manual_seed(0)
    torch.manual_seed(0)
    model = GVSL(ModelConfig.from_preset(widths)).to(dev).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    amp_dtype = _amp_dtype(dev, amp)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    step_fn = make_train_step(model, optimizer, GVSLLoss(), Augmenter(AugmentConfig()), amp_dtype, scaler,
                              channels_last=channels_last, compile=compile)  # fmt: skip
    x1 = torch.from_numpy(np.concatenate(host[:batch])[:, None]).to(dev)
    x2 = torch.from_numpy(np.concatenate(host[batch : 2 * batch])[:, None]).to(dev)

    def step() -> None:
        step_fn(x1, x2, gen)
        sync()

    precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(amp_dtype, "fp32")  # type: ignore[arg-type]
    return step, precision


def _train_case(
    base: dict[str, Any], dev: Any, size: int, widths: str, batch: int, repeats: int, warmup: int,
    compile: bool, channels_last: bool, amp: bool,
) -> list[dict[str, Any]]:  # fmt: skip
    import torch

    cuda = dev.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(dev)

    rng = np.random.default_rng(0)
    host = [rng.random((1, size, size, size), dtype=np.float32) for _ in range(2 * max(batch, 1))]
    steps: dict[str, tuple[Step, int]] = {"official-style": (_official_step(dev, widths, host, sync), 1)}
    notes: dict[str, dict[str, Any]] = {
        "official-style": {"precision": "fp32", "augmentation": "NumPy damage on host + device spatial",
                           "channels_last": False, "compile": False},
    }  # fmt: skip
    name = "gvsl" + ("-compile" if compile else "")
    fast, precision = _gvsl_step(dev, widths, host, batch, sync, compile, channels_last, amp)
    steps[name] = (fast, batch)
    notes[name] = {"precision": precision, "augmentation": "gvsl.augment on the device",
                   "channels_last": channels_last, "compile": compile}  # fmt: skip

    times: dict[str, list[float]] = {k: [] for k in steps}
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    for k, (fn, _) in steps.items():
        t0 = time.perf_counter()
        for _ in range(warmup):
            fn()
        notes[k]["warmup_s"] = time.perf_counter() - t0
    for _ in range(repeats):
        for k, (fn, _) in steps.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    official_rate = 1.0 / statistics.median(times["official-style"])
    records: list[dict[str, Any]] = []
    for k, (_, b) in steps.items():
        st = summarize(times[k])
        rec = {**base, "variant": k, "status": "ok", "batch": b, "step_s": st, "samples_per_s": b / st["median"],
               **notes[k]}  # fmt: skip
        rec["x_official"] = rec["samples_per_s"] / official_rate
        if cuda:
            rec["peak_device_mb_all_variants"] = torch.cuda.max_memory_allocated(dev) / 2**20
        records.append(rec)
    steps.clear()
    if cuda:
        torch.cuda.empty_cache()
    return records
