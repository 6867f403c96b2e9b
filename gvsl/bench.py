"""Benchmarks behind ``gvsl bench`` and ``benchmarks/{inference,preprocess}.py``.

Three measurements, each side by side in one process so that ratios hold on a
shared, noisy machine (every round runs every variant once; medians of rounds):

* **inference** (:func:`bench_inference`): the encoder or the registration
  network on every backend available here — torch eager fp32 (the official
  code's path and the baseline of every ratio), torch bf16/fp16 autocast with
  ``channels_last_3d``, ``torch.compile``, CUDA graphs, the runtime's ONNX
  Runtime CPU path (fp32, and the opt-in int8 mode), ONNX Runtime CUDA /
  TensorRT execution providers and native TensorRT fp16/bf16 — at batch 1 and
  8: latency (median and quartiles), samples/s, achieved TFLOP/s, the ratio to
  torch eager and the cosine of each output to torch eager fp32; peak host and
  device memory come from a fresh child process per case;
* **training** (:func:`bench_train`): an official-style step (batch 1, fp32,
  Models Genesis damage in NumPy on the host, as the authors' loader does)
  against gvsl's step (batched augmentation on the device, autocast,
  channels-last, optional ``torch.compile``), in samples/s;
* **preprocessing** (:func:`bench_preprocess`): reading, reorienting,
  resampling to 1 mm and normalising a CT-sized NIfTI against SimpleITK's
  linear resampling of the same volume.

torch is imported only by the torch backends and the training benchmark, so a
machine with only ONNX Runtime / TensorRT can still bench those (give
``model`` as an export folder).
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np

__all__ = [
    "BASELINE",
    "INFERENCE_BACKENDS",
    "BenchSetup",
    "bench_inference",
    "bench_preprocess",
    "bench_train",
    "machine_info",
    "markdown_tables",
    "model_flops",
    "random_model_export",
    "smooth_ct_cube",
    "summarize",
]

#: The reference of every ratio: the official code's path.
BASELINE = "torch"

#: name -> (device, what it is). "device" backends keep inputs and outputs on the GPU
#: (I/O binding / engine buffers); "host" ones take and return numpy arrays.
INFERENCE_BACKENDS: dict[str, tuple[str, str]] = {
    "torch": ("any", "torch eager fp32, NCDHW (official path)"),
    "torch-bf16": ("any", "torch autocast bf16 + channels_last_3d"),
    "torch-fp16": ("cuda", "torch autocast fp16 + channels_last_3d"),
    "torch-compile": ("any", "torch.compile, autocast bf16 + channels_last_3d"),
    "torch-cudagraph": ("cuda", "autocast bf16 + channels_last_3d, replayed as a CUDA graph"),
    "onnxruntime": ("cpu", "runtime default CPU path: ONNX Runtime fp32 (numpy in/out)"),
    "onnxruntime-int8": ("cpu", "ONNX Runtime int8 QDQ, opt-in (calibrated on real volumes)"),
    "ort-cuda": ("cuda", "ONNX Runtime CUDA EP fp32, I/O binding"),
    "ort-cuda-fp16": ("cuda", "ONNX Runtime CUDA EP on the fp16 graph, I/O binding"),
    "ort-tensorrt": ("cuda", "ONNX Runtime TensorRT EP fp16, I/O binding"),
    "tensorrt-fp16": ("cuda", "native TensorRT fp16 engine (runtime TensorRTBackend), device buffers"),
    "tensorrt-bf16": ("cuda", "native TensorRT bf16 engine (runtime TensorRTBackend), device buffers"),
}
#: Run by ``--backend all`` on a CPU: torch.compile on a CPU takes minutes to compile 3-D U-Nets.
CPU_DEFAULT = ("torch", "torch-bf16", "onnxruntime", "onnxruntime-int8")
GPU_DEFAULT = (
    "torch", "torch-bf16", "torch-fp16", "torch-compile", "torch-cudagraph",
    "ort-cuda", "ort-cuda-fp16", "ort-tensorrt", "tensorrt-fp16", "tensorrt-bf16",
)  # fmt: skip


class Unavailable(Exception):
    """A backend this machine cannot run (missing package or device); reported, not raised."""


# ----------------------------------------------------------------------------- machine & statistics
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


def _peak_rss_mb() -> float:
    """This process's peak resident memory. ``VmHWM`` first: Linux carries ``ru_maxrss``
    over from the parent through fork + exec, so a child would report its parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ----------------------------------------------------------------------------- FLOPs
def _conv(cin: int, cout: int, k: int, voxels: int) -> int:
    return 2 * cin * cout * k**3 * voxels  # PyTorch's counter: 2 x MACs, bias not counted


def _double_conv(cin: int, cout: int, voxels: int) -> int:
    return _conv(cin, cout, 3, voxels) + _conv(cout, cout, 3, voxels)


