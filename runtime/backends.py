"""Inference backends behind one small interface: ONNX Runtime, native TensorRT, PyTorch.

A backend runs one exported graph (encoder or registration) on numpy arrays:
``backend.run({"image": x}, ["embedding"]) -> {"embedding": y}``. It is created
once and reused, and ``run`` is safe to call from many threads at once:

* **onnxruntime** — one ``InferenceSession`` (its ``run`` is thread-safe).
  Providers are picked TensorRT EP -> CUDA EP -> CPU for GPU devices, with
  engine and timing caches on disk and explicit shape profiles so dynamic
  shapes do not rebuild engines at every new size;
* **tensorrt** — native TensorRT 10 (named-tensor API, ``execute_async_v3``):
  the engine is built from the ONNX file once and cached on disk; a pool of
  execution contexts, each with its own CUDA stream and device buffers that
  are reused (grown, never shrunk) between calls;
* **torch** — the PyTorch model itself (development and parity checks). Only
  this backend imports torch, and only when chosen.

``auto`` picks onnxruntime when an ONNX model is given (it falls back to
TensorRT when only TensorRT is installed) and torch for a trained model
folder / ``.safetensors`` / ``.pth``.

Which file is a model: an export folder (``manifest.json`` with
``encoder.onnx`` / ``registration.onnx`` from ``gvsl export``), one of those
``.onnx`` files, or for ``--backend torch`` a model folder from ``gvsl
train`` or an official ``.pth``. Anything else is a :class:`GvslInputError`
naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import artifact as A
from .atomic import atomic_write
from .errors import GvslInputError
from .preprocess import PreprocessConfig

__all__ = [
    "BACKENDS",
    "Backend",
    "DEFAULT_PATCH",
    "ModelInfo",
    "OnnxRuntimeBackend",
    "TensorRTBackend",
    "TorchBackend",
    "NETWORK_SCOPES",
    "calibration_windows",
    "load_backend",
    "pin_geometry_fp32",
    "quantize_int8",
    "read_onnx_metadata",
    "resolve_model_file",
]

BACKENDS = ("auto", "onnxruntime", "tensorrt", "torch")

#: Sliding-window size assumed for an official ``.pth`` (it records no training patch).
DEFAULT_PATCH = (128, 128, 128)

_ONNX_NAMES = {A.ENCODER: "encoder.onnx", A.REGISTRATION: "registration.onnx", A.REFINE: "refine.onnx"}
_IO = {
    A.ENCODER: (A.ENCODER_INPUTS, A.ENCODER_OUTPUTS),
    A.REGISTRATION: (A.REGISTRATION_INPUTS, A.REGISTRATION_OUTPUTS),
    A.REFINE: (A.REFINE_INPUTS, A.REFINE_OUTPUTS),
}
_TORCH_SUFFIXES = (".pth", ".pt", ".ckpt", ".safetensors")


# ----------------------------------------------------------------------------- model info
@dataclass(frozen=True)
class ModelInfo:
    """What the runtime needs to know about a model, read from the artifact itself.

    ``preprocess`` and ``patch_size`` are what training used, so inference
    repeats them exactly; ``dense`` says whether the encoder has the
    ``features`` output.
    """

    kind: str
    path: str
    model: dict[str, Any]
    preprocess: PreprocessConfig
    patch_size: tuple[int, int, int]
    dense: bool = True
    precision: str = "fp32"
    warp: str = ""
    weights_sha256: str = ""
    version: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def embedding_dim(self) -> int:
        return int(self.model["widths"][4])

    @property
    def feature_dim(self) -> int:
        return int(self.model["widths"][8])


def _info_from_metadata(meta: Mapping[str, str], path: Path, want_kind: str) -> ModelInfo:
    """Validate gvsl ONNX metadata_props and turn them into a :class:`ModelInfo`."""
    name = str(path)
    if meta.get(A.META_FORMAT) != A.FORMAT and A.META_MODEL not in meta:
        raise GvslInputError(
            f"{name}: an ONNX graph but not a gvsl artifact (no gvsl metadata); export the model with `gvsl export`",
            name,
        )
    kind = meta.get(A.META_KIND, "")
    if kind != want_kind:
        raise GvslInputError(
            f"{name}: is a gvsl {kind or 'unknown'} graph, but this needs the {want_kind} graph "
            f"({_ONNX_NAMES[want_kind]}); pass the export folder or that file",
            name,
        )
    if kind == A.REFINE:  # no learned weights: its constants are all it describes
        try:
            settings = json.loads(meta.get(A.META_REFINE) or "{}")
        except ValueError as e:
            raise GvslInputError(
                f"{name}: gvsl refine metadata is damaged ({e}); export the model again", name
            ) from None
        return ModelInfo(
            kind=kind,
            path=name,
            model={},
            preprocess=PreprocessConfig(),
            patch_size=DEFAULT_PATCH,
            precision=meta.get(A.META_PRECISION, "fp32"),
            version=meta.get(A.META_VERSION, ""),
            extra={"refine": settings},
        )
    try:
        model = json.loads(meta[A.META_MODEL])
        widths = [int(w) for w in model["widths"]]
        if len(widths) != 9:
            raise ValueError("widths must have 9 entries")
        pre = PreprocessConfig.from_dict(json.loads(meta.get(A.META_PREPROCESS) or "{}"))
        patch = tuple(int(p) for p in json.loads(meta.get(A.META_PATCH) or "null") or DEFAULT_PATCH)
        if len(patch) != 3 or min(patch) < 16 or any(p % 16 for p in patch):
            raise ValueError(f"bad patch size {patch}")
    except (KeyError, TypeError, ValueError) as e:
        raise GvslInputError(
            f"{name}: gvsl metadata is damaged ({type(e).__name__}: {e}); export the model again", name
        ) from None
    return ModelInfo(
        kind=kind,
        path=name,
        model=model,
        preprocess=pre,
        patch_size=patch,  # type: ignore[arg-type]
        dense=meta.get(A.META_DENSE, "true").lower() == "true",
        precision=meta.get(A.META_PRECISION, "fp32"),
        warp=meta.get(A.META_WARP, ""),
        weights_sha256=meta.get(A.META_WEIGHTS_SHA, ""),
        version=meta.get(A.META_VERSION, ""),
    )


def read_onnx_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """``metadata_props`` of an ONNX file, without building a session when ``onnx`` is
    installed (weights in external data are not read)."""
    p = Path(path)
    try:
        import onnx
    except ImportError:
        onnx = None
    if onnx is not None:
        try:
            proto = onnx.load(str(p), load_external_data=False)
        except Exception as e:
            raise _not_onnx(p, e) from None
        return {m.key: m.value for m in proto.metadata_props}
    ort = _import_ort()
    try:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sess = ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise _not_onnx(p, e) from None
    return dict(sess.get_modelmeta().custom_metadata_map)


def _not_onnx(p: Path, e: BaseException) -> GvslInputError:
    msg = " ".join(str(e).split())[:160] or type(e).__name__
    return GvslInputError(
        f"{p}: not a readable ONNX model ({msg}); give the encoder.onnx / registration.onnx written by `gvsl export`",
        str(p),
    )


def resolve_model_file(model: str | os.PathLike[str], kind: str) -> tuple[Path, str]:
    """Find the file to run for ``kind``: returns ``(path, "onnx" | "torch")``.

    Accepts an export folder, a ``.onnx`` file, or a trained model folder /
    ``.safetensors`` / ``.pth`` (torch only).
    """
    if kind not in _IO:
        raise ValueError(f"kind must be one of {', '.join(map(repr, _IO))}, got {kind!r}")
    p = Path(model)
    name = str(model)
    if not p.exists():
        raise GvslInputError(f"{name}: model not found; give the folder written by `gvsl export`", name)
    if p.is_dir():
        manifest = p / "manifest.json"
        candidate = p / _ONNX_NAMES[kind]
        if manifest.is_file():
            try:
                listed = _manifest_file(json.loads(manifest.read_text()), kind)
            except (OSError, ValueError, TypeError) as e:
                raise GvslInputError(
                    f"{manifest}: unreadable export manifest ({e}); export the model again", str(manifest)
                ) from None
            if listed:
                candidate = p / listed
        if candidate.is_file():
            return candidate, "onnx"
        if (p / "model.safetensors").is_file():
            return p, "torch"
        if (p / "model" / "model.safetensors").is_file():  # a `gvsl train` run folder
            return p / "model", "torch"
        if manifest.is_file() or any(p.glob("*.onnx")):
            raise GvslInputError(f"{name}: export folder has no {_ONNX_NAMES[kind]}; export the {kind} graph too", name)
        raise GvslInputError(
            f"{name}: not a gvsl model folder (no encoder.onnx / registration.onnx / model.safetensors); "
            "pass the folder written by `gvsl export` or `gvsl train`",
            name,
        )
    if p.stat().st_size == 0:
        raise GvslInputError(f"{name}: model file is empty (0 bytes); copy or export it again", name)
    low = p.name.lower()
    if low.endswith(".onnx"):
        return p, "onnx"
    if low.endswith(_TORCH_SUFFIXES):
        return p, "torch"
    raise GvslInputError(
        f"{name}: not a gvsl model (expected an export folder or .onnx file from `gvsl export`); check --model",
        name,
    )


def _manifest_file(manifest: Any, kind: str) -> str | None:
    """The file the manifest lists for ``kind`` (tolerates a few layouts of ``gvsl export``)."""
    if not isinstance(manifest, dict):
        raise ValueError("manifest is not a JSON object")
    for key in ("graphs", "files", "artifacts", "outputs"):
        entries = manifest.get(key)
        if isinstance(entries, dict):
            v = entries.get(kind)
            if isinstance(v, str):
                return v
            if isinstance(v, dict):
                for f in ("file", "path", "name", "onnx"):
                    if isinstance(v.get(f), str) and v[f].endswith(".onnx"):
                        return v[f]
        if isinstance(entries, list):
            for e in entries:
                if isinstance(e, dict) and e.get("kind") == kind:
                    for f in ("file", "path", "name", "onnx"):
                        if isinstance(e.get(f), str) and e[f].endswith(".onnx"):
                            return e[f]
    return None


# ----------------------------------------------------------------------------- interface
class Backend(ABC):
    """Runs one gvsl graph on float32 numpy arrays. Thread-safe ``run``; reuse the object."""

    name: str = "backend"
    info: ModelInfo

    @property
    def input_names(self) -> tuple[str, ...]:
        return _IO[self.info.kind][0]

    @property
    @abstractmethod
    def output_names(self) -> tuple[str, ...]:
        """Outputs this graph really has (an encoder may lack ``features``)."""

    @abstractmethod
    def run(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run the graph; returns the requested outputs (all by default) as float32 arrays."""

    def close(self) -> None:  # noqa: B027 - optional hook, most backends free on garbage collection
        """Free sessions, contexts and device memory (the object is unusable afterwards)."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _check_outputs(self, outputs: Sequence[str] | None) -> list[str]:
        have = self.output_names
        if outputs is None:
            return list(have)
        missing = [o for o in outputs if o not in have]
        if missing:
            hint = " (export with dense features: `gvsl export --dense`)" if "features" in missing else ""
            raise GvslInputError(
                f"{self.info.path}: the graph has no output {', '.join(missing)}{hint}", self.info.path
            )
        return list(outputs)


def _device_index(device: str) -> int:
    if device in ("cuda", "gpu", "auto"):
        return 0
    if device.startswith("cuda:"):
        try:
            return int(device.split(":", 1)[1])
        except ValueError:
            pass
    raise GvslInputError(f"--device {device}: use auto, cpu, cuda or cuda:N")


def _check_device(device: str) -> str:
    device = (device or "auto").lower()
    if device in ("auto", "cpu", "cuda", "gpu") or device.startswith("cuda:"):
        _ = device.startswith("cuda:") and _device_index(device)
        return "cuda" if device == "gpu" else device
    raise GvslInputError(f"--device {device}: use auto, cpu, cuda or cuda:N")


def _cache_dir(option: str | os.PathLike[str] | None) -> Path:
    if option:
        return Path(option)
    base = os.environ.get("GVSL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "gvsl"
    )
    return Path(base)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _shape_str(shape: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in shape)


def _profile(info: ModelInfo, max_shape: Sequence[int] | None, max_batch: int) -> dict[str, tuple]:
    """(min, opt, max) input shapes for engine builders: encoder windows never exceed
    the patch; the registration graph takes the whole padded volume up to ``max_shape``."""
    if info.kind == A.REFINE:  # whole level grids of any size >= 2, plus fixed-shape scalars
        top = tuple(int(s) for s in (max_shape or (256, 256, 256)))
        prof: dict[str, tuple] = {}
        for name, channels in (("fixed", 1), ("moving", 1), ("dvf", 3)):
            prof[name] = ((1, channels, 2, 2, 2), (1, channels, 96, 96, 96), (1, channels, *top))
        prof["iterations"] = ((), (), ())
        prof["step"] = prof["regularisation"] = ((1,), (1,), (1,))
        return prof
    patch = tuple(int(p) for p in info.patch_size)
    top = patch
    if info.kind == A.REGISTRATION:
        wanted = tuple(int(s) for s in (max_shape or (256, 256, 256)))
        top = tuple(max(-(-w // 16) * 16, p) for w, p in zip(wanted, patch, strict=True))
    lo = (1, 1, 16, 16, 16)
    opt = (1, 1, *patch)
    hi = (max(1, max_batch), 1, *top)
    return {n: (lo, opt, hi) for n in _IO[info.kind][0]}


# ----------------------------------------------------------------------------- onnxruntime
def _import_ort() -> Any:
    try:
        import onnxruntime as ort
    except ImportError:
        raise GvslInputError(
            "onnxruntime is not installed: pip install 'gvsl[cpu]' (or 'gvsl[gpu]' for CUDA/TensorRT)"
        ) from None
    return ort


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime session with provider selection (TensorRT EP -> CUDA EP -> CPU)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        kind: str,
        device: str = "auto",
        *,
        threads: int = 0,
        cache_dir: str | os.PathLike[str] | None = None,
        max_shape: Sequence[int] | None = None,
        max_batch: int = 1,
        providers: Sequence[Any] | None = None,
        trt_ep: bool = True,
        int8_calibration: Sequence[Any] | None = None,
        **_: Any,  # options of other backends (max_contexts ...), so `auto` never trips on them
    ) -> None:
        ort = _import_ort()
        path = Path(path)
        device = _check_device(device)
        if int8_calibration:
            if device != "cpu":
                raise GvslInputError("int8 is a CPU mode (ONNX Runtime QLinearConv); use --device cpu")
            path = _int8_model(path, kind, int8_calibration, cache_dir)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = int(threads)
        opts.log_severity_level = 3  # errors only: TensorRT EP warnings would flood server logs
        try:
            if providers is None:
                # the metadata is needed for TensorRT EP profiles, so read it before the session
                info = _info_from_metadata(read_onnx_metadata(path), path, kind)
                providers = self._providers(ort, info, device, cache_dir, max_shape, max_batch, trt_ep)
            self.session = ort.InferenceSession(str(path), opts, providers=list(providers))
        except GvslInputError:
            raise
        except Exception as e:
            raise _not_onnx(path, e) from None
        meta = dict(self.session.get_modelmeta().custom_metadata_map)
        self.info = _info_from_metadata(meta, path, kind)
        names = {o.name for o in self.session.get_outputs()}
        ins = {i.name: i for i in self.session.get_inputs()}
        want = set(self.input_names)
        if set(ins) != want or not {o for o in _IO[kind][1] if o != "features"} <= names:
            raise GvslInputError(
                f"{path}: graph I/O {sorted(ins)} -> {sorted(names)} is not the gvsl {kind} contract; "
                "export it again with `gvsl export`",
                str(path),
            )
        self._outputs = tuple(o for o in _IO[kind][1] if o in names)
        self._in_dtype = {
            n: (np.float16 if "float16" in i.type else np.int64 if "int64" in i.type else np.float32)
            for n, i in ins.items()
        }
        used = self.session.get_providers()
        self.providers = tuple(used)
        self.name = f"onnxruntime[{used[0].replace('ExecutionProvider', '')}]"

    @staticmethod
    def _providers(
        ort: Any,
        info: ModelInfo,
        device: str,
        cache_dir: str | os.PathLike[str] | None,
        max_shape: Sequence[int] | None,
        max_batch: int,
        trt_ep: bool,
    ) -> list[Any]:
        available = set(ort.get_available_providers())
        if device == "cpu":
            return ["CPUExecutionProvider"]
        gpu = {"TensorrtExecutionProvider", "CUDAExecutionProvider"} & available
        if not gpu:
            if device == "auto":
                return ["CPUExecutionProvider"]
            raise GvslInputError(
                f"--device {device}: this onnxruntime has no CUDA support (providers: "
                f"{', '.join(sorted(available))}); pip install onnxruntime-gpu, or use --device cpu"
            )
        if hasattr(ort, "preload_dlls"):  # CUDA/cuDNN from pip wheels, when present
            try:
                ort.preload_dlls()
            except Exception:
                pass
        idx = _device_index(device)
        out: list[Any] = []
        if trt_ep and "TensorrtExecutionProvider" in available:
            cache = _cache_dir(cache_dir) / "ort-trt"
            cache.mkdir(parents=True, exist_ok=True)
            prof = _profile(info, max_shape, max_batch)

            def fmt(i: int) -> str:
                return ",".join(f"{n}:{_shape_str(s[i])}" for n, s in prof.items())

            out.append(
                (
                    "TensorrtExecutionProvider",
                    {
                        "device_id": idx,
                        "trt_engine_cache_enable": True,
                        "trt_engine_cache_path": str(cache),
                        "trt_timing_cache_enable": True,
                        "trt_timing_cache_path": str(cache),
                        "trt_fp16_enable": info.precision == "fp16",
                        "trt_profile_min_shapes": fmt(0),
                        "trt_profile_opt_shapes": fmt(1),
                        "trt_profile_max_shapes": fmt(2),
                    },
                )
            )
        if "CUDAExecutionProvider" in available:
            out.append(
                (
                    "CUDAExecutionProvider",
                    {
                        "device_id": idx,
                        # exhaustive search would re-benchmark every new volume size
                        "cudnn_conv_algo_search": "HEURISTIC",
                        "arena_extend_strategy": "kSameAsRequested",
                    },
                )
            )
        out.append("CPUExecutionProvider")
        return out

    @property
    def output_names(self) -> tuple[str, ...]:
        return self._outputs

    def run(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        want = self._check_outputs(outputs)
        feed = {n: np.ascontiguousarray(inputs[n], dtype=self._in_dtype[n]) for n in self.input_names}
        res = self.session.run(want, feed)
        return {n: np.asarray(r, dtype=np.float32) for n, r in zip(want, res, strict=True)}

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]


# ----------------------------------------------------------------------------- int8 (CPU)
def calibration_windows(info: ModelInfo, volumes: Sequence[Any], max_windows: int = 8) -> list[np.ndarray]:
    """Network inputs ``[1, 1, D, H, W]`` for int8 calibration: each volume (path,
    DICOM folder, ``(array, affine)``, Volume, or an already preprocessed 5-D
    array) preprocessed with the model's own settings and cut into the same
    sliding windows the Embedder runs, at most ``max_windows`` in all."""
    from .embed import window_starts
    from .io import read_volume
    from .preprocess import pad_to_multiple, preprocess

    out: list[np.ndarray] = []
    for v in volumes:
        if isinstance(v, np.ndarray) and v.ndim == 5:
            out += [np.ascontiguousarray(b[None], dtype=np.float32) for b in v]
            continue
        data, _ = pad_to_multiple(preprocess(read_volume(v), info.preprocess).data, 16)
        win = [min(int(p), int(s)) for p, s in zip(info.patch_size, data.shape, strict=True)]
        starts = [window_starts(int(s), w, 0.5) for s, w in zip(data.shape, win, strict=True)]
        for a in starts[0]:
            for b in starts[1]:
                for c in starts[2]:
                    crop = data[a : a + win[0], b : b + win[1], c : c + win[2]]
                    out.append(np.ascontiguousarray(crop, dtype=np.float32)[None, None])
    if not out:
        raise GvslInputError("int8 calibration needs at least one volume")
    if len(out) > max_windows:  # spread the kept windows over all volumes
        out = [out[i] for i in np.linspace(0, len(out) - 1, max_windows).round().astype(int)]
    return out


def quantize_int8(
    model: str | os.PathLike[str],
    out: str | os.PathLike[str],
    calibration: Sequence[Any],
    kind: str = A.ENCODER,
) -> Path:
    """Write an int8 copy of a gvsl fp32 graph for ONNX Runtime on CPU; returns ``out``.

    Static QDQ quantisation (onnxruntime.quantization, no torch): convolution
    weights int8 per output channel, activations uint8 per tensor with ranges
    from ``calibration`` (volumes as for :func:`calibration_windows`: real
    scans preprocessed like training, not random noise). Only convolutions are
    quantised; GroupNorm, pooling, resizing and the pooled embedding stay fp32.
    On x86 CPUs with VNNI, ORT's int8 convolutions run at several times the fp32
    rate. Lossy: check the embedding cosine to fp32 on your data
    (``gvsl bench`` reports it). The gvsl metadata is kept, precision ``int8``.
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    src, fmt = resolve_model_file(model, kind)
    if fmt != "onnx":
        raise GvslInputError(f"{src}: int8 needs the fp32 ONNX export (gvsl export), not a torch model", str(src))
    info = _info_from_metadata(read_onnx_metadata(src), src, kind)
    if info.precision != "fp32":
        raise GvslInputError(f"{src}: int8 is made from the fp32 graph, this one is {info.precision}", str(src))
    if kind != A.ENCODER:
        raise GvslInputError("int8 is offered for the encoder (embeddings) only; registration stays fp32")
    windows = calibration_windows(info, calibration)

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(windows)

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self._it, None)
            return None if x is None else {"image": x}

    import logging

    def write(tmp: str) -> None:
        quantize_static(
            str(src),
            tmp,
            _Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["Conv"],
            calibrate_method=CalibrationMethod.MinMax,
        )
        proto = onnx.load(tmp)
        meta = read_onnx_metadata(src)
        meta[A.META_PRECISION] = "int8"
        del proto.metadata_props[:]
        for k, v in meta.items():
            proto.metadata_props.add(key=k, value=v)
        onnx.save(proto, tmp)

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantiser's "consider pre-processing" warnings on the root logger
    try:
        return atomic_write(out, write)
    finally:
        root.setLevel(level)


