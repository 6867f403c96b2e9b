"""Peak host and device memory of one backend, measured in a fresh child process.

A process's peak resident memory only grows, so measuring several backends in
one process would report the largest of them for all; each case therefore runs
in its own interpreter (:func:`run_probe` starts it, :func:`probe` runs in it).
An ONNX-only child never imports torch, so its figure is what ``gvsl embed``
needs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from gvsl.cli.bench.machine import device_peak_mb, peak_rss_mb
from gvsl.cli.bench.runners import make_runner
from gvsl.cli.bench.workload import BenchSetup

__all__ = ["probe", "probe_main", "run_probe"]


def probe(args: dict[str, Any]) -> dict[str, Any]:
    """In a fresh process: build one runner, run it twice, report peak host RSS and
    device memory (torch's allocator peak or nvidia-smi's figure, the larger)."""
    setup = BenchSetup(
        model=args["model"], device=args["device"], workdir=Path(args["workdir"]), patch=args["patch"],
        calibration=tuple(args["calibration"]), eval_volumes=tuple(args["eval_volumes"]), threads=args["threads"],
        log=lambda s: None,
    )  # fmt: skip
    setup._export_dir = Path(args["export_dir"]) if args.get("export_dir") else None
    setup._export_fp16 = bool(args.get("export_fp16"))
    xs = setup.inputs(args["kind"], args["batch"], args["size"])
    runner = make_runner(setup, args["backend"], args["kind"], xs)
    runner.run()
    runner.run()
    dev = None
    if runner.device == "cuda":
        torch = sys.modules.get("torch")
        peaks = [device_peak_mb(os.getpid())]
        if torch is not None:
            peaks.append(torch.cuda.max_memory_allocated() / 2**20)
        dev = max((p for p in peaks if p is not None), default=None)
    return {"peak_host_mb": peak_rss_mb(), "peak_device_mb": dev}


def run_probe(setup: BenchSetup, backend: str, kind: str, batch: int, size: int, timeout: float) -> dict[str, Any]:
    args = {
        "model": setup.model or str(setup.model_dir()),
        "device": setup.device, "workdir": str(setup.workdir), "patch": setup.patch,
        "calibration": list(map(str, setup.calibration)), "eval_volumes": list(map(str, setup.eval_volumes)),
        "threads": setup.threads, "kind": kind, "batch": batch, "size": size, "backend": backend,
        "export_dir": str(setup._export_dir) if setup._export_dir else None, "export_fp16": setup._export_fp16,
    }  # fmt: skip
    cmd = [sys.executable, "-c", "from gvsl.cli.bench.memory import probe_main; probe_main()", json.dumps(args)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"memory_error": f"probe timed out after {timeout:.0f} s"}
    if res.returncode != 0:
        tail = (res.stderr.strip().splitlines() or ["no output"])[-1]
        return {"memory_error": tail[:200]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def probe_main() -> None:
    """The child's entry point: the case as JSON in the last argument, the result as JSON on stdout."""
    print(json.dumps(probe(json.loads(sys.argv[-1]))))
