"""Native TensorRT 10 backend (named-tensor API, ``execute_async_v3``).

Two ways to get an engine:

* from the ONNX graph: built once with the shared builder
  (:mod:`.engine_builder`) and cached on disk, keyed by the file, TensorRT
  version, GPU, profiles and precision; it gets one identical optimisation
  profile per pooled context;
* an ``.engine`` written by ``gvsl export --format engine`` (the file, or an
  export folder that holds engines but no ONNX): its manifest entry must name
  this machine's TensorRT version and GPU compute capability, else one line
  says so. Its profiles are export's; the pool has one context per profile.

A pool of execution contexts (one per concurrent caller, up to
``max_contexts``), each with its own CUDA stream, device buffers and pinned
host buffers that are reused (grown, never shrunk) between calls. A context
that cannot be created gives its pool place back; ``close`` waits for calls in
flight before it frees anything.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import GvslInputError
from ..io import atomic_write
from .base import (
    GRAPH_IO,
    Backend,
    ModelInfo,
    cache_folder,
    check_device,
    contract_inputs,
    device_index,
    file_sha256,
    input_profile,
    shape_str,
)
from .cuda import CudaRuntime, host_view
from .engine_builder import build_serialized_engine, require_tensorrt
from .model_files import info_from_manifest, info_from_metadata, manifest_engines, read_manifest, read_onnx_metadata
from .registry import register_backend

#: bumped when the builder's rules change, so engines cached by an older rule are rebuilt
_BUILDER_RULES = 2


@dataclass
class _Slot:
    """One execution context with its profile, stream and reusable buffers."""

    context: Any
    profile: int
    stream: int
    device: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (ptr, capacity bytes)
    host: dict[str, tuple[int, int]] = field(default_factory=dict)  # pinned; name -> (ptr, capacity bytes)


def _gpu_name(index: int) -> str:
    """GPU identity for the engine cache key (engines are not portable across GPUs)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--id={index}", "--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"gpu{index}"


