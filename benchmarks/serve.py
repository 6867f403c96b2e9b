"""Serving benchmark: ``gvsl serve`` (Triton) against the in-process runtime, same model and volume.

For 1, 4 and 16 concurrent clients it reports throughput and p50/p95/p99
latency of

* **in-process**: one shared ``Embedder`` / ``Registrar`` called from N threads;
* **served**: N client threads, each with its own connection, sending
  ``(volume, affine)`` to ``gvsl serve`` on loopback (``GvslClient.infer``, HTTP
  by default) and waiting for the answer; the server does the same work
  (preprocessing, sliding windows, warping, quality figures).

Every point runs for ``--duration`` seconds (bounded: at most ``--max-requests``
per client) after a warm-up, and every answer is checked against the in-process
result: a failed or wrong request is counted and reported, never hidden.

    GVSL_SERVE_PYTHON=build/serve-venv/bin/python python benchmarks/serve.py
    python benchmarks/serve.py --python build/serve-venv/bin/python --duration 20 --protocol grpc

The model has random weights (speed does not depend on them); it is saved and
exported into a temporary folder with ``gvsl.export``. Needs torch (export) in
this environment and a serve venv (README: gvsl serve) for the server.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def _stats(latencies: list[float], wall: float, failures: int) -> dict:
    arr = np.asarray(latencies) * 1000.0
    pct = (lambda q: float(np.percentile(arr, q))) if arr.size else (lambda q: float("nan"))
    return {
        "requests": int(arr.size),
        "failures": failures,
        "throughput": arr.size / wall if wall > 0 else 0.0,
        "p50_ms": pct(50),
        "p95_ms": pct(95),
        "p99_ms": pct(99),
    }


def _run(call, check, clients: int, duration: float, max_requests: int, make_state=None) -> dict:
    """``clients`` threads calling ``call(state)`` until ``duration`` is over."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    failures = [0] * clients
    errors: list[str] = []
    start = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def worker(k: int) -> None:
        state = make_state() if make_state else None
        try:
            start.wait()
            n = 0
            while time.monotonic() < stop_at[0] and n < max_requests:
                t0 = time.perf_counter()
                try:
                    ok = check(call(state))
                except Exception as e:  # noqa: BLE001 - counted, reported
                    ok = False
                    if len(errors) < 3:
                        errors.append(f"{type(e).__name__}: {' '.join(str(e).split())[:200]}")
                latencies[k].append(time.perf_counter() - t0)
                failures[k] += 0 if ok else 1
                n += 1
        finally:
            if state is not None and hasattr(state, "close"):
                state.close()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    stop_at[0] = time.monotonic() + duration
    t0 = time.perf_counter()
    start.wait()
    for t in threads:
        t.join()
    out = _stats([v for x in latencies for v in x], time.perf_counter() - t0, sum(failures))
    if errors:
        out["errors"] = errors
    return out