def _unet_flops(w: Sequence[int], cin: int, n: int) -> int:
    """Convolutions of the U-Net at ``n`` voxels (full resolution)."""
    total = _double_conv(cin, w[0], n)
    for level in range(1, 5):
        total += _double_conv(w[level - 1], w[level], n // 8**level)
    up_in = [w[4] + w[3], w[5] + w[2], w[6] + w[1], w[7] + w[0]]
    for i, level in enumerate((3, 2, 1, 0)):
        total += _double_conv(up_in[i], w[5 + i], n // 8**level)
    return total


def model_flops(model: dict[str, Any], kind: str, batch: int, spatial: Sequence[int]) -> int:
    """FLOPs of one call, counted like PyTorch's ``FlopCounterMode``: convolutions,
    linear layers and matrix products (2 x multiply-accumulates); sampling, norms
    and pooling are not counted. ``model`` is a ModelConfig dict."""
    w = [int(x) for x in model["widths"]]
    cin = int(model.get("in_channels", 1))
    n = int(np.prod([int(s) for s in spatial]))
    enc = _unet_flops(w, cin, n)
    if kind == "encoder":
        return batch * enc
    aw, dw = int(model.get("affine_width", 256)), int(model.get("deform_width", 16))
    head = _double_conv(2 * w[4], aw, n // 8**4) + 2 * aw * (3 + 3 + 3 + 6)
    head += _double_conv(2 * w[8], dw, n) + _conv(dw, 3, 3, n)
    head += 2 * 18 * n  # sampling positions: two [n, 3] x [3, 3] products (feature warp, fused field)
    return batch * (2 * enc + head)


# ----------------------------------------------------------------------------- inputs and models
def _real_volumes() -> dict[str, Path]:
    """nilearn's MNI templates (real anatomy, shipped with the package) when installed."""
    spec = importlib.util.find_spec("nilearn")  # located, not imported: nilearn pulls in sklearn
    if spec is None or not spec.submodule_search_locations:
        return {}
    base = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    out = {}
    for kind in ("t1", "gm", "wm"):
        p = base / f"mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz"
        if p.is_file():
            out[kind] = p
    return out


def _synthetic_volume(shape: Sequence[int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Smooth random 'anatomy' on a 1 mm grid when no real volume is at hand."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    x = ndimage.gaussian_filter(rng.normal(size=tuple(shape)).astype(np.float32), 3)
    return (x - x.min()) / (np.ptp(x) + 1e-6) * 200.0, np.eye(4)


def _windows(vol: np.ndarray, size: int, count: int, seed: int) -> list[np.ndarray]:
    """``count`` crops of ``size``^3 (zero-padded where the volume is smaller)."""
    rng = np.random.default_rng(seed)
    pad = [(0, max(0, size - s)) for s in vol.shape]
    v = np.pad(vol, pad) if any(p[1] for p in pad) else vol
    out = []
    for _ in range(count):
        o = [int(rng.integers(0, s - size + 1)) for s in v.shape]
        out.append(np.ascontiguousarray(v[o[0] : o[0] + size, o[1] : o[1] + size, o[2] : o[2] + size]))
    return out


@dataclass
class BenchSetup:
    """The model under test, its exports and the inputs, shared by every backend.

    ``model`` is a trained model folder / ``.safetensors`` / official ``.pth``
    (torch; ONNX exported into ``workdir`` on demand) or an export folder (ONNX
    only: no torch backends, so no torch ratio). Without ``model`` a randomly
    initialised GVSL of ``widths`` is used: speed does not depend on weights.
    """

    model: str | None = None
    widths: str = "default"
    device: str = "cpu"
    patch: int = 128
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="gvsl-bench-")))
    calibration: tuple[str, ...] = ()
    eval_volumes: tuple[str, ...] = ()
    threads: int = 0
    log: Callable[[str], None] = print
    _torch_model: Any = None
    _model_dir: Path | None = None
    _export_dir: Path | None = None
    _export_fp16: bool = False
    _info: dict[str, Any] | None = None

    # -- the model -------------------------------------------------------------
    def model_dir(self) -> Path:
        """A torch model (folder or file); made from random weights when none is given."""
        if self._model_dir is None:
            if self.model and self._is_export(Path(self.model)):
                raise Unavailable("the model is an ONNX export: torch backends need the trained model")
            if self.model:
                self._model_dir = Path(self.model)
            else:
                import torch

                from gvsl.config import ModelConfig
                from gvsl.io import save_model
                from gvsl.model import GVSL
                from gvsl.runtime.preprocess import PreprocessConfig

                torch.manual_seed(0)
                cfg = ModelConfig.from_preset(self.widths)
                # MR normalisation: the bundled real volumes are MR templates
                pre = PreprocessConfig(spacing=(1.0, 1.0, 1.0), modality="mr")
                self._model_dir = save_model(
                    GVSL(cfg), self.workdir / "model", preprocess=pre.to_dict(), extra={"patch_size": [self.patch] * 3}
                )
        return self._model_dir

    @staticmethod
    def _is_export(p: Path) -> bool:
        return p.suffix == ".onnx" or (p.is_dir() and (p / "encoder.onnx").is_file())

    def export_dir(self, fp16: bool = False) -> Path:
        """ONNX graphs of the model (``gvsl export``, fp32 + fp16 when asked)."""
        if self.model and self._is_export(Path(self.model)):
            p = Path(self.model)
            return p if p.is_dir() else p.parent
        if self._export_dir is None or (fp16 and not self._export_fp16):
            from gvsl.export.pipeline import ExportOptions, run_export

            out = self.workdir / ("export_fp16" if fp16 else "export")
            precisions = ("fp32", "fp16") if fp16 else ("fp32",)
            self.log(f"exporting ONNX ({', '.join(precisions)}) to {out}")
            run_export(self.model_dir(), out, ExportOptions(precisions=precisions, verify=False, force=True))
            self._export_dir, self._export_fp16 = out, fp16
        return self._export_dir

    def info(self) -> dict[str, Any]:
        """ModelConfig dict, preprocessing and patch, from whichever form the model has."""
        if self._info is None:
            if self._export_dir is not None or (self.model and self._is_export(Path(self.model))):
                from gvsl.runtime.backends import load_backend  # ONNX metadata: no torch import

                b = load_backend(self.export_dir(), "encoder", "onnxruntime", "cpu")
                self._info = {"model": b.info.model, "preprocess": b.info.preprocess, "patch": b.info.patch_size}
                b.close()
            else:
                model, meta = self._cpu_model()
                from gvsl.runtime.preprocess import PreprocessConfig

                patch = tuple(meta.get("patch_size") or (self.patch,) * 3)
                pre = PreprocessConfig.from_dict(meta.get("preprocess") or {})
                self._info = {"model": model.config.to_dict(), "preprocess": pre, "patch": patch}
        return self._info

    def _cpu_model(self) -> tuple[Any, dict[str, Any]]:
        if self._torch_model is None:
            import torch

            from gvsl.io import load_model

            model, self._meta = load_model(self.model_dir(), map_location="cpu")
            self._torch_model = model.eval()
            if self.threads:
                torch.set_num_threads(self.threads)
        return self._torch_model, self._meta

    def torch_model(self) -> Any:
        """The fp32 eval model on the bench device (loaded once)."""
        model, _ = self._cpu_model()
        dev = self.torch_device()
        if next(model.parameters()).device != dev:
            self._torch_model = model.to(dev)
        return self._torch_model

    def torch_device(self) -> Any:
        import torch

        dev = "cuda" if self.device.startswith("cuda") else "cpu"
        if dev == "cuda" and not torch.cuda.is_available():
            raise Unavailable("torch sees no CUDA GPU")
        return torch.device(self.device if dev == "cuda" else "cpu")

    # -- inputs ----------------------------------------------------------------
    def _preprocessed(self, paths: Sequence[str | Path]) -> list[np.ndarray]:
        from gvsl.runtime.preprocess import load_volume, preprocess

        pre = self.info()["preprocess"]
        return [preprocess(load_volume(p), pre).data for p in paths]

    def inputs(self, kind: str, batch: int, size: int) -> list[np.ndarray]:
        """Network inputs: crops of real volumes (held out from int8 calibration), or of
        synthetic ones when none is available. Registration: (fixed, shifted moving)."""
        vols = self._preprocessed(self.eval_volumes or [v for k, v in _real_volumes().items() if k != "t1"])
        if not vols:
            vols = [_synthetic_volume((size + 32,) * 3, 0)[0] / 200.0]
        crops = []
        for i in range(batch):
            crops += _windows(vols[i % len(vols)], size, 1, seed=1000 * size + i)
        x = np.stack(crops)[:, None].astype(np.float32)
        if kind == "encoder":
            return [x]
        return [x, np.ascontiguousarray(np.roll(x, (3, -2, 2), axis=(2, 3, 4)))]

    def calibration_volumes(self) -> list[Any]:
        """Volumes for int8 calibration: ``calibration`` or nilearn's MNI T1 template."""
        if self.calibration:
            return list(self.calibration)
        t1 = _real_volumes().get("t1")
        if t1 is None:
            raise Unavailable("int8 needs calibration volumes (--int8-calibration) or nilearn's MNI template")
        return [str(t1)]


# ----------------------------------------------------------------------------- runners
@dataclass
class Runner:
    """One backend ready to run one batch: ``run()`` is timed (it synchronises the
    device); ``result()`` returns the main output as numpy for the fidelity check."""

    name: str
    device: str
    precision: str
    io: str
    run: Callable[[], Any]
    result: Callable[[], np.ndarray]
    close: Callable[[], None] = lambda: None


def _main_output(kind: str) -> str:
    return "embedding" if kind == "encoder" else "dvf"


def _torch_runner(setup: BenchSetup, name: str, kind: str, xs: list[np.ndarray]) -> Runner:
    try:
        import torch
    except ImportError:
        raise Unavailable("torch is not installed") from None
    dev = setup.torch_device()
    cuda = dev.type == "cuda"
    if name in ("torch-fp16", "torch-cudagraph") and not cuda:
        raise Unavailable("needs a CUDA GPU")
    half = {"torch-fp16": torch.float16}.get(name, torch.bfloat16)
    amp = name != "torch"
    channels_last = name != "torch"
    model = setup.torch_model()
    if channels_last:  # a copy: the baseline keeps its NCDHW weights
        model = copy.deepcopy(model).to(memory_format=torch.channels_last_3d)
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    inputs = [torch.from_numpy(x).to(dev).contiguous(memory_format=fmt) for x in xs]

    # autocast's weight-cast cache must not outlive a CUDA graph capture (PyTorch's advice)
    cache = name != "torch-cudagraph"

    def forward(*t: Any) -> Any:
        with torch.autocast(dev.type, dtype=half, enabled=amp, cache_enabled=cache):
            if kind == "encoder":
                fg, fl = model.encode(t[0])
                return fg.float().mean(dim=(2, 3, 4)), fl
            return model.register(t[0], t[1])[1]

    fn = torch.compile(forward) if name == "torch-compile" else forward
    sync = (lambda: torch.cuda.synchronize(dev)) if cuda else (lambda: None)
    out: dict[str, Any] = {}
    # cuDNN autotuning for the fast paths only; the baseline keeps the official code's default
    tune = name != "torch"

    def call() -> None:
        torch.backends.cudnn.benchmark = tune
        with torch.inference_mode():
            out["y"] = fn(*inputs)
        sync()

    run = call
    if name == "torch-cudagraph":
        torch.backends.cudnn.benchmark = True
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(3):
                forward(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph):
            out["y"] = forward(*inputs)

        def replay() -> None:
            graph.replay()
            sync()

        run = replay

    def result() -> np.ndarray:
        run()
        y = out["y"][0] if kind == "encoder" else out["y"]
        return y.float().cpu().numpy()

    precision = "fp32" if not amp else ("fp16" if half == torch.float16 else "bf16")
    return Runner(name, dev.type, precision, "device" if cuda else "host", run, result)


def _ort_host_runner(setup: BenchSetup, name: str, kind: str, xs: list[np.ndarray]) -> Runner:
    """The runtime's own backend object, numpy in and out: what ``gvsl embed`` runs."""
    if importlib.util.find_spec("onnxruntime") is None:
        raise Unavailable("onnxruntime is not installed")
    from gvsl.runtime.backends import load_backend

    opts: dict[str, Any] = {"threads": setup.threads}
    if name == "onnxruntime-int8":
        if kind != "encoder":
            raise Unavailable("int8 is offered for the encoder only")
        opts["int8_calibration"] = setup.calibration_volumes()
        opts["cache_dir"] = setup.workdir / "cache"
    backend = load_backend(setup.export_dir(), kind, "onnxruntime", "cpu", **opts)
    names = backend.input_names
    feed = dict(zip(names, xs, strict=True))
    want = [_main_output(kind)] + (["features"] if kind == "encoder" and "features" in backend.output_names else [])
    out: dict[str, Any] = {}

    def run() -> None:
        out["y"] = backend.run(feed, want)

    def result() -> np.ndarray:
        run()
        return out["y"][_main_output(kind)]

    precision = backend.info.precision
    return Runner(name, "cpu", precision, "host", run, result, backend.close)


def _ort_cuda_runner(setup: BenchSetup, name: str, kind: str, xs: list[np.ndarray]) -> Runner:
    """ONNX Runtime on the GPU with I/O binding: inputs bound from torch CUDA tensors,
    outputs left on the device, so only the graph's own work is timed."""
    try:
        import onnxruntime as ort
        import torch
    except ImportError:
        raise Unavailable("needs onnxruntime-gpu and torch") from None
    if not torch.cuda.is_available():
        raise Unavailable("needs a CUDA GPU")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise Unavailable("this onnxruntime has no CUDA execution provider (pip install onnxruntime-gpu)")
    trt = name == "ort-tensorrt"
    if trt and "TensorrtExecutionProvider" not in ort.get_available_providers():
        raise Unavailable("this onnxruntime has no TensorRT execution provider")
    from gvsl.runtime.backends import load_backend

    fp16 = name in ("ort-cuda-fp16", "ort-tensorrt")
    folder = setup.export_dir(fp16=fp16)
    path = folder / (f"{kind}.fp16.onnx" if fp16 else f"{kind}.onnx")
    size = xs[0].shape[2:]
    backend = load_backend(
        path, kind, "onnxruntime", setup.device, trt_ep=trt, max_batch=xs[0].shape[0], max_shape=size,
        cache_dir=setup.workdir / "cache",
    )  # fmt: skip
    want = "TensorrtExecutionProvider" if trt else "CUDAExecutionProvider"
    if backend.providers[0] != want:
        raise Unavailable(f"ONNX Runtime fell back to {backend.providers[0]}")
    sess = backend.session
    dev_id = torch.device(setup.device if ":" in setup.device else "cuda:0").index or 0
    tensors = [torch.from_numpy(x).cuda(dev_id) for x in xs]
    binding = sess.io_binding()
    for n, t in zip(backend.input_names, tensors, strict=True):
        binding.bind_input(n, "cuda", dev_id, np.float32, tuple(t.shape), t.data_ptr())
    for n in backend.output_names:
        binding.bind_output(n, "cuda", dev_id)

    def run() -> None:
        sess.run_with_iobinding(binding)
        binding.synchronize_outputs()

    def result() -> np.ndarray:
        run()
        outs = dict(zip(backend.output_names, binding.copy_outputs_to_cpu(), strict=True))
        return np.asarray(outs[_main_output(kind)], dtype=np.float32)

    return Runner(name, "cuda", "fp16" if fp16 else "fp32", "device", run, result, backend.close)


def _tensorrt_runner(setup: BenchSetup, name: str, kind: str, xs: list[np.ndarray]) -> Runner:
    """A native TensorRT engine built (and cached) by the runtime's TensorRTBackend from
    the fp32 graph with the fp16 / bf16 builder flag; executed on torch CUDA buffers."""
    if importlib.util.find_spec("tensorrt") is None:
        raise Unavailable("TensorRT is not installed (pip install tensorrt; gvsl[gpu])")
    try:
        import torch
    except ImportError:
        raise Unavailable("the device-buffer runner needs torch") from None
    if not torch.cuda.is_available():
        raise Unavailable("needs a CUDA GPU")
    from gvsl.runtime.backends import TensorRTBackend

    precision = name.split("-", 1)[1]
    folder = setup.export_dir()
    size = xs[0].shape[2:]
    backend = TensorRTBackend(
        folder / f"{kind}.onnx", kind, setup.device, cache_dir=setup.workdir / "cache", max_batch=xs[0].shape[0],
        max_shape=size, max_contexts=1, trt_precision=precision,
    )  # fmt: skip
    trt, engine = backend.trt, backend.engine
    stream = torch.cuda.Stream()
    ctx = engine.create_execution_context()
    ctx.set_optimization_profile_async(0, stream.cuda_stream)
    keep = []
    for n, x in zip(backend.input_names, xs, strict=True):
        t = torch.from_numpy(x).cuda()
        keep.append(t)
        ctx.set_input_shape(n, tuple(t.shape))
        ctx.set_tensor_address(n, t.data_ptr())
    outs = {}
    for n in backend.output_names:
        dtype = torch.from_numpy(np.empty(0, dtype=trt.nptype(engine.get_tensor_dtype(n)))).dtype
        outs[n] = torch.empty(tuple(ctx.get_tensor_shape(n)), dtype=dtype, device="cuda")
        ctx.set_tensor_address(n, outs[n].data_ptr())

    def run() -> None:
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        stream.synchronize()

    def result() -> np.ndarray:
        run()
        return outs[_main_output(kind)].float().cpu().numpy()

    return Runner(name, "cuda", precision, "device", run, result, backend.close)


def make_runner(setup: BenchSetup, name: str, kind: str, xs: list[np.ndarray]) -> Runner:
    """The runner for backend ``name``; raises :class:`Unavailable` with the reason."""
    if name not in INFERENCE_BACKENDS:
        raise Unavailable(f"unknown backend {name!r}; choose from {', '.join(INFERENCE_BACKENDS)}")
    where = INFERENCE_BACKENDS[name][0]
    on_gpu = setup.device.startswith("cuda")
    if where == "cuda" and not on_gpu:
        raise Unavailable("GPU backend (use --device cuda on a CUDA machine)")
    if where == "cpu" and on_gpu:
        raise Unavailable("CPU backend (use --device cpu)")
    if name.startswith("torch"):
        return _torch_runner(setup, name, kind, xs)
    if name in ("onnxruntime", "onnxruntime-int8"):
        return _ort_host_runner(setup, name, kind, xs)
    if name.startswith("ort-"):
        return _ort_cuda_runner(setup, name, kind, xs)
    return _tensorrt_runner(setup, name, kind, xs)


# ----------------------------------------------------------------------------- memory probe
def _device_peak_mb(pid: int) -> float | None:
    """GPU memory this process holds per nvidia-smi (covers ORT / TensorRT allocations)."""
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


def _probe(args: dict[str, Any]) -> dict[str, Any]:
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
        peaks = [_device_peak_mb(os.getpid())]
        if torch is not None:
            peaks.append(torch.cuda.max_memory_allocated() / 2**20)
        dev = max((p for p in peaks if p is not None), default=None)
    return {"peak_host_mb": _peak_rss_mb(), "peak_device_mb": dev}


def _run_probe(setup: BenchSetup, backend: str, kind: str, batch: int, size: int, timeout: float) -> dict[str, Any]:
    args = {
        "model": setup.model or str(setup.model_dir()),
        "device": setup.device, "workdir": str(setup.workdir), "patch": setup.patch,
        "calibration": list(map(str, setup.calibration)), "eval_volumes": list(map(str, setup.eval_volumes)),
        "threads": setup.threads, "kind": kind, "batch": batch, "size": size, "backend": backend,
        "export_dir": str(setup._export_dir) if setup._export_dir else None, "export_fp16": setup._export_fp16,
    }  # fmt: skip
    cmd = [sys.executable, "-m", "gvsl.bench", "--probe", json.dumps(args)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"memory_error": f"probe timed out after {timeout:.0f} s"}
    if res.returncode != 0:
        tail = (res.stderr.strip().splitlines() or ["no output"])[-1]
        return {"memory_error": tail[:200]}
    return json.loads(res.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- inference benchmark
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
                            rec.update(_run_probe(setup, b, kind, batch, size, timeout))
                for b in backends:
                    records.append(recs[b])
                    if on_record:
                        on_record(recs[b])
                if setup.device.startswith("cuda") and "torch" in sys.modules:
                    sys.modules["torch"].cuda.empty_cache()
    return records


# ----------------------------------------------------------------------------- training benchmark
def _official_appearance() -> Callable[[np.ndarray, np.random.Generator], np.ndarray]:
    """The NumPy re-implementation of the authors' Models Genesis damage kept in
    ``benchmarks/train_step.py`` (source checkouts only)."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "train_step.py"
    if not path.is_file():
        raise Unavailable(f"{path} not found: the official-style reference needs a gvsl source checkout")
    spec = importlib.util.spec_from_file_location("_gvsl_train_step", path)
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod.official_appearance


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
    """Training samples/s: official-style step vs gvsl's step, interleaved.

    official-style: batch 1, fp32, NCDHW; x1's Models Genesis damage in NumPy on
    the host (the authors' loader), spatial augmentation on the device (cheaper
    than the authors' host version, so the ratio is conservative). gvsl:
    :func:`gvsl.train.make_train_step` (what ``gvsl train`` runs) at ``batch``
    with augmentation on the device, autocast (bf16 on GPUs that have it; fp32
    on CPUs, as ``gvsl train``), channels-last and optionally ``torch.compile``.
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


def _train_case(
    base: dict[str, Any], dev: Any, size: int, widths: str, batch: int, repeats: int, warmup: int,
    compile: bool, channels_last: bool, amp: bool,
) -> list[dict[str, Any]]:  # fmt: skip
    import torch

    from gvsl.augment import AugmentConfig, Augmenter, spatial_transform
    from gvsl.config import ModelConfig
    from gvsl.losses import GVSLLoss
    from gvsl.model import GVSL
    from gvsl.train import _amp_dtype, make_train_step

    cuda = dev.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(dev)

    cfg = ModelConfig.from_preset(widths)
    rng = np.random.default_rng(0)
    host = [rng.random((1, size, size, size), dtype=np.float32) for _ in range(2 * max(batch, 1))]
    gen = torch.Generator(device=dev).manual_seed(0)
    aug_cfg = AugmentConfig()
    steps: dict[str, tuple[Callable[[], None], int]] = {}
    notes: dict[str, dict[str, Any]] = {}
    records: list[dict[str, Any]] = []

    try:  # official-style
        damage = _official_appearance()
        torch.manual_seed(0)
        m0 = GVSL(cfg).to(dev).train()
        opt0 = torch.optim.Adam(m0.parameters(), lr=1e-4)
        loss0 = GVSLLoss()

        def official() -> None:
            a, b = host[0], host[1]
            d = damage(a.copy(), rng)
            x = torch.from_numpy(np.stack([a, d, b], 1)).to(dev)  # [1, 3, D, H, W]
            with torch.no_grad():
                x1a, x1d, x2a = spatial_transform(x, aug_cfg, gen).split(1, dim=1)
            o = m0(x1d, x2a)
            loss = loss0(x1a, o.warped, o.restored, o.local_dvf).total
            opt0.zero_grad(set_to_none=True)
            loss.backward()
            opt0.step()
            sync()

        steps["official-style"] = (official, 1)
        notes["official-style"] = {"precision": "fp32", "augmentation": "NumPy damage on host + device spatial",
                                   "channels_last": False, "compile": False}  # fmt: skip
    except Unavailable as e:
        records.append({**base, "variant": "official-style", "status": f"unavailable: {e}"})

    torch.manual_seed(0)  # gvsl's step, as `gvsl train` runs it
    m1 = GVSL(cfg).to(dev).train()
    if channels_last:
        m1 = m1.to(memory_format=torch.channels_last_3d)
    opt1 = torch.optim.Adam(m1.parameters(), lr=1e-4)
    amp_dtype = _amp_dtype(dev, amp)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    step_fn = make_train_step(m1, opt1, GVSLLoss(), Augmenter(aug_cfg), amp_dtype, scaler,
                              channels_last=channels_last, compile=compile)  # fmt: skip
    x1 = torch.from_numpy(np.concatenate(host[:batch])[:, None]).to(dev)
    x2 = torch.from_numpy(np.concatenate(host[batch : 2 * batch])[:, None]).to(dev)

    def fast() -> None:
        step_fn(x1, x2, gen)
        sync()

    name = "gvsl" + ("-compile" if compile else "")
    steps[name] = (fast, batch)
    prec = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(amp_dtype, "fp32")  # type: ignore[arg-type]
    notes[name] = {"precision": prec, "augmentation": "gvsl.augment on the device",
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
    ref = 1.0 / statistics.median(times["official-style"]) if "official-style" in times else None
    for k, (_, b) in steps.items():
        st = summarize(times[k])
        rec = {**base, "variant": k, "status": "ok", "batch": b, "step_s": st, "samples_per_s": b / st["median"],
               **notes[k]}  # fmt: skip
        if ref is not None:
            rec["x_official"] = rec["samples_per_s"] / ref
        if cuda:
            rec["peak_device_mb_all_variants"] = torch.cuda.max_memory_allocated(dev) / 2**20
        records.append(rec)
    steps.clear()
    if cuda:
        torch.cuda.empty_cache()
    return records


# ----------------------------------------------------------------------------- shared by benchmarks/*.py
def smooth_ct_cube(size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A smooth random 'CT' in HU, ``size``^3 on a 1 mm grid (the spacing of
    :func:`random_model_export`'s model, so the runtime does not resample), and its affine."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    x = ndimage.gaussian_filter(rng.normal(size=(size, size, size)).astype(np.float32), 3)
    x = (x / (x.std() + 1e-6) * 300.0).astype(np.float32)
    aff = np.eye(4)
    aff[:3, 3] = -size / 2
    return x, aff


def random_model_export(widths: str, patch: int, workdir: Path) -> tuple[Path, Path]:
    """(model folder, export folder) of a randomly initialised GVSL (seed 0; speed does not
    depend on the weights) at 1 mm CT preprocessing, exported by ``gvsl export`` unverified."""
    import torch

    from gvsl.config import ModelConfig
    from gvsl.export.pipeline import ExportOptions, run_export
    from gvsl.io import save_model
    from gvsl.model import GVSL
    from gvsl.runtime.preprocess import PreprocessConfig

    torch.manual_seed(0)
    pre = PreprocessConfig(spacing=(1.0, 1.0, 1.0), modality="ct")
    model = save_model(
        GVSL(ModelConfig.from_preset(widths)), workdir / "model", preprocess=pre.to_dict(),
        extra={"patch_size": [patch] * 3},
    )  # fmt: skip
    run_export(model, workdir / "export", ExportOptions(verify=False))
    return model, workdir / "export"


# ----------------------------------------------------------------------------- preprocessing benchmark
def _ct_volume(shape: Sequence[int], seed: int = 0) -> np.ndarray:
    """A CT-like int16 HU volume: smooth structures plus noise (content does not change
    the speed of resampling; it sets how well gzip compresses)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    coarse = rng.normal(0.0, 400.0, size=tuple(max(2, s // 8) for s in shape)).astype(np.float32)
    vol = ndimage.zoom(coarse, [s / c for s, c in zip(shape, coarse.shape, strict=True)], order=1)
    vol = vol[: shape[0], : shape[1], : shape[2]] + rng.normal(0.0, 20.0, size=tuple(shape)).astype(np.float32)
    return np.clip(vol, -1024, 3000).astype(np.int16)


def bench_preprocess(
    shape: Sequence[int] = (512, 512, 300),
    spacing: Sequence[float] = (0.7, 0.7, 1.0),
    repeats: int = 5,
    formats: Sequence[str] = ("nii", "nii.gz"),
    workdir: Path | None = None,
) -> list[dict[str, Any]]:
    """gvsl's read + RAS+ reorientation + 1 mm resampling + CT normalisation of a
    NIfTI against SimpleITK's linear resampling of the same volume, interleaved.

    The file is stored LPS like DICOM-derived NIfTIs (x and y flipped), so
    reorientation is real work. SimpleITK rows: ``Resample`` alone (image
    already in memory) and ``ReadImage`` + ``Resample``.
    """
    import nibabel as nib

    from gvsl.runtime.preprocess import (
        PreprocessConfig,
        load_preprocessed,
        load_volume,
        preprocess,
        resample,
        to_canonical,
    )

    workdir = Path(workdir or tempfile.mkdtemp(prefix="gvsl-bench-pre-"))
    workdir.mkdir(parents=True, exist_ok=True)
    data = _ct_volume(shape)
    affine = np.diag([-float(spacing[0]), -float(spacing[1]), float(spacing[2]), 1.0])
    affine[:3, 3] = (0.5 * shape[0] * spacing[0], 0.5 * shape[1] * spacing[1], -0.5 * shape[2] * spacing[2])
    files = {}
    for fmt in formats:
        files[fmt] = workdir / f"ct.{fmt}"
        nib.save(nib.Nifti1Image(data, affine), files[fmt])
    del data
    cfg = PreprocessConfig(spacing=(1.0, 1.0, 1.0), modality="ct")
    cases: dict[str, Callable[[], Any]] = {}
    for fmt, p in files.items():
        # as Embedder.prepare and the training cache read files (load_preprocessed)
        cases[f"gvsl read+reorient+resample+normalise (.{fmt})"] = lambda p=p: load_preprocessed(p, cfg)
    if "nii.gz" in files:  # the same chain with nibabel's zlib reader instead of ISA-L: what the inflate buys
        pre_mod = importlib.import_module("gvsl.runtime.preprocess")

        def zlib_chain(p: Path = files["nii.gz"]) -> Any:
            with mock.patch.object(pre_mod, "_inflate_nifti", lambda *a: None):
                return preprocess(load_volume(p, keep_dtype=True), cfg)

        def isal_chain(p: Path = files["nii.gz"]) -> Any:
            with mock.patch.object(pre_mod, "_stream_preprocess", lambda *a: None):
                return load_preprocessed(p, cfg)

        cases["gvsl read+reorient+resample+normalise (.nii.gz, ISA-L, no overlap)"] = isal_chain
        cases["gvsl read+reorient+resample+normalise (.nii.gz, zlib inflate)"] = zlib_chain
    canon = to_canonical(load_volume(files[formats[0]]))
    cases["gvsl resample only (in memory)"] = lambda: resample(canon, 1.0)
    sitk_note = None
    if importlib.util.find_spec("SimpleITK") is not None:
        import SimpleITK as sitk

        def sitk_resample(img: Any) -> Any:
            sp, sz = img.GetSpacing(), img.GetSize()
            new = [int(round(s * p)) for s, p in zip(sz, sp, strict=True)]
            return sitk.Resample(img, new, sitk.Transform(), sitk.sitkLinear, img.GetOrigin(), (1.0, 1.0, 1.0),
                                 img.GetDirection(), 0.0, sitk.sitkFloat32)  # fmt: skip

        img = sitk.ReadImage(str(files[formats[0]]), sitk.sitkFloat32)
        cases["SimpleITK Resample, linear (in memory)"] = lambda: sitk_resample(img)
        for fmt, p in files.items():
            cases[f"SimpleITK ReadImage+Resample (.{fmt})"] = lambda p=p: sitk_resample(
                sitk.ReadImage(str(p), sitk.sitkFloat32)
            )
        sitk_note = f"SimpleITK threads: {sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()}"
    times: dict[str, list[float]] = {k: [] for k in cases}
    for fn in cases.values():  # warm the page cache and the code paths
        fn()
    names = list(cases)
    for r in range(repeats):
        # rotate the order each round: no case always runs right after the same other one
        for k in names[r % len(names) :] + names[: r % len(names)]:
            t = time.perf_counter()
            cases[k]()
            times[k].append(time.perf_counter() - t)
    ref_key = "SimpleITK Resample, linear (in memory)"
    ref = statistics.median(times[ref_key]) if ref_key in times else None
    out = []
    for k in cases:
        st = summarize(times[k])
        rec = {"kind": "preprocess", "case": k, "shape": list(shape), "spacing": list(spacing), "time_s": st}
        if ref is not None:
            rec["x_sitk_resample"] = st["median"] / ref
        # the like-for-like peer: SimpleITK reading the same file and resampling it
        fmt = "nii.gz" if ".nii.gz" in k else "nii" if ".nii)" in k else None
        peer = f"SimpleITK ReadImage+Resample (.{fmt})"
        if fmt and peer in times:
            rec["x_sitk_read_resample"] = st["median"] / statistics.median(times[peer])
        if sitk_note:
            rec["note"] = sitk_note
        out.append(rec)
    for p in files.values():
        p.unlink(missing_ok=True)
    return out


# ----------------------------------------------------------------------------- tables
def _ms(st: dict[str, float]) -> str:
    return f"{1000 * st['median']:.1f} ({1000 * st['p25']:.1f}–{1000 * st['p75']:.1f})"


def _s(st: dict[str, float]) -> str:
    return f"{st['median']:.3f} ({st['p25']:.3f}–{st['p75']:.3f})"


def _num(v: Any, fmt: str) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def inference_rows(records: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    head = ["kind", "size", "batch", "backend", "precision", "latency ms, median (IQR)", "samples/s", "TFLOP/s",
            "× torch eager", "cosine to fp32", "peak host MB", "peak device MB"]  # fmt: skip
    rows = []
    for r in records:
        base = [r["kind"], f"{r['size']}³", str(r["batch"]), r["backend"]]
        if r.get("status") != "ok":
            rows.append(base + [r.get("status", "?")] + [""] * (len(head) - 5))
            continue
        rows.append(base + [
            r["precision"], _ms(r["latency_s"]), _num(r["samples_per_s"], ".2f"), _num(r["tflops"], ".3f"),
            _num(r.get("x_baseline"), ".2f"), _num(r.get("cosine_to_fp32"), ".5f"),
            _num(r.get("peak_host_mb"), ".0f"), _num(r.get("peak_device_mb"), ".0f"),
        ])  # fmt: skip
    return head, rows


def train_rows(records: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    head = ["size", "widths", "device", "variant", "batch", "precision", "channels-last", "compile",
            "step s, median (IQR)", "samples/s", "× official-style"]  # fmt: skip
    rows = []
    for r in records:
        base = [f"{r['size']}³", r["widths"], r["device"], r.get("variant", "")]
        if r.get("status") != "ok":
            rows.append(base + [r.get("status", "?")] + [""] * (len(head) - 5))
            continue
        rows.append(base + [
            str(r["batch"]), r["precision"], "yes" if r["channels_last"] else "no", "yes" if r["compile"] else "no",
            _s(r["step_s"]), _num(r["samples_per_s"], ".3f"), _num(r.get("x_official"), ".2f"),
        ])  # fmt: skip
    return head, rows


def preprocess_rows(records: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    head = ["case", "seconds, median (IQR)", "÷ SimpleITK Resample", "÷ SimpleITK ReadImage+Resample, same file"]
    return head, [
        [r["case"], _s(r["time_s"]), _num(r.get("x_sitk_resample"), ".2f"), _num(r.get("x_sitk_read_resample"), ".2f")]
        for r in records
    ]


def _md(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def markdown_tables(result: dict[str, Any]) -> str:
    """The result as Markdown tables (for BENCHMARKS.md)."""
    parts = []
    for key, fn in (("inference", inference_rows), ("train", train_rows), ("preprocess", preprocess_rows)):
        if result.get(key):
            parts.append(_md(*fn(result[key])))
    return "\n\n".join(parts) + "\n"


def _probe_main() -> None:
    args = json.loads(sys.argv[sys.argv.index("--probe") + 1])
    print(json.dumps(_probe(args)))


if __name__ == "__main__":
    _probe_main()
