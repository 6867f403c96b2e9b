"""Which file is a model, and what it says about itself.

A model is an export folder (``manifest.json`` with ``encoder.onnx`` /
``registration.onnx`` and, with ``--format engine``, TensorRT ``.engine``
files from ``gvsl export``), one of those files, or for the torch backend a
model folder from ``gvsl train`` or an official ``.pth``. Anything else is a
:class:`GvslInputError` naming the file. An exported ONNX graph carries its
model configuration, preprocessing and patch size in ``metadata_props``; an
engine's are in the manifest beside it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from .. import artifact
from ..errors import GvslInputError
from ..preprocess_config import PreprocessConfig
from ..windows import SIZE_MULTIPLE
from .base import DEFAULT_PATCH, GRAPH_IO, ModelInfo

ONNX_NAMES = {
    artifact.ENCODER: "encoder.onnx",
    artifact.REGISTRATION: "registration.onnx",
    artifact.REFINE: "refine.onnx",
    artifact.REFINE_AFFINE: "refine_affine.onnx",
    artifact.REFINE_MI: "refine_mi.onnx",
}
TORCH_SUFFIXES = (".pth", ".pt", ".ckpt", ".safetensors")
ENGINE_SUFFIXES = (".engine", ".plan")


def info_from_metadata(meta: Mapping[str, str], path: Path, want_kind: str) -> ModelInfo:
    """Validate gvsl ONNX metadata_props and turn them into a :class:`ModelInfo`."""
    name = str(path)
    if meta.get(artifact.META_FORMAT) != artifact.FORMAT and artifact.META_MODEL not in meta:
        raise GvslInputError(
            f"{name}: an ONNX graph but not a gvsl artifact (no gvsl metadata); export the model with `gvsl export`",
            name,
        )
    kind = meta.get(artifact.META_KIND, "")
    if kind != want_kind:
        raise GvslInputError(
            f"{name}: is a gvsl {kind or 'unknown'} graph, but this needs the {want_kind} graph "
            f"({ONNX_NAMES[want_kind]}); pass the export folder or that file",
            name,
        )
    # a refine graph has no learned weights: its constants are all it describes
    if kind in (artifact.REFINE, artifact.REFINE_MI, artifact.REFINE_AFFINE):
        try:
            settings = json.loads(meta.get(artifact.META_REFINE) or "{}")
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
            precision=meta.get(artifact.META_PRECISION, "fp32"),
            version=meta.get(artifact.META_VERSION, ""),
            extra={"refine": settings},
        )
    info = _learned_model_info(
        name,
        kind,
        lambda: (
            json.loads(meta[artifact.META_MODEL]),
            json.loads(meta.get(artifact.META_PREPROCESS) or "{}"),
            json.loads(meta.get(artifact.META_PATCH) or "null"),
        ),
        "gvsl metadata is damaged ({error}); export the model again",
    )
    return replace(
        info,
        dense=meta.get(artifact.META_DENSE, "true").lower() == "true",
        precision=meta.get(artifact.META_PRECISION, "fp32"),
        warp=meta.get(artifact.META_WARP, ""),
        weights_sha256=meta.get(artifact.META_WEIGHTS_SHA, ""),
        version=meta.get(artifact.META_VERSION, ""),
        # the JSON text; gvsl.runtime.embed.EmbeddingStats validates it where it is used
        extra={"embedding_stats": meta[artifact.META_EMBEDDING_STATS]} if artifact.META_EMBEDDING_STATS in meta else {},
    )


def _learned_model_info(name: str, kind: str, read: Callable[[], tuple[Any, Any, Any]], damaged: str) -> ModelInfo:
    """The :class:`ModelInfo` of a graph with learned weights, wherever its record is stored
    (ONNX metadata, or the export manifest beside an engine), validated one way.

    ``read()`` returns the stored model configuration, preprocessing dict and patch size
    (None: :data:`DEFAULT_PATCH`); whatever it or the checks raise becomes one
    :class:`GvslInputError` from ``damaged``, a sentence with an ``{error}`` slot that names
    the store and its fix. The other fields keep their defaults: each store records them
    in its own way, and its caller sets them once the record is known to be sound.
    """
    try:
        model, preprocess, patch_size = read()
        if len([int(w) for w in model["widths"]]) != 9:
            raise ValueError("widths must have 9 entries")
        pre = PreprocessConfig.from_dict(preprocess)
        patch = tuple(int(p) for p in patch_size or DEFAULT_PATCH)
        if len(patch) != 3 or min(patch) < SIZE_MULTIPLE or any(p % SIZE_MULTIPLE for p in patch):
            raise ValueError(f"bad patch size {patch}")
    except (KeyError, TypeError, ValueError) as e:
        raise GvslInputError(f"{name}: " + damaged.format(error=f"{type(e).__name__}: {e}"), name) from None
    return ModelInfo(kind=kind, path=name, model=model, preprocess=pre, patch_size=patch)  # type: ignore[arg-type]


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
            raise not_onnx_error(p, e) from None
        return {m.key: m.value for m in proto.metadata_props}
    ort = import_onnxruntime()
    try:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sess = ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise not_onnx_error(p, e) from None
    return dict(sess.get_modelmeta().custom_metadata_map)


def not_onnx_error(p: Path, e: BaseException) -> GvslInputError:
    msg = " ".join(str(e).split())[:160] or type(e).__name__
    return GvslInputError(
        f"{p}: not a readable ONNX model ({msg}); give the encoder.onnx / registration.onnx written by `gvsl export`",
        str(p),
    )


def resolve_model_file(model: str | os.PathLike[str], kind: str) -> tuple[Path, str]:
    """Find the file to run for ``kind``: returns ``(path, "onnx" | "engine" | "torch")``.

    Accepts an export folder, a ``.onnx`` or ``.engine`` file, or a trained
    model folder / ``.safetensors`` / ``.pth`` (torch only). An export folder
    with engines but no ONNX graph for ``kind`` resolves to the folder itself
    with format ``"engine"`` (the TensorRT backend picks the engine built for
    this GPU from its manifest).
    """
    if kind not in GRAPH_IO:
        raise ValueError(f"kind must be one of {', '.join(map(repr, GRAPH_IO))}, got {kind!r}")
    p = Path(model)
    name = str(model)
    if not p.exists():
        raise GvslInputError(f"{name}: model not found; give the folder written by `gvsl export`", name)
    if p.is_dir():
        manifest = p / "manifest.json"
        candidate = p / ONNX_NAMES[kind]
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
        if manifest.is_file() and manifest_engines(p, kind):
            return p, "engine"
        if (p / "model.safetensors").is_file():
            return p, "torch"
        if (p / "model" / "model.safetensors").is_file():  # a `gvsl train` run folder
            return p / "model", "torch"
        if manifest.is_file() or any(p.glob("*.onnx")):
            raise GvslInputError(f"{name}: export folder has no {ONNX_NAMES[kind]}; export the {kind} graph too", name)
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
    if low.endswith(TORCH_SUFFIXES):
        return p, "torch"
    if low.endswith(ENGINE_SUFFIXES):
        return p, "engine"
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


def import_onnxruntime() -> Any:
    try:
        import onnxruntime as ort
    except ImportError:
        raise GvslInputError(
            "onnxruntime is not installed: pip install 'gvsl[cpu]' (or 'gvsl[gpu]' for CUDA/TensorRT)"
        ) from None
    return ort


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """``folder/manifest.json`` as a dict, None when there is none; damaged is a one-line error."""
    path = folder / "manifest.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise GvslInputError(f"{path}: unreadable export manifest ({e}); export the model again", str(path)) from None
    if not isinstance(data, dict):
        raise GvslInputError(f"{path}: not a gvsl export manifest; export the model again", str(path))
    return data


def manifest_engines(folder: Path, kind: str) -> list[dict[str, Any]]:
    """The manifest's TensorRT engine entries for ``kind`` (``gvsl export --format engine``)."""
    manifest = read_manifest(folder) or {}
    entries = manifest.get("artifacts")
    if not isinstance(entries, list):
        return []
    return [
        e
        for e in entries
        if isinstance(e, dict)
        and e.get("format") == "engine"
        and e.get("kind") == kind
        and isinstance(e.get("file"), str)
    ]


def info_from_manifest(manifest: Mapping[str, Any], path: Path, kind: str, entry: Mapping[str, Any]) -> ModelInfo:
    """:class:`ModelInfo` of an engine from its export manifest (engines carry no gvsl metadata)."""
    info = _learned_model_info(
        str(path),
        kind,
        lambda: (dict(manifest["model"]), manifest.get("preprocess") or {}, manifest.get("patch_size")),
        "the export manifest beside this engine is damaged ({error}); export it again",
    )
    return replace(
        info,
        dense=True,
        precision=str(entry.get("precision", "fp32")),
        warp="gather",
        weights_sha256=str((manifest.get("source") or {}).get("weights_sha256", "")),
        version=str(manifest.get("gvsl_version", "")),
        extra={"engine": dict(entry), "embedding_stats": manifest.get("embedding_stats")},
    )


__all__ = [
    "ENGINE_SUFFIXES",
    "ONNX_NAMES",
    "TORCH_SUFFIXES",
    "import_onnxruntime",
    "info_from_manifest",
    "info_from_metadata",
    "manifest_engines",
    "not_onnx_error",
    "read_manifest",
    "read_onnx_metadata",
    "resolve_model_file",
]
