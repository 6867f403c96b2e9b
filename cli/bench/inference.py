"""The inference benchmark: every backend at every (kind, size, batch), rounds interleaved.

Every round runs every backend once and the medians of the rounds are
reported, so ratios hold on a shared, noisy machine; each output is compared
with torch eager fp32 (the official code's path) by its cosine.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from gvsl.cli.bench.flops import model_flops
from gvsl.cli.bench.machine import Unavailable, summarize
from gvsl.cli.bench.memory import run_probe
from gvsl.cli.bench.runners import BASELINE, INFERENCE_BACKENDS, Runner, make_runner
from gvsl.cli.bench.workload import BenchSetup

__all__ = ["bench_inference"]


def _cosines(got: np.ndarray, ref: np.ndarray) -> float:
    """Smallest per-sample cosine between two batched outputs."""
    a = got.reshape(got.shape[0], -1).astype(np.float64)
    b = ref.reshape(ref.shape[0], -1).astype(np.float64)
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(den > 0, num / den, 1.0)
    return float(cos.min())


def bench_inference(
    setup: BenchSetup,
    backends: Sequence[str],
    kinds: Sequence[str] = ("encoder",),
    sizes: Sequence[int] = (64,),
    batches: Sequence[int] = (1, 8),
    repeats: int = 5,
    warmup: int = 1,
    memory: bool = True,
    deadline: float | None = None,
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Every backend at every (kind, size, batch), rounds interleaved; one record each.

    A backend that cannot run here gets a record with ``status`` saying why.
    ``deadline`` (a ``time.monotonic()`` value) skips cases that would start later.
    """
    records: list[dict[str, Any]] = []
    model_cfg = setup.info()["model"]
    for kind in kinds:
        for size in sizes:
            for batch in batches:
                case = {"kind": kind, "size": size, "batch": batch}
                if deadline is not None and time.monotonic() > deadline:
                    for b in backends:
                        rec = {**case, "backend": b, "status": "skipped: time limit"}
                        records.append(rec)
                        if on_record:
                            on_record(rec)
                    continue
                flops = model_flops(model_cfg, kind, batch, (size,) * 3)
                xs = setup.inputs(kind, batch, size)
                runners: dict[str, Runner] = {}
                recs: dict[str, dict[str, Any]] = {}
                for b in backends:
                    rec = {**case, "backend": b, "what": INFERENCE_BACKENDS.get(b, ("", ""))[1], "gflop": flops / 1e9}
                    recs[b] = rec
                    t0 = time.perf_counter()
                    try:
                        r = make_runner(setup, b, kind, xs)
                        for _ in range(max(warmup, 1)):
                            r.run()
                    except Unavailable as e:
                        rec["status"] = f"unavailable: {e}"
                        continue
                    except Exception as e:  # a backend failing must not end the benchmark
                        rec["status"] = f"failed: {type(e).__name__}: {' '.join(str(e).split())[:200]}"
                        setup.log(f"{kind} {size}^3 x{batch} {b}: {rec['status']}")
                        continue
                    rec.update(status="ok", setup_s=time.perf_counter() - t0, device=r.device,
                               precision=r.precision, io=r.io)  # fmt: skip
                    runners[b] = r
                times: dict[str, list[float]] = {b: [] for b in runners}
                for _ in range(repeats):
                    for b, r in runners.items():
                        t = time.perf_counter()
                        r.run()
                        times[b].append(time.perf_counter() - t)
                ref = runners[BASELINE].result() if BASELINE in runners else None
                for b, r in runners.items():
                    st = summarize(times[b])
                    rec = recs[b]
                    rec["latency_s"] = st
                    rec["samples_per_s"] = batch / st["median"]
                    rec["tflops"] = flops / st["median"] / 1e12
                    if BASELINE in times:
                        rec["x_baseline"] = statistics.median(times[BASELINE]) / st["median"]
                    if ref is not None:
                        rec["cosine_to_fp32"] = _cosines(r.result(), ref)
                for r in runners.values():
                    r.close()
                runners.clear()
                if memory:
                    for b, rec in recs.items():
                        if b == "torch-compile":  # a child would compile again for minutes
                            rec["memory_error"] = "not probed (compilation)"
                        elif rec.get("status") == "ok":
                            timeout = 120 + 10 * max(rec["latency_s"]["median"], rec.get("setup_s", 0))
                            rec.update(run_probe(setup, b, kind, batch, size, timeout))
                for b in backends:
                    records.append(recs[b])
                    if on_record:
                        on_record(recs[b])
                if setup.device.startswith("cuda") and "torch" in sys.modules:
                    sys.modules["torch"].cuda.empty_cache()
    return records
