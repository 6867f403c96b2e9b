"""One runner per inference backend: the model ready to run one batch, timed the same way.

Each runner hides how its backend takes inputs (numpy arrays on the host,
torch tensors bound on the GPU, TensorRT engine buffers) behind ``run()``,
which synchronises the device, so :func:`gvsl.cli.bench.inference.bench_inference`
times every backend alike. :data:`INFERENCE_BACKENDS` names them.
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from gvsl.cli.bench.machine import Unavailable
from gvsl.cli.bench.workload import BenchSetup

__all__ = ["BASELINE", "CPU_DEFAULT", "GPU_DEFAULT", "INFERENCE_BACKENDS", "Runner", "make_runner"]

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