class TensorRTBackend(Backend):
    """Native TensorRT 10: an engine built from the ONNX graph (cached) or exported by ``gvsl
    export``, a pool of execution contexts, device and pinned host buffers reused between calls."""

    def __init__(
        self,
        path: str | Path,
        kind: str,
        device: str = "auto",
        *,
        cache_dir: str | Path | None = None,
        max_shape: Sequence[int] | None = None,
        max_batch: int = 1,
        max_contexts: int = 2,
        workspace_gb: float = 4.0,
        trt_precision: str | None = None,
        **_: Any,
    ) -> None:
        trt = require_tensorrt()
        device = check_device(device)
        if device == "cpu":
            raise GvslInputError("--backend tensorrt runs on a GPU only; use --backend onnxruntime for --device cpu")
        if trt_precision not in (None, "fp32", "fp16", "bf16"):
            raise GvslInputError(f"trt_precision must be fp32, fp16 or bf16, got {trt_precision!r}")
        self.trt = trt
        self._closed = False
        self._all: list[_Slot] = []
        self.cuda = CudaRuntime()
        self.device_index = device_index(device)
        self.cuda.set_device(self.device_index)
        self.logger = trt.Logger(trt.Logger.ERROR)
        path = Path(path)
        wanted = max(1, int(max_contexts))
        if path.is_dir() or path.suffix.lower() in (".engine", ".plan"):
            plan, self.info = self._exported_engine(path, kind, trt_precision)
        else:
            self.info = info_from_metadata(read_onnx_metadata(path), path, kind)
            # the builder's precision: the graph's own unless overridden (bf16 has no ONNX form)
            self.precision = trt_precision or self.info.precision
            profile = input_profile(self.info, max_shape, max_batch)
            plan = self._engine_plan(path, [profile] * wanted, cache_dir, workspace_gb)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise GvslInputError(
                f"{self.info.path}: TensorRT could not load the engine (built by another TensorRT or GPU?); "
                "delete the cache or export the engine again",
                self.info.path,
            )
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self._outputs = tuple(
            o for o in GRAPH_IO[kind][1] if o in names and self.engine.get_tensor_mode(o) == trt.TensorIOMode.OUTPUT
        )
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.graph_inputs = contract_inputs(kind, inputs)
        if self.graph_inputs is None:
            raise GvslInputError(
                f"{self.info.path}: the engine's inputs {sorted(inputs)} are not those of a gvsl {kind} engine "
                f"({', '.join(GRAPH_IO[kind][0])}); export it again",
                self.info.path,
            )
        if kind == "encoder" and "features" not in self._outputs:
            self.info = dataclasses.replace(self.info, dense=False)
        self._dtype = {n: trt.nptype(self.engine.get_tensor_dtype(n)) for n in names}
        # contexts in concurrent use each own an optimisation profile
        self._max = max(1, min(wanted, int(self.engine.num_optimization_profiles)))
        self.min_input, self.max_input = self._shape_range()
        self._cond = threading.Condition()
        self._free: list[_Slot] = []
        self._profiles_free = list(range(self._max - 1, -1, -1))
        self._busy = 0
        self.name = "tensorrt"

    # ------------------------------------------------------------------ engines
    def _engine_plan(
        self, path: Path, profiles: list[dict[str, tuple]], cache_dir: str | Path | None, workspace_gb: float
    ) -> bytes:
        """Serialized engine from the cache, or built now with the shared builder and cached."""
        trt = self.trt
        gpu = _gpu_name(self.device_index)
        key_parts = [
            file_sha256(path),
            trt.__version__,
            gpu,
            profiles[0],
            self.precision,
            len(profiles),
            _BUILDER_RULES,
        ]
        key = hashlib.sha256(json.dumps(key_parts).encode()).hexdigest()[:24]
        cache = cache_folder(cache_dir) / "trt"
        plan_path = cache / f"{path.stem}-{key}.engine"
        if plan_path.is_file():
            return plan_path.read_bytes()
        hint = " (export with --warp gather for TensorRT)" if self.info.warp == "grid_sample" else ""
        timing = cache / f"timing-{hashlib.sha256(gpu.encode()).hexdigest()[:12]}-trt{trt.__version__}.cache"
        data, _ = build_serialized_engine(
            path,
            precision=self.precision,
            graph_precision=self.info.precision,
            profiles=profiles,
            workspace_gib=workspace_gb,
            timing_cache=timing,
            log_level="ERROR",
            parse_hint=hint,
        )
        atomic_write(plan_path, lambda tmp: Path(tmp).write_bytes(data))
        return data

    def _exported_engine(self, path: Path, kind: str, precision: str | None) -> tuple[bytes, ModelInfo]:
        """An engine from ``gvsl export --format engine``: the file, or the one in an export folder
        built for this GPU and TensorRT version; refused with one line when it was built elsewhere."""
        folder = path if path.is_dir() else path.parent
        manifest = read_manifest(folder)
        if manifest is None:
            raise GvslInputError(
                f"{path}: no manifest.json beside this engine; keep the engine in the folder `gvsl export` wrote "
                "(the manifest records the GPU and TensorRT version it runs on)",
                str(path),
            )
        here_trt = str(self.trt.__version__)
        here_cc = self.cuda.compute_capability(self.device_index)
        entries = [e for e in manifest_engines(folder, kind) if path.is_dir() or e["file"] == path.name]
        if not path.is_dir() and not entries:
            other = [e for e in (manifest.get("artifacts") or []) if isinstance(e, dict) and e.get("file") == path.name]
            if other:
                raise GvslInputError(
                    f"{path}: is a gvsl {other[0].get('kind', 'unknown')} engine, but this needs the {kind} engine",
                    str(path),
                )
            raise GvslInputError(f"{path}: not listed in {folder / 'manifest.json'}; export it again", str(path))
        if precision:
            entries = [e for e in entries if e.get("precision") == precision] or entries
        fits = [
            e
            for e in entries
            if str(e.get("tensorrt_version")) == here_trt and str(e.get("compute_capability")) == here_cc
        ]
        if not fits:
            e = entries[0]
            raise GvslInputError(
                f"{folder / e['file']}: built for {e.get('gpu', 'another GPU')} (compute capability "
                f"{e.get('compute_capability', '?')}) with TensorRT {e.get('tensorrt_version', '?')}, but this machine "
                f"has compute capability {here_cc} and TensorRT {here_trt}; run `gvsl export --format engine` on this "
                "machine, or use the ONNX export",
                str(folder / e["file"]),
            )
        entry = fits[0]
        engine_path = folder / entry["file"]
        if not engine_path.is_file():
            raise GvslInputError(
                f"{engine_path}: listed in the manifest but missing; export it again", str(engine_path)
            )
        self.precision = str(entry.get("precision", "fp32"))
        return engine_path.read_bytes(), info_from_manifest(manifest, engine_path, kind, entry)

    def _shape_range(self) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
        """Per input, the shapes every pooled profile admits (min, max), so any context can take a call."""
        lows: dict[str, tuple[int, ...]] = {}
        highs: dict[str, tuple[int, ...]] = {}
        for n in self.input_names:
            for i in range(self._max):
                lo, _, hi = (tuple(int(v) for v in s) for s in self.engine.get_tensor_profile_shape(n, i))
                lows[n] = tuple(max(a, b) for a, b in zip(lows.get(n, lo), lo, strict=True))
                highs[n] = tuple(min(a, b) for a, b in zip(highs.get(n, hi), hi, strict=True))
        return lows, highs

    # ------------------------------------------------------------------ pool
    @property
    def _made(self) -> int:
        """Contexts created so far (never more than the pool size)."""
        return len(self._all)

    def _acquire(self) -> _Slot:
        """A free context, a new one while the pool has room, else wait for one to come back."""
        with self._cond:
            while True:
                if self._closed:
                    raise GvslInputError(f"{self.info.path}: this TensorRT backend is closed", self.info.path)
                if self._free:
                    self._busy += 1
                    return self._free.pop()
                if self._profiles_free:
                    profile = self._profiles_free.pop()
                    self._busy += 1
                    break
                self._cond.wait()
        try:
            slot = self._new_slot(profile)
        except BaseException:
            with self._cond:  # give the place back, or the next caller waits for a context that never comes
                self._profiles_free.append(profile)
                self._busy -= 1
                self._cond.notify_all()
            raise
        with self._cond:
            self._all.append(slot)
        return slot

    def _new_slot(self, profile: int) -> _Slot:
        self.cuda.set_device(self.device_index)
        context = self.engine.create_execution_context()
        if context is None:
            raise RuntimeError("TensorRT could not create an execution context (out of GPU memory?)")
        stream = self.cuda.stream()
        try:
            if not context.set_optimization_profile_async(profile, stream):
                raise RuntimeError(f"TensorRT: cannot select optimisation profile {profile}")
            self.cuda.sync(stream)
        except BaseException:
            self.cuda.destroy_stream(stream)
            raise
        return _Slot(context, profile, stream)

    def _release(self, slot: _Slot) -> None:
        with self._cond:
            self._free.append(slot)
            self._busy -= 1
            self._cond.notify_all()

    @staticmethod
    def _grow(buffers: dict[str, tuple[int, int]], name: str, nbytes: int, alloc: Any, free: Any) -> int:
        ptr, capacity = buffers.get(name, (0, 0))
        if nbytes > capacity:  # grow only: steady-state calls allocate nothing
            free(ptr)
            ptr = 0
            buffers.pop(name, None)
            ptr = alloc(nbytes)
            buffers[name] = (ptr, nbytes)
        return ptr

    # ------------------------------------------------------------------ run
    @property
    def output_names(self) -> tuple[str, ...]:
        return self._outputs

    def _check_input(self, name: str, x: np.ndarray) -> None:
        lo, hi = self.min_input[name], self.max_input[name]
        if x.ndim != len(hi) or any(s > m for s, m in zip(x.shape, hi, strict=True)):
            raise GvslInputError(
                f"{self.info.path}: input {shape_str(x.shape)} exceeds the TensorRT engine's maximum "
                f"{shape_str(hi)}; raise max_shape / --max-shape or use onnxruntime",
                self.info.path,
            )
        if any(s < m for s, m in zip(x.shape, lo, strict=True)):
            raise GvslInputError(
                f"{self.info.path}: input {shape_str(x.shape)} is below the TensorRT engine's minimum "
                f"{shape_str(lo)}; export the engine with a smaller --min-shape or use onnxruntime",
                self.info.path,
            )

    def run(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        want = self._check_outputs(outputs)
        host = {}
        for n in self.input_names:
            x = np.ascontiguousarray(inputs[n], dtype=self._dtype[n])
            self._check_input(n, x)
            host[n] = x
        slot = self._acquire()
        try:
            return self._run_on(slot, host, want)
        finally:
            self._release(slot)

    def _run_on(self, slot: _Slot, host: dict[str, np.ndarray], want: list[str]) -> dict[str, np.ndarray]:
        cuda = self.cuda
        cuda.set_device(self.device_index)
        ctx, stream = slot.context, slot.stream
        for n, x in host.items():
            if not ctx.set_input_shape(n, tuple(x.shape)):
                raise GvslInputError(
                    f"{self.info.path}: TensorRT rejected input {n} of shape {shape_str(x.shape)} (engine range "
                    f"{shape_str(self.min_input[n])} .. {shape_str(self.max_input[n])})",
                    self.info.path,
                )
            pinned = self._grow(slot.host, n, x.nbytes, cuda.malloc_host, cuda.free_host)
            np.copyto(host_view(pinned, x.shape, x.dtype), x)
            ptr = self._grow(slot.device, n, x.nbytes, cuda.malloc, cuda.free)
            ctx.set_tensor_address(n, ptr)
            cuda.copy(ptr, pinned, x.nbytes, cuda.H2D, stream)
        shapes = {}
        for n in self._outputs:  # every output needs an address, wanted or not
            shape = tuple(int(s) for s in ctx.get_tensor_shape(n))
            if any(s < 0 for s in shape):
                raise RuntimeError(f"TensorRT left output {n} unresolved ({shape}); input shapes are incomplete")
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(self._dtype[n]).itemsize
            ctx.set_tensor_address(n, self._grow(slot.device, n, nbytes, cuda.malloc, cuda.free))
            shapes[n] = (shape, nbytes)
        if not ctx.execute_async_v3(stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        for n in want:
            shape, nbytes = shapes[n]
            pinned = self._grow(slot.host, n, nbytes, cuda.malloc_host, cuda.free_host)
            cuda.copy(pinned, slot.device[n][0], nbytes, cuda.D2H, stream)
        cuda.sync(stream)
        return {n: host_view(slot.host[n][0], shapes[n][0], self._dtype[n]).astype(np.float32) for n in want}

    def close(self) -> None:
        """Wait for calls in flight, then free every context, stream and buffer."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()  # callers waiting for a context give up
            while self._busy:
                self._cond.wait()
            slots, self._all, self._free = self._all, [], []
        for slot in slots:
            for ptr, _ in slot.device.values():
                self.cuda.free(ptr)
            for ptr, _ in slot.host.values():
                self.cuda.free_host(ptr)
            slot.device.clear()
            slot.host.clear()
            self.cuda.destroy_stream(slot.stream)
            slot.context = None
        self.engine = None


register_backend("tensorrt", TensorRTBackend, ("onnx", "engine"))

__all__ = ["TensorRTBackend"]
