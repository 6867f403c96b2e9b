"""A Triton Inference Server model repository for the exported graphs.

Layout (Triton's)::

    REPO/gvsl_encoder/config.pbtxt        REPO/gvsl_registration/config.pbtxt
    REPO/gvsl_encoder/1/model.onnx|plan   REPO/gvsl_registration/1/model.onnx|plan

Batch is Triton's (``max_batch_size`` > 0, dynamic batching), spatial dims are
``-1``; names and float32 I/O are the graphs' own (fp16 graphs keep float32
I/O). Every config is parsed with Triton's own ``ModelConfig`` protobuf (from
the ``tritonclient`` package) before it is written.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gvsl.export.errors import ExportError
from gvsl.runtime import artifact

BACKENDS = ("onnxruntime", "tensorrt")
MODEL_NAMES = {artifact.ENCODER: "gvsl_encoder", artifact.REGISTRATION: "gvsl_registration"}
_FILES = {"onnxruntime": "model.onnx", "tensorrt": "model.plan"}


def _dims(d: Sequence[int]) -> str:
    return "[ " + ", ".join(str(int(x)) for x in d) + " ]"


def io_dims(
    kind: str, config: Any, dense: bool = True
) -> tuple[list[tuple[str, list[int]]], list[tuple[str, list[int]]]]:
    """(inputs, outputs) as (name, dims without batch) with ``-1`` for spatial sizes."""
    vol = [1, -1, -1, -1]
    if kind == artifact.ENCODER:
        outs = [("embedding", [config.embedding_dim])]
        if dense:
            outs.append(("features", [config.feature_dim, -1, -1, -1]))
        return [("image", vol)], outs
    return [("fixed", vol), ("moving", vol)], [("affine", [3, 4]), ("dvf", [3, -1, -1, -1]), ("warped", vol)]


def config_text(
    kind: str, backend: str, config: Any, *, dense: bool = True, max_batch_size: int = 4, queue_delay_us: int = 2000
) -> str:
    """``config.pbtxt`` text for graph ``kind`` served by ``backend``."""
    if backend not in BACKENDS:
        raise ExportError(f"Triton backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if max_batch_size < 1:
        raise ExportError(f"Triton max_batch_size must be >= 1, got {max_batch_size}")
    ins, outs = io_dims(kind, config, dense)

    def block(items: list[tuple[str, list[int]]]) -> str:
        return ",\n".join(
            f'  {{\n    name: "{n}"\n    data_type: TYPE_FP32\n    dims: {_dims(d)}\n  }}' for n, d in items
        )

    lines = [
        f'name: "{MODEL_NAMES[kind]}"',
        f'backend: "{backend}"',
        f'default_model_filename: "{_FILES[backend]}"',
        f"max_batch_size: {max_batch_size}",
        f"input [\n{block(ins)}\n]",
        f"output [\n{block(outs)}\n]",
        f"dynamic_batching {{\n  max_queue_delay_microseconds: {queue_delay_us}\n}}",
    ]
    if backend == "tensorrt":  # engines run on the GPU they were built for
        lines.append("instance_group [\n  {\n    count: 1\n    kind: KIND_GPU\n  }\n]")
    return "\n".join(lines) + "\n"


def _model_config_pb2() -> Any:
    """Triton's ``model_config_pb2`` from tritonclient, without importing its gRPC client
    (which would need grpcio): the generated module is loaded from its file."""
    name = "tritonclient.grpc.model_config_pb2"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec("tritonclient")
    if spec is None or not spec.submodule_search_locations:
        raise ExportError("Triton configs are validated with Triton's protobuf: pip install tritonclient")
    path = Path(list(spec.submodule_search_locations)[0]) / "grpc" / "model_config_pb2.py"
    if not path.is_file():
        raise ExportError(f"{path} is missing: reinstall tritonclient")
    own = "_gvsl_triton_model_config_pb2"
    if own in sys.modules:
        return sys.modules[own]
    mod_spec = importlib.util.spec_from_file_location(own, path)
    assert mod_spec is not None and mod_spec.loader is not None
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    sys.modules[own] = module
    return module


def parse_config(text: str, where: str = "config.pbtxt") -> Any:
    """Parse ``text`` into Triton's ``inference.ModelConfig`` (raises :class:`ExportError`)."""
    from google.protobuf import text_format

    pb2 = _model_config_pb2()
    msg = pb2.ModelConfig()
    try:
        text_format.Parse(text, msg)
    except text_format.ParseError as e:
        raise ExportError(f"{where}: not a valid Triton model config ({e})") from None
    return msg


def validate_config(msg: Any, kind: str, config: Any, dense: bool = True, where: str = "config.pbtxt") -> None:
    """Check a parsed config against the graph contract: names, dtypes, dims, batching."""
    pb2 = _model_config_pb2()
    ins, outs = io_dims(kind, config, dense)
    for what, got, want in (("input", msg.input, ins), ("output", msg.output, outs)):
        have = [(t.name, list(t.dims), t.data_type) for t in got]
        expect = [(n, d, pb2.TYPE_FP32) for n, d in want]
        if have != expect:
            raise ExportError(f"{where}: {what}s {have} do not match the graph's {expect}")
    if msg.max_batch_size < 1 or not msg.HasField("dynamic_batching"):
        raise ExportError(f"{where}: needs max_batch_size >= 1 and dynamic_batching")


def write_repo(
    repo: str | Path,
    models: dict[str, Path],
    backend: str,
    config: Any,
    *,
    dense: bool = True,
    max_batch_size: int = 4,
) -> list[Path]:
    """Write ``config.pbtxt`` and ``1/model.*`` for each ``{kind: model file}``; returns the configs.

    Writes into ``repo`` as given: callers build it in a temporary folder and
    rename it into place, so a failure leaves nothing behind.
    """
    repo = Path(repo)
    written = []
    for kind, src in models.items():
        name = MODEL_NAMES[kind]
        text = config_text(kind, backend, config, dense=dense, max_batch_size=max_batch_size)
        validate_config(parse_config(text, f"{name}/config.pbtxt"), kind, config, dense, f"{name}/config.pbtxt")
        (repo / name / "1").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, repo / name / "1" / _FILES[backend])
        (repo / name / "config.pbtxt").write_text(text, encoding="utf-8")
        written.append(repo / name / "config.pbtxt")
    return written


__all__ = ["BACKENDS", "MODEL_NAMES", "config_text", "io_dims", "parse_config", "validate_config", "write_repo"]