def _int8_model(path: Path, kind: str, calibration: Sequence[Any], cache_dir: Any) -> Path:
    """The int8 graph for ``path`` and this calibration set, quantised once and cached
    (key: the fp32 file's and the calibration windows' sha256)."""
    src, _ = resolve_model_file(path, kind)
    info = _info_from_metadata(read_onnx_metadata(src), src, kind)
    if info.precision == "int8":
        return src
    windows = calibration_windows(info, calibration)
    h = hashlib.sha256(_file_sha256(src).encode())
    for w in windows:
        h.update(w.tobytes())
    out = _cache_dir(cache_dir) / "int8" / f"{src.stem}-{h.hexdigest()[:24]}.onnx"
    if not out.is_file():
        quantize_int8(src, out, windows, kind)
    return out


# ----------------------------------------------------------------------------- tensorrt
class _Cuda:
    """The few CUDA runtime calls TensorRT needs, through ctypes (no torch, no pycuda)."""

    H2D, D2H = 1, 2

    def __init__(self) -> None:
        import ctypes

        lib = None
        names = ["libcudart.so", "libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0", "cudart64_12.dll"]
        for base in _nvidia_lib_dirs():
            names += [str(p) for p in sorted(base.glob("libcudart.so*"))]
        for n in names:
            try:
                lib = ctypes.CDLL(n)
                break
            except OSError:
                continue
        if lib is None:
            raise GvslInputError(
                "--backend tensorrt: the CUDA runtime (libcudart) was not found; install the CUDA runtime "
                "(pip install nvidia-cuda-runtime-cu12) or use --backend onnxruntime"
            )
        self.c = ctypes
        self.lib = lib
        vp, sz = ctypes.c_void_p, ctypes.c_size_t
        lib.cudaMalloc.argtypes = [ctypes.POINTER(vp), sz]
        lib.cudaFree.argtypes = [vp]
        lib.cudaMemcpyAsync.argtypes = [vp, vp, sz, ctypes.c_int, vp]
        lib.cudaStreamCreate.argtypes = [ctypes.POINTER(vp)]
        lib.cudaStreamSynchronize.argtypes = [vp]
        lib.cudaStreamDestroy.argtypes = [vp]
        lib.cudaSetDevice.argtypes = [ctypes.c_int]
        lib.cudaGetErrorString.restype = ctypes.c_char_p

    def check(self, code: int, what: str) -> None:
        if code:
            msg = self.lib.cudaGetErrorString(code).decode(errors="replace")
            raise RuntimeError(f"CUDA {what} failed: {msg} ({code})")

    def set_device(self, idx: int) -> None:
        self.check(self.lib.cudaSetDevice(idx), "cudaSetDevice")

    def malloc(self, nbytes: int) -> int:
        ptr = self.c.c_void_p()
        self.check(self.lib.cudaMalloc(self.c.byref(ptr), max(1, int(nbytes))), "cudaMalloc")
        return int(ptr.value or 0)

    def free(self, ptr: int) -> None:
        if ptr:
            self.lib.cudaFree(self.c.c_void_p(ptr))

    def stream(self) -> int:
        s = self.c.c_void_p()
        self.check(self.lib.cudaStreamCreate(self.c.byref(s)), "cudaStreamCreate")
        return int(s.value or 0)

    def destroy_stream(self, s: int) -> None:
        if s:
            self.lib.cudaStreamDestroy(self.c.c_void_p(s))

    def copy(self, dst: int, src: int, nbytes: int, kind: int, stream: int) -> None:
        c = self.c
        code = self.lib.cudaMemcpyAsync(c.c_void_p(dst), c.c_void_p(src), nbytes, kind, c.c_void_p(stream))
        self.check(code, "cudaMemcpyAsync")

    def sync(self, stream: int) -> None:
        self.check(self.lib.cudaStreamSynchronize(self.c.c_void_p(stream)), "cudaStreamSynchronize")


