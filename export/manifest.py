"""``manifest.json`` of an export folder and ``describe`` (what ``gvsl info`` prints).

The manifest lists every artifact with its sha256, precision, shapes, the
parity results that admitted it and, for engines, the TensorRT version and
GPU they are bound to. ONNX files are self-describing on their own (their
``metadata_props``); the manifest is the folder-level index.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from gvsl import __version__
from gvsl.export.errors import ExportError
from gvsl.export.source import sha256_file
from gvsl.runtime import artifact

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "gvsl-export"
#: metadata values that hold JSON (decoded by :func:`describe`)
_JSON_KEYS = (artifact.META_MODEL, artifact.META_PREPROCESS, artifact.META_PATCH, artifact.META_EMBEDDING_STATS)


def new_manifest(source: Any, options: dict[str, Any]) -> dict[str, Any]:
    """The manifest skeleton for ``source`` (a :class:`gvsl.export.source.Source`)."""
    return {
        "format": MANIFEST_FORMAT,
        "manifest_version": 1,
        "gvsl_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": {
            "path": str(source.path),
            "kind": source.kind,
            "weights": str(source.weights),
            "weights_sha256": source.weights_sha256,
        },
        "model": source.config.to_dict(),
        "preprocess": source.preprocess.to_dict(),
        "patch_size": list(source.patch_size),
        "patch_size_from": source.patch_size_from,
        # per-channel statistics of the raw embedding (gvsl embed-stats); None: the runtime returns it raw
        "embedding_stats": source.embedding_stats,
        "options": options,
        "artifacts": [],
        "triton": None,
    }


def file_entry(path: Path, **fields: Any) -> dict[str, Any]:
    """An artifact entry: file name, size, sha256 plus ``fields``."""
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path), **fields}


def write_manifest(folder: Path, manifest: dict[str, Any]) -> Path:
    path = Path(folder) / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path


def read_manifest(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST_NAME
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"{path}: unreadable manifest ({e}); re-run gvsl export") from None
    if data.get("format") != MANIFEST_FORMAT:
        raise ExportError(f"{path}: not a gvsl export manifest")
    return data


def describe(path: str | Path) -> dict[str, Any]:
    """What an artifact is: ONNX graph, TensorRT engine, Triton config or export folder."""
    path = Path(path)
    if not path.exists():
        raise ExportError(
            f"{path}: no such file or folder; give an .onnx, .engine/.plan, config.pbtxt or export folder"
        )
    if path.is_dir():
        if (path / MANIFEST_NAME).is_file():
            return {"type": "export folder", "path": str(path), "manifest": read_manifest(path)}
        raise ExportError(f"{path}: no {MANIFEST_NAME} inside; give an artifact file or a gvsl export folder")
    if path.suffix == ".onnx":
        return _describe_onnx(path)
    if path.suffix in (".engine", ".plan"):
        return _describe_engine(path)
    if path.name.endswith(".pbtxt"):
        from gvsl.export.triton import parse_config

        msg = parse_config(path.read_text(), str(path))
        return {
            "type": "Triton model config",
            "path": str(path),
            "name": msg.name,
            "backend": msg.backend or msg.platform,
            "max_batch_size": msg.max_batch_size,
            "inputs": {t.name: list(t.dims) for t in msg.input},
            "outputs": {t.name: list(t.dims) for t in msg.output},
        }
    raise ExportError(f"{path}: unknown artifact type; give an .onnx, .engine/.plan, config.pbtxt or export folder")


def _describe_onnx(path: Path) -> dict[str, Any]:
    import onnx

    from gvsl.export.onnx_export import graph_io
    from gvsl.export.trt_check import check_tensorrt

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise ExportError(f"{path}: not a readable ONNX file ({type(e).__name__}); re-export it") from None
    meta: dict[str, Any] = {}
    for p in proto.metadata_props:
        try:
            meta[p.key] = json.loads(p.value) if p.key in _JSON_KEYS else p.value
        except json.JSONDecodeError:
            meta[p.key] = p.value
    issues = check_tensorrt(proto)
    return {
        "type": "ONNX graph",
        "path": str(path),
        "sha256": sha256_file(path),
        "bytes": path.stat().st_size,
        "opset": {o.domain or "ai.onnx": o.version for o in proto.opset_import},
        "nodes": len(proto.graph.node),
        **graph_io(proto),
        "metadata": meta,
        "tensorrt_compatible": not issues,
        "tensorrt_issues": [str(i) for i in issues[:5]],
    }


def _describe_engine(path: Path) -> dict[str, Any]:
    out: dict[str, Any] = {
        "type": "TensorRT engine",
        "path": str(path),
        "sha256": sha256_file(path),
        "bytes": path.stat().st_size,
    }
    man = path.parent / MANIFEST_NAME
    if man.is_file():
        for entry in read_manifest(path.parent).get("artifacts", []):
            if entry.get("file") == path.name:
                out["manifest"] = entry
                if entry.get("sha256") != out["sha256"]:
                    out["warning"] = "sha256 differs from manifest.json: the file was changed after export"
    if "manifest" not in out:
        out["note"] = "no manifest entry beside it; the file name records precision, GPU (smXY) and TensorRT version"
    return out


__all__ = ["MANIFEST_NAME", "describe", "file_entry", "new_manifest", "read_manifest", "write_manifest"]
