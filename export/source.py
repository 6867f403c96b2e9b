"""What ``gvsl export`` reads: a run folder, a gvsl safetensors model or an official ``.pth``.

Everything the artifacts must carry about their origin is gathered here once:
the network, its configuration, the preprocessing it was trained with, the
training patch size (the runtime's sliding-window size) and the sha256 of the
weights file, so an artifact can always be traced back to its weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gvsl.config import SIZE_MULTIPLE, ConfigError, ModelConfig
from gvsl.export.errors import ExportError
from gvsl.runtime.backends.base import file_sha256
from gvsl.runtime.preprocess import PreprocessConfig

#: Patch size recorded when the source does not say (official checkpoints, old models).
DEFAULT_PATCH_SIZE: tuple[int, int, int] = (128, 128, 128)

OFFICIAL_SUFFIXES = (".pth", ".pt", ".ckpt")


@dataclass
class Source:
    """A loaded model plus the facts the exported artifacts record about it."""

    model: Any  # gvsl.model.GVSL, eval mode, CPU, float32
    config: ModelConfig
    preprocess: PreprocessConfig
    patch_size: tuple[int, int, int]
    patch_size_from: str  # "model.json" | "default"
    weights: Path  # the weights file that was read
    weights_sha256: str
    kind: str  # "safetensors" | "official-pth"
    path: Path  # what the user gave
    #: model.json's "embedding_stats" block (gvsl embed-stats), carried into the encoder's metadata
    embedding_stats: dict[str, Any] | None = None


#: Hex sha256 of a file, read in 1 MiB pieces (engines and weights can be GBs): the runtime's one helper.
sha256_file = file_sha256


def resolve_weights(path: Path) -> tuple[Path, str]:
    """Map SOURCE to (weights file or model folder, kind); error names what was expected."""
    if not path.exists():
        raise ExportError(
            f"{path}: no such file or folder; give a run folder, a model.safetensors (or its folder) "
            "or an official .pth"
        )
    if path.is_file():
        if path.suffix in OFFICIAL_SUFFIXES:
            return path, "official-pth"
        if path.suffix == ".safetensors":
            return path, "safetensors"
        raise ExportError(f"{path}: not a model file; give a .safetensors model, a gvsl run folder or an official .pth")
    for cand in (path / "model.safetensors", path / "model" / "model.safetensors"):
        if cand.is_file():
            return cand.parent, "safetensors"
    if (path / "checkpoints").is_dir():
        raise ExportError(
            f"{path}: run has no final model (model/model.safetensors); let `gvsl train` finish "
            "(or resume it) before exporting"
        )
    raise ExportError(
        f"{path}: no model.safetensors inside; give a gvsl run folder, a model folder or an official .pth"
    )


def load_source(path: str | Path, widths: str | None = None, official_affine: bool = False) -> Source:
    """Load SOURCE for export. ``widths`` (preset or nine numbers) only matters for
    ``.pth`` files, which carry no configuration; for gvsl models it must agree
    with ``model.json``. An official ``.pth`` gets the authors' preprocessing and
    the identity affine in registration, unless ``official_affine`` asks for the
    released (untrained) affine head."""
    from gvsl.io import WeightsError, load_model, load_official, official_metadata

    path = Path(path)
    target, kind = resolve_weights(path)
    try:
        cfg_override = ModelConfig.from_preset(widths) if widths else None
    except ConfigError as e:
        raise ExportError(f"--widths: {e}") from None
    meta: dict[str, Any] = {}
    try:
        if kind == "official-pth":
            model = load_official(target, config=cfg_override, affine_head="trained" if official_affine else "identity")
            meta = official_metadata(model)
            weights = target
        else:
            if official_affine:
                raise ExportError(
                    f"{path}: --official-affine is for official .pth checkpoints; drop it for gvsl models"
                )
            model, meta = load_model(target)
            weights = target / "model.safetensors" if target.is_dir() else target
            if cfg_override is not None and cfg_override.widths != model.config.widths:
                raise ExportError(
                    f"{path}: --widths {list(cfg_override.widths)} do not match the model's "
                    f"{list(model.config.widths)} (model.json); drop --widths for gvsl models"
                )
    except WeightsError as e:
        raise ExportError(str(e)) from None
    model = model.float().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        pre = PreprocessConfig.from_dict(meta.get("preprocess") or {})
    except (TypeError, ValueError) as e:
        raise ExportError(f"{path}: preprocessing in model.json is unreadable ({e}); re-save the model") from None
    patch = meta.get("patch_size")
    if patch is not None:
        try:
            patch_t = tuple(int(p) for p in patch)
            if len(patch_t) != 3 or any(p <= 0 or p % SIZE_MULTIPLE for p in patch_t):
                raise ValueError
        except (TypeError, ValueError):
            raise ExportError(
                f"{path}: model.json patch_size {patch!r} is not three multiples of 16; fix or remove it"
            ) from None
        patch_from = "model.json"
    else:
        patch_t, patch_from = DEFAULT_PATCH_SIZE, "default"
    stats = meta.get("embedding_stats")
    if stats is not None:
        from gvsl.runtime.embed import EmbeddingStats
        from gvsl.runtime.errors import GvslInputError

        try:
            stats = EmbeddingStats.from_dict(stats, f"{path} (model.json)", int(model.config.widths[4])).to_dict()
        except GvslInputError as e:
            raise ExportError(str(e)) from None
    return Source(
        model=model,
        config=model.config,
        preprocess=pre,
        patch_size=patch_t,  # type: ignore[arg-type]
        patch_size_from=patch_from,
        weights=weights,
        weights_sha256=sha256_file(weights),
        kind=kind,
        path=path,
        embedding_stats=stats,
    )


__all__ = ["DEFAULT_PATCH_SIZE", "Source", "load_source", "resolve_weights", "sha256_file"]
