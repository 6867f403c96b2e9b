"""Runtime benchmark: ``Embedder.embed`` and ``Registrar.register`` end to end.

For every backend available here (ONNX Runtime on each usable device, native
TensorRT when installed, and the PyTorch eager model for comparison) at the
same model and volume size it reports the median latency of one call (from an
in-memory volume: preprocessing, inference, mapping back to the input grid,
warping), the throughput of one shared object called from ``--concurrency``
threads, and the process's peak resident memory. Each (task, backend) runs in
a fresh subprocess so peak memory belongs to that case alone.

    python benchmarks/runtime.py                       # small widths, 64^3, CPU
    python benchmarks/runtime.py --widths default --size 128 --device cuda

The model has random weights (speed does not depend on them); it is saved and
exported once into a temporary folder with ``gvsl.export``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def run_case(args: argparse.Namespace) -> dict:
    """One (task, backend) in this process; prints a JSON line."""
    from gvsl.cli.bench import smooth_ct_cube
    from gvsl.runtime import Embedder, Registrar

    model = args.model_dir if args.backend == "torch" else args.export_dir
    vol = smooth_ct_cube(args.size)
    moving = (np.roll(vol[0], 3, axis=0), vol[1])
    t0 = time.perf_counter()
    if args.task == "embed":
        obj = Embedder(model, backend=args.backend, device=args.device)

        def call() -> None:
            obj.embed(vol)
    else:
        obj = Registrar(model, backend=args.backend, device=args.device)

        def call() -> None:
            obj.register(vol, moving)

    load_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        call()
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    n_conc = args.repeats * args.concurrency
    t = time.perf_counter()
    threads = [threading.Thread(target=lambda: [call() for _ in range(args.repeats)]) for _ in range(args.concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    conc_s = time.perf_counter() - t
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return {
        "task": args.task,
        "backend": obj.backend.name,
        "size": args.size,
        "load_s": load_s,
        "median_ms": 1000.0 * statistics.median(times),
        "throughput": n_conc / conc_s,
        "concurrency": args.concurrency,
        "peak_mb": peak_mb,
    }


def _backends(device: str) -> list[str]:
    import importlib.util

    out = []
    if importlib.util.find_spec("onnxruntime"):
        out.append("onnxruntime")
    if importlib.util.find_spec("tensorrt") and device != "cpu":
        out.append("tensorrt")
    out.append("torch")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", default="small", help="tiny, small, default or nine numbers")
    p.add_argument("--size", type=int, default=64, help="volume edge in voxels")
    p.add_argument("--patch", type=int, default=None, help="training patch = window edge (default: --size)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=2, help="threads sharing one object for throughput")
    p.add_argument("--backends", default=None, help="comma-separated subset (default: all available)")
    p.add_argument("--tasks", default="embed,register")
    p.add_argument("--task", help=argparse.SUPPRESS)
    p.add_argument("--backend", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--export-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.task:  # a child process: one case
        print(json.dumps(run_case(args)))
        return

    from gvsl.cli.bench import random_model_export

    tmp = Path(tempfile.mkdtemp(prefix="gvsl-bench-"))
    patch = args.patch or args.size
    random_model_export(args.widths, patch, tmp)
    backends = args.backends.split(",") if args.backends else _backends(args.device)
    rows = []
    for task in args.tasks.split(","):
        for backend in backends:
            cmd = [
                sys.executable, __file__, "--task", task, "--backend", backend, "--device", args.device,
                "--size", str(args.size), "--repeats", str(args.repeats), "--warmup", str(args.warmup),
                "--concurrency", str(args.concurrency), "--model-dir", str(tmp / "model"),
                "--export-dir", str(tmp / "export"),
            ]  # fmt: skip
            res = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy(), check=False)
            if res.returncode != 0:
                print(f"{task}/{backend} failed: {res.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                continue
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), file=sys.stderr)
    cpu = platform.processor() or platform.machine()
    print(
        f"\nwidths {args.widths}, volume {args.size}^3 at 1 mm, patch {patch}^3, "
        f"device {args.device}, {os.cpu_count()} CPUs ({cpu}), {args.repeats} timed calls after {args.warmup} "
        f"warm-up, throughput with {args.concurrency} threads sharing one object\n"
    )
    print("| task | backend | median latency (ms) | throughput (vol/s) | peak RSS (MB) | load (s) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['task']} | {r['backend']} | {r['median_ms']:.0f} | {r['throughput']:.2f} | "
            f"{r['peak_mb']:.0f} | {r['load_s']:.2f} |"
        )


if __name__ == "__main__":
    main()
