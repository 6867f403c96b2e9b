"""Peak memory of the gather warp in ONNX Runtime (CPU), one fresh process per case.

Two graphs, both exported with ``sampler="gather"`` (what TensorRT builds):

* ``warp``: the affine head's 32-channel feature warp alone
  (``affine_warp(features [1, C, S, S, S], affine)``), the part of the
  registration graph whose memory scaled with the channels;
* ``registration``: the whole registration graph of a tiny-width model whose
  local features have C channels (widths 8,16,16,32,32,32,16,16,C), so the
  convolutions stay cheap and the feature warp dominates as at default width.

Each case runs in its own Python process (``--child``) that builds the ONNX
Runtime session, runs it once on random input and reports its peak resident
set (``VmHWM`` of /proc/self/status) and the resident set just before the
run; the table gives the median over ``--repeats`` processes. ``--onnx-dir``
measures graphs exported elsewhere instead of exporting with this checkout;
``--gather-from FILE`` exports with the gather sampler of another version of
``gvsl/spatial.py`` (``git show REV:gvsl/spatial.py > FILE``), which gives
the "before" column of a change. Linux only (reads /proc).

Example: ``python benchmarks/warp_memory.py --sizes 160,256 --graphs warp --repeats 3``
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(onnx_path: str, size: int, channels: int, threads: int) -> None:
    """Run one graph once at ``size``^3 and print its memory figures as JSON."""
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    names = [i.name for i in sess.get_inputs()]
    if names == ["features", "affine"]:
        feeds = {
            "features": rng.random((1, channels, size, size, size), dtype=np.float32),
            "affine": np.array([[[0.98, -0.17, 0.0, 2.0], [0.17, 0.98, 0.0, -1.0], [0.0, 0.0, 1.0, 0.5]]], np.float32),
        }
    else:
        feeds = {n: rng.random((1, 1, size, size, size), dtype=np.float32) for n in names}
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    sess.run(None, feeds)
    seconds = time.perf_counter() - start
    print(json.dumps({"rss_before_mib": before / 1024, "peak_mib": _status_kib("VmHWM") / 1024, "seconds": seconds}))


def use_gather_from(path: str) -> None:
    """Make :func:`gvsl.spatial.sample` use ``_gather_sample`` of another ``spatial.py``."""
    import importlib.util

    import gvsl.spatial

    spec = importlib.util.spec_from_file_location("gvsl_spatial_baseline", path)
    assert spec is not None and spec.loader is not None
    baseline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(baseline)
    gvsl.spatial._gather_sample = baseline._gather_sample  # looked up by sample() at call time


def export_graphs(out: Path, channels: int, graphs: list[str]) -> dict[str, Path]:
    """Export the ``warp`` and/or ``registration`` graph with this checkout's gvsl."""
    import torch

    from gvsl.config import ModelConfig
    from gvsl.export.onnx_export import export_graph
    from gvsl.model import GVSL
    from gvsl.runtime import artifact
    from gvsl.spatial import affine_warp

    paths: dict[str, Path] = {}
    if "warp" in graphs:

        class FeatureWarp(torch.nn.Module):
            def forward(self, features: torch.Tensor, affine: torch.Tensor) -> torch.Tensor:
                return affine_warp(features, affine, sampler="gather", convention="centered")

        paths["warp"] = out / "warp.onnx"
        example = (torch.rand(1, channels, 32, 32, 32), torch.eye(3, 4)[None])
        spatial = {2: "depth", 3: "height", 4: "width"}
        with torch.no_grad():
            torch.onnx.export(
                FeatureWarp(),
                example,
                str(paths["warp"]),
                dynamo=False,
                opset_version=17,
                input_names=["features", "affine"],
                output_names=["warped"],
                dynamic_axes={"features": spatial, "warped": spatial},
            )
    if "registration" in graphs:
        torch.manual_seed(0)
        cfg = ModelConfig(
            widths=(8, 16, 16, 32, 32, 32, 16, 16, channels), affine_width=32, deform_width=8, restore_width=8
        )
        paths["registration"] = export_graph(
            GVSL(cfg).eval(), artifact.REGISTRATION, out / "registration.onnx", metadata={}, warp="gather"
        )
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="160", help="comma-separated cube sizes (multiples of 16)")
    parser.add_argument("--graphs", default="warp,registration", help="warp and/or registration")
    parser.add_argument("--channels", type=int, default=32, help="feature channels the warp moves")
    parser.add_argument("--repeats", type=int, default=3, help="processes per case (median reported)")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    parser.add_argument("--onnx-dir", help="measure warp.onnx / registration.onnx from here instead of exporting")
    parser.add_argument("--gather-from", help="export with the gather sampler of this spatial.py (a baseline)")
    parser.add_argument("--child", nargs=2, metavar=("ONNX", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), args.channels, args.threads)
        return
    graphs = [g for g in args.graphs.split(",") if g]
    with tempfile.TemporaryDirectory() as tmp:
        if args.onnx_dir:
            paths = {g: Path(args.onnx_dir) / f"{g}.onnx" for g in graphs}
        else:
            if args.gather_from:
                use_gather_from(args.gather_from)
            paths = export_graphs(Path(tmp), args.channels, graphs)
        print(f"| graph | size | channels | peak RSS MiB (median of {args.repeats}) | RSS before run MiB | run s |")
        print("|---|---|---|---|---|---|")
        for graph, path in paths.items():
            for size in (int(s) for s in args.sizes.split(",")):
                runs = []
                for _ in range(args.repeats):
                    cmd = [sys.executable, __file__, "--child", str(path), str(size)]
                    cmd += ["--channels", str(args.channels), "--threads", str(args.threads)]
                    done = subprocess.run(cmd, capture_output=True, text=True)
                    if done.returncode:
                        raise SystemExit(f"{graph} at {size}^3 failed: {done.stderr.strip().splitlines()[-1:]}")
                    runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
                peak = statistics.median(r["peak_mib"] for r in runs)
                before = statistics.median(r["rss_before_mib"] for r in runs)
                secs = statistics.median(r["seconds"] for r in runs)
                print(f"| {graph} | {size}^3 | {args.channels} | {peak:.0f} | {before:.0f} | {secs:.1f} |", flush=True)


if __name__ == "__main__":
    main()