def _nvidia_lib_dirs() -> list[Path]:
    """lib folders of NVIDIA's pip wheels (nvidia-cuda-runtime-cu12 ...), if installed."""
    import importlib.util

    out = []
    spec = importlib.util.find_spec("nvidia")
    for root in list(spec.submodule_search_locations or []) if spec else []:
        out += [p for p in Path(root).glob("*/lib") if p.is_dir()]
    return out


@dataclass
class _Slot:
    """One execution context with its stream and reusable device buffers."""

    context: Any
    stream: int
    buffers: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (ptr, capacity bytes)


class TensorRTBackend(Backend):
    """Native TensorRT 10: engine built once from the ONNX file and cached on disk, a pool
    of execution contexts (one per concurrent caller, up to ``max_contexts``), device
    buffers reused between calls."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        kind: str,
        device: str = "auto",
        *,
        cache_dir: str | os.PathLike[str] | None = None,
        max_shape: Sequence[int] | None = None,
        max_batch: int = 1,
        max_contexts: int = 2,
        workspace_gb: float = 4.0,
        trt_precision: str | None = None,
        **_: Any,
    ) -> None:
        try:
            import tensorrt as trt
        except ImportError:
            raise GvslInputError(
                "--backend tensorrt: TensorRT is not installed; pip install 'gvsl[gpu]' (tensorrt>=10) or use "
                "--backend onnxruntime"
            ) from None
        if int(trt.__version__.split(".")[0]) < 10:
            raise GvslInputError(f"--backend tensorrt: TensorRT {trt.__version__} found, 10 or newer is needed")
        device = _check_device(device)
        if device == "cpu":
            raise GvslInputError("--backend tensorrt runs on a GPU only; use --backend onnxruntime for --device cpu")
        self.trt = trt
        path = Path(path)
        self.info = _info_from_metadata(read_onnx_metadata(path), path, kind)
        if trt_precision not in (None, "fp32", "fp16", "bf16"):
            raise GvslInputError(f"trt_precision must be fp32, fp16 or bf16, got {trt_precision!r}")
        # the builder's precision: the graph's own unless overridden (bf16 has no ONNX form)
        self.precision = trt_precision or self.info.precision
        self.cuda = _Cuda()
        self.device_index = _device_index(device)
        self.cuda.set_device(self.device_index)
        self.logger = trt.Logger(trt.Logger.ERROR)
        prof = _profile(self.info, max_shape, max_batch)
        self.max_input = {n: s[2] for n, s in prof.items()}
        # TensorRT: contexts in concurrent use must each own an optimisation profile, so the
        # engine gets one (identical) profile per pooled context
        self._max = max(1, int(max_contexts))
        plan = self._engine_plan(path, prof, cache_dir, workspace_gb)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise GvslInputError(f"{path}: TensorRT could not load the cached engine; delete the cache and retry")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self._outputs = tuple(
            o for o in _IO[kind][1] if o in names and self.engine.get_tensor_mode(o) == trt.TensorIOMode.OUTPUT
        )
        self._dtype = {n: trt.nptype(self.engine.get_tensor_dtype(n)) for n in names}
        self._pool: queue.LifoQueue[_Slot] = queue.LifoQueue()
        self._made = 0
        self._lock = threading.Lock()
        self._all: list[_Slot] = []
        self.name = "tensorrt"

    def _engine_plan(
        self, path: Path, prof: dict[str, tuple], cache_dir: str | os.PathLike[str] | None, workspace_gb: float
    ) -> bytes:
        """Serialized engine from the cache, or built now and cached (atomic write)."""
        trt = self.trt
        key = hashlib.sha256(
            json.dumps(
                [
                    _file_sha256(path),
                    trt.__version__,
                    _gpu_name(self.device_index),
                    prof,
                    self.precision,
                    self._max,
                ]
            ).encode()
        ).hexdigest()[:24]
        cache = _cache_dir(cache_dir) / "trt"
        cache.mkdir(parents=True, exist_ok=True)
        plan_path = cache / f"{path.stem}-{key}.engine"
        if plan_path.is_file():
            return plan_path.read_bytes()
        builder = trt.Builder(self.logger)
        network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse_from_file(str(path)):
            errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            hint = " (export with --warp gather for TensorRT)" if self.info.warp == "grid_sample" else ""
            raise GvslInputError(f"{path}: TensorRT cannot parse this graph: {errs[:300]}{hint}", str(path))
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
        if self.precision in ("fp16", "bf16"):
            flag = "FP16" if self.precision == "fp16" else "BF16"
            if not hasattr(trt.BuilderFlag, flag):
                raise GvslInputError(f"TensorRT {trt.__version__} has no {flag} builder flag")
            config.set_flag(getattr(trt.BuilderFlag, flag))
            if self.info.precision == "fp32":  # lowering an fp32 graph: keep its geometry in fp32
                config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
                pin_geometry_fp32(trt, network)
        for _ in range(self._max):
            profile = builder.create_optimization_profile()
            for name, (lo, opt, hi) in prof.items():
                profile.set_shape(name, lo, opt, hi)
            config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise GvslInputError(f"{path}: TensorRT failed to build an engine (see the log above)", str(path))
        data = bytes(serialized)
        atomic_write(plan_path, lambda tmp: Path(tmp).write_bytes(data))
        return data

    @property
    def output_names(self) -> tuple[str, ...]:
        return self._outputs

    def _acquire(self) -> _Slot:
        try:
            return self._pool.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            if self._made < self._max:
                index = self._made
                self._made += 1
                self.cuda.set_device(self.device_index)
                slot = _Slot(self.engine.create_execution_context(), self.cuda.stream())
                if not slot.context.set_optimization_profile_async(index, slot.stream):
                    raise RuntimeError(f"TensorRT: cannot select optimisation profile {index}")
                self.cuda.sync(slot.stream)
                self._all.append(slot)
                return slot
        return self._pool.get()  # wait for a context to come back

    def _buffer(self, slot: _Slot, name: str, nbytes: int) -> int:
        ptr, cap = slot.buffers.get(name, (0, 0))
        if nbytes > cap:  # grow only: steady-state calls allocate nothing
            self.cuda.free(ptr)
            ptr, cap = self.cuda.malloc(nbytes), nbytes
            slot.buffers[name] = (ptr, cap)
        return ptr

    def run(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        want = self._check_outputs(outputs)
        host = {}
        for n in self.input_names:
            x = np.ascontiguousarray(inputs[n], dtype=self._dtype[n])
            if any(s > m for s, m in zip(x.shape, self.max_input[n], strict=True)):
                raise GvslInputError(
                    f"{self.info.path}: input {_shape_str(x.shape)} exceeds the TensorRT engine's maximum "
                    f"{_shape_str(self.max_input[n])}; raise max_shape / --max-shape or use onnxruntime",
                    self.info.path,
                )
            host[n] = x
        slot = self._acquire()
        try:
            self.cuda.set_device(self.device_index)
            ctx, stream = slot.context, slot.stream
            for n, x in host.items():
                ctx.set_input_shape(n, x.shape)
                ptr = self._buffer(slot, n, x.nbytes)
                ctx.set_tensor_address(n, ptr)
                self.cuda.copy(ptr, x.ctypes.data, x.nbytes, _Cuda.H2D, stream)
            results = {}
            for n in self._outputs:  # every output needs an address, wanted or not
                shape = tuple(ctx.get_tensor_shape(n))
                out = np.empty(shape, dtype=self._dtype[n])
                ptr = self._buffer(slot, n, out.nbytes)
                ctx.set_tensor_address(n, ptr)
                results[n] = (out, ptr)
            if not ctx.execute_async_v3(stream):
                raise RuntimeError("TensorRT execute_async_v3 failed")
            for n in want:
                out, ptr = results[n]
                self.cuda.copy(out.ctypes.data, ptr, out.nbytes, _Cuda.D2H, stream)
            self.cuda.sync(stream)
            return {n: results[n][0].astype(np.float32, copy=False) for n in want}
        finally:
            self._pool.put(slot)

    def close(self) -> None:
        with self._lock:
            for slot in self._all:
                for ptr, _ in slot.buffers.values():
                    self.cuda.free(ptr)
                slot.buffers.clear()
                self.cuda.destroy_stream(slot.stream)
                slot.context = None
            self._all.clear()
        self.engine = None


#: ONNX node-name scopes of the convolutional networks; every other layer is geometry
#: (positions, affine maths, the warp). Engines built here and by gvsl export share it.
NETWORK_SCOPES = ("/unet/", "/f_conv/", "/sp_conv/", "/out_flow/", "/fc_", "/model/unet/")


def pin_geometry_fp32(trt: Any, network: Any) -> None:
    """Keep float layers outside the conv networks in fp32: half precision would
    quantise voxel positions of the warp."""
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if any(scope in layer.name for scope in NETWORK_SCOPES):
            continue
        outs = [layer.get_output(j) for j in range(layer.num_outputs)]
        if outs and all(o.dtype == trt.float32 for o in outs):
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)


def _gpu_name(idx: int) -> str:
    """GPU identity for the engine cache key (engines are not portable across GPUs)."""
    try:
        import subprocess

        out = subprocess.run(
            ["nvidia-smi", f"--id={idx}", "--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"gpu{idx}"


# ----------------------------------------------------------------------------- torch
class TorchBackend(Backend):
    """The PyTorch model (development and parity). Imports torch; ``run`` is thread-safe
    because inference mode changes no module state."""

    def __init__(self, path: str | os.PathLike[str], kind: str, device: str = "auto", *, threads: int = 0, **_: Any):
        try:
            import torch
        except ImportError:
            raise GvslInputError("--backend torch needs PyTorch: pip install 'gvsl[train]'") from None
        from gvsl.io import WeightsError, load_model

        device = _check_device(device)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise GvslInputError(f"--device {device}: torch sees no CUDA GPU; use --device cpu")
        if threads:
            torch.set_num_threads(int(threads))
        try:
            model, meta = load_model(path, map_location=device)
        except WeightsError as e:
            raise GvslInputError(str(e), str(path)) from None
        self.torch = torch
        self.model = model.eval()
        self.device = torch.device(device)
        pre = PreprocessConfig.from_dict(meta.get("preprocess") or {})
        patch = tuple(int(p) for p in (meta.get("patch_size") or DEFAULT_PATCH))
        self.info = ModelInfo(
            kind=kind,
            path=str(path),
            model=dict(meta["model"]),
            preprocess=pre,
            patch_size=patch,  # type: ignore[arg-type]
            dense=True,
            precision="fp32",
            warp="torch",
        )
        self.name = f"torch[{self.device.type}]"

    @property
    def output_names(self) -> tuple[str, ...]:
        return _IO[self.info.kind][1]

    def run(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        want = self._check_outputs(outputs)
        torch = self.torch
        t = {
            n: torch.from_numpy(np.ascontiguousarray(inputs[n], dtype=np.float32)).to(self.device)
            for n in self.input_names
        }
        with torch.inference_mode():
            if self.info.kind == A.ENCODER:
                fg, fl = self.model.encode(t["image"])
                res = {"embedding": fg.mean(dim=(2, 3, 4)), "features": fl}
            else:
                affine, dvf, warped = self.model.register(t["fixed"], t["moving"])
                res = {"affine": affine, "dvf": dvf, "warped": warped}
            return {n: res[n].float().cpu().numpy() for n in want}

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]


# ----------------------------------------------------------------------------- factory
def load_backend(
    model: str | os.PathLike[str], kind: str, backend: str = "auto", device: str = "auto", **options: Any
) -> Backend:
    """Open ``model`` for ``kind`` ("encoder" / "registration") on ``backend``.

    ``options``: ``threads`` (CPU threads, 0 = library default), ``cache_dir``
    (engine caches, default ``$GVSL_CACHE_DIR`` or ``~/.cache/gvsl``),
    ``max_shape`` (largest registration input D,H,W for TensorRT profiles),
    ``max_batch``, ``max_contexts`` (TensorRT context pool size).
    """
    backend = (backend or "auto").lower()
    if backend not in BACKENDS:
        raise GvslInputError(f"--backend {backend}: use one of {', '.join(BACKENDS)}")
    path, fmt = resolve_model_file(model, kind)
    if backend == "auto":
        if fmt == "torch":
            backend = "torch"
        else:
            import importlib.util

            has_ort = importlib.util.find_spec("onnxruntime") is not None
            has_trt = importlib.util.find_spec("tensorrt") is not None
            backend = "tensorrt" if (not has_ort and has_trt) else "onnxruntime"
    if options.get("int8_calibration") and backend != "onnxruntime":
        raise GvslInputError(f"int8 runs on ONNX Runtime (CPU), not --backend {backend}")
    if backend == "torch":
        if fmt != "torch":
            raise GvslInputError(
                f"{path}: --backend torch needs the trained model (folder with model.safetensors, or .pth), "
                "not an ONNX export",
                str(path),
            )
        return TorchBackend(path, kind, device, **options)
    if fmt != "onnx":
        raise GvslInputError(
            f"{path}: --backend {backend} needs an ONNX export; run `gvsl export` on this model first, or use "
            "--backend torch",
            str(path),
        )
    if backend == "tensorrt":
        return TensorRTBackend(path, kind, device, **options)
    return OnnxRuntimeBackend(path, kind, device, **options)