def _start_server(python: str, export: Path, args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen, str]:
    from gvsl.runtime.serve import free_ports, wait_ready

    http, grpc, metrics = free_ports(3)
    cmd = [
        sys.executable, "-m", "gvsl.cli.main", "serve", "--model", str(export), "--python", python,
        "--host", "127.0.0.1", "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
        "--instances", str(args.instances), "--max-batch", str(args.max_batch),
        "--device", "cpu", "--quiet", *(["--threads", str(args.threads)] if args.threads else []),
    ]  # fmt: skip
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_ready(f"127.0.0.1:{http}", timeout=120, alive=lambda: proc.poll() is None)
    except Exception:
        _stop(proc)
        sys.stderr.write(log.read_text(errors="replace")[-4000:])
        raise
    url = f"grpc://127.0.0.1:{grpc}" if args.protocol == "grpc" else f"http://127.0.0.1:{http}"
    return proc, url


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", default="small", help="tiny, small, default or nine numbers")
    p.add_argument("--size", type=int, default=64, help="volume edge in voxels (1 mm)")
    p.add_argument("--patch", type=int, default=None, help="training patch = window edge (default: --size)")
    p.add_argument("--clients", default="1,4,16", help="comma-separated concurrency levels")
    p.add_argument("--tasks", default="embed,register")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per point")
    p.add_argument("--max-requests", type=int, default=2000, help="per client and point")
    p.add_argument("--protocol", choices=("http", "grpc"), default="http")
    p.add_argument("--instances", type=int, default=2, help="gvsl serve --instances")
    p.add_argument("--max-batch", type=int, default=4, help="gvsl serve --max-batch")
    p.add_argument(
        "--threads", type=int, default=None, help="CPU threads (gvsl serve --threads), both sides (default: every core)"
    )
    p.add_argument("--python", default=os.environ.get("GVSL_SERVE_PYTHON"), help="serve venv interpreter")
    args = p.parse_args()
    if not args.python:
        sys.exit("error: --python: give the serve venv's interpreter (or set GVSL_SERVE_PYTHON); README: gvsl serve")

    from gvsl.cli.bench import random_model_export, smooth_ct_cube
    from gvsl.runtime import Embedder, Registrar
    from gvsl.runtime.client import GvslClient
    from gvsl.runtime.serve import EMBED_MODEL, REGISTER_MODEL

    tmp = Path(tempfile.mkdtemp(prefix="gvsl-serve-bench-"))
    try:
        patch = args.patch or args.size
        random_model_export(args.widths, patch, tmp)
        vol, aff = smooth_ct_cube(args.size)
        moving = np.roll(vol, 3, axis=0)
        levels = [int(c) for c in args.clients.split(",")]
        tasks = args.tasks.split(",")
        rows = []

        embedder = Embedder(tmp / "export", device="cpu", threads=args.threads or 0)
        registrar = Registrar(tmp / "export", device="cpu", threads=args.threads or 0)
        ref_emb = embedder.embed((vol, aff)).embedding
        ref_reg = registrar.register((vol, aff), (moving, aff))
        emb_in = {"image": vol[None], "affine": aff[None]}
        reg_in = {"fixed": vol[None], "fixed_affine": aff[None], "moving": moving[None], "moving_affine": aff[None]}
        calls = {  # (in-process call, served call, check)
            "embed": (
                lambda _: embedder.embed((vol, aff)).embedding,
                lambda c: c.infer(EMBED_MODEL, emb_in, ["embedding"])["embedding"][0],
                lambda e: np.array_equal(e, ref_emb),
            ),
            "register": (
                lambda _: registrar.register((vol, aff), (moving, aff)).warped,
                lambda c: c.infer(REGISTER_MODEL, reg_in, ["warped"])["warped"][0],
                lambda w: np.array_equal(w, ref_reg.warped),
            ),
        }
        proc, url = _start_server(args.python, tmp / "export", args, tmp / "serve.log")
        try:
            # each point in-process then served, back to back: a shared machine's load drifts
            # slowly, so the two sides of a row see about the same conditions (the idle server
            # costs nothing while the in-process side runs)
            for task in tasks:
                local_call, served_call, check = calls[task]
                local_call(None)
                with GvslClient(url) as warm:
                    served_call(warm)
                for n in levels:
                    for mode, call, state in (
                        ("in-process", local_call, None),
                        (f"served ({args.protocol})", served_call, lambda: GvslClient(url)),
                    ):
                        r = {"task": task, "mode": mode, "clients": n,
                             **_run(call, check, n, args.duration, args.max_requests, make_state=state)}  # fmt: skip
                        rows.append(r)
                        print(json.dumps(r), file=sys.stderr, flush=True)
        finally:
            _stop(proc)
            embedder.close()
            registrar.close()
        print(
            f"\nwidths {args.widths}, volume {args.size}^3 at 1 mm, patch {patch}^3, {os.cpu_count()} CPUs "
            f"({platform.processor() or platform.machine()}), {args.duration:.0f} s per point; server: gvsl serve "
            f"--instances {args.instances} --max-batch {args.max_batch}, {args.protocol}, loopback\n"
        )
        print("| task | mode | clients | requests | failed | throughput (req/s) | p50 (ms) | p95 (ms) | p99 (ms) |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['task']} | {r['mode']} | {r['clients']} | {r['requests']} | {r['failures']} | "
                f"{r['throughput']:.2f} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['p99_ms']:.0f} |"
            )
        if any(r["failures"] for r in rows):
            sys.exit(1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
