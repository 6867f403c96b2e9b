"""The machine the numbers are measured on, and the statistics of repeated timings.

Every benchmark record carries :func:`machine_info` (CPU, cores, load, GPUs,
library versions), so a number in BENCHMARKS.md can be traced to the hardware
it came from; :func:`summarize` is the one place medians and quartiles are taken.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["Unavailable", "device_peak_mb", "machine_info", "peak_rss_mb", "summarize"]


class Unavailable(Exception):
    """A backend this machine cannot run (missing package or device); reported, not raised."""


def _version(mod: str) -> str | None:
    if importlib.util.find_spec(mod) is None:
        return None
    try:
        from importlib.metadata import version

        names = {"onnxruntime": ("onnxruntime", "onnxruntime-gpu"), "SimpleITK": ("SimpleITK", "simpleitk")}
        for dist in names.get(mod, (mod,)):
            try:
                return version(dist)
            except Exception:
                continue
    except Exception:
        pass
    return "installed"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16") if f in have]
    except OSError:
        pass
    return []


def _gpu_names() -> list[str]:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=False,
        )  # fmt: skip
        return [line.strip() for line in out.stdout.splitlines() if line.strip()]
    except (OSError, subprocess.SubprocessError):
        return []


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, load, GPUs, library versions."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    info: dict[str, Any] = {
        "cpu": _cpu_name(),
        "cpu_flags": _cpu_flags(),
        "cores": cores,
        "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "gpus": _gpu_names(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    for mod in ("gvsl", "numpy", "scipy", "nibabel", "torch", "onnxruntime", "onnx", "tensorrt", "SimpleITK"):
        info[mod] = _version(mod)
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.version.cuda
    if "onnxruntime" in sys.modules:
        info["ort_providers"] = sys.modules["onnxruntime"].get_available_providers()
    return info


def summarize(times: Sequence[float]) -> dict[str, float]:
    """Median and spread of repeated timings (seconds): quartiles, min, max, count."""
    t = sorted(float(x) for x in times)
    if not t:
        return {"n": 0}
    q = statistics.quantiles(t, n=4, method="inclusive") if len(t) > 1 else [t[0]] * 3
    return {"median": statistics.median(t), "p25": q[0], "p75": q[2], "min": t[0], "max": t[-1], "n": len(t)}


def peak_rss_mb() -> float:
    """This process's peak resident memory. ``VmHWM`` first: Linux carries ``ru_maxrss``
    over from the parent through fork + exec, so a child would report its parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def device_peak_mb(pid: int) -> float | None:
    """GPU memory process ``pid`` holds per nvidia-smi (covers ONNX Runtime / TensorRT allocations)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=20, check=False,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.stdout.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0] == str(pid):
            try:
                return float(parts[1])
            except ValueError:
                return None
    return None
