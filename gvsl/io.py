"""Saving and loading GVSL weights without unpickling code.

Our own format is ``model.safetensors`` plus ``model.json`` (model config and
preprocessing) side by side: the JSON rebuilds the network, the safetensors
file fills it, and nothing executes on load. Official ``.pth`` checkpoints are
read with ``torch.load(weights_only=True)``, which refuses pickled code; an
official import records the authors' preprocessing (:data:`OFFICIAL_PREPROCESS`)
and registers with the identity instead of the release's untrained affine head.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from gvsl import __version__
from gvsl.config import ConfigError, ModelConfig
from gvsl.model import GVSL
from gvsl.runtime.atomic import atomic_write, save_text  # the one temp-then-rename writer (torch-free)
from gvsl.runtime.preprocess import PreprocessConfig

__all__ = [
    "OFFICIAL_PREPROCESS",
    "WeightsError",
    "atomic_write",
    "extract_state_dict",
    "load_model",
    "load_official",
    "official_metadata",
    "save_model",
]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "model.json"

#: Preprocessing of the authors' pipeline, as closely as it is known (README, "Official
#: weights"): volumes read as stored (SimpleITK's z, y, x array order, no reorientation),
#: at their own spacing, stored values clipped to [0, 2048] and divided by 2048 -- which is
#: the CT window -1024..1024 HU when the stored values are HU + 1024.
OFFICIAL_PREPROCESS = PreprocessConfig(spacing=None, modality="ct", ct_window=(-1024.0, 1024.0), canonical=False)


class WeightsError(ValueError):
    """Weights that cannot be loaded; the message names the file and the fix."""


def save_model(
    model: GVSL, out_dir: str | Path, preprocess: dict[str, Any] | None = None, extra: dict[str, Any] | None = None
) -> Path:
    """Write ``model.safetensors`` + ``model.json`` into ``out_dir``; returns the folder."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    meta = {
        "format": "gvsl-model",
        "gvsl_version": __version__,
        "model": model.config.to_dict(),
        "preprocess": preprocess or {},
        **(extra or {}),
    }
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    atomic_write(out_dir / WEIGHTS_NAME, lambda p: save_file(state, p, metadata={"gvsl": json.dumps(meta)}))
    save_text(out_dir / CONFIG_NAME, json.dumps(meta, indent=2) + "\n")
    return out_dir


def _read_meta(path: Path) -> dict[str, Any]:
    cfg_path = path / CONFIG_NAME if path.is_dir() else path.with_name(CONFIG_NAME)
    if cfg_path.is_file():
        return json.loads(cfg_path.read_text())
    # fall back to the copy embedded in the safetensors header
    from safetensors import safe_open

    weights = path / WEIGHTS_NAME if path.is_dir() else path
    with safe_open(str(weights), framework="pt") as f:
        embedded = (f.metadata() or {}).get("gvsl")
    if not embedded:
        raise WeightsError(f"{path}: no {CONFIG_NAME} beside the weights and none embedded; re-save the model")
    return json.loads(embedded)


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[GVSL, dict[str, Any]]:
    """Load a model saved by :func:`save_model` (folder or ``.safetensors`` file).

    Also accepts an official ``.pth``/``.pt`` (default widths). Returns
    ``(model, metadata)``; metadata holds ``model`` and ``preprocess``.
    """
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"{path}: no such file or folder; give a gvsl model folder, .safetensors or .pth")
    if path.is_file() and path.suffix in {".pth", ".pt", ".ckpt"}:
        model = load_official(path, map_location=map_location)
        return model, official_metadata(model)
    weights = path / WEIGHTS_NAME if path.is_dir() else path
    if not weights.is_file():
        raise WeightsError(f"{path}: no {WEIGHTS_NAME} inside; train with `gvsl train` or give a .pth")
    try:
        from safetensors.torch import load_file

        meta = _read_meta(path)
        config = ModelConfig.from_dict(meta["model"])
        state = load_file(str(weights), device=str(map_location))
    except (ConfigError, KeyError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path}: model config is unreadable ({e}); re-save the model") from None
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise WeightsError(f"{weights}: not a readable safetensors file ({e}); re-export it") from None
    model = GVSL(config)
    _load_checked(model, state, weights)
    return model.to(map_location), meta


def extract_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """Find the state_dict in a loaded checkpoint: plain, ``{"state_dict": ...}``,
    ``{"model": ...}``, and strip DataParallel/DDP ``module.`` prefixes."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict", "net"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError("checkpoint holds no tensor state_dict")
    out = {}
    for k, v in obj.items():
        while k.startswith("module."):
            k = k[len("module.") :]
        out[k] = v
    return out


def _load_checked(model: GVSL, state: dict[str, torch.Tensor], source: Path) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or bad:
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if bad:
            k = bad[0]
            detail.append(f"{len(bad)} of other shape (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})")
        raise WeightsError(
            f"{source}: weights do not fit widths {list(model.config.widths)}: "
            + "; ".join(detail)
            + " — pass the widths the checkpoint was trained with"
        )
    model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})


def official_metadata(model: GVSL) -> dict[str, Any]:
    """What is recorded about an official checkpoint's import (the ``model.json`` it lacks)."""
    return {"model": model.config.to_dict(), "preprocess": OFFICIAL_PREPROCESS.to_dict()}


def load_official(
    path: str | Path,
    config: ModelConfig | None = None,
    map_location: str | torch.device = "cpu",
    affine_head: str = "identity",
) -> GVSL:
    """Load an authors' ``GVSL_epoch_*.pth`` (``weights_only=True``: no code runs).

    ``affine_head`` is ``identity`` by default: the release's affine head never
    received gradients (GVSL_SPEC §5), so registration uses the identity affine
    and the deformable head alone; ``trained`` applies the head as released.
    Only registration is affected: ``forward`` and ``match`` still run the head.
    The model reads its affine in the ``"official"`` convention whatever
    ``config`` says: the authors trained the head with that quirk.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such checkpoint file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(
            f"{path}: not a loadable PyTorch checkpoint ({first}); give the official GVSL .pth "
            "(pickled code is refused on purpose)"
        ) from None
    try:
        state = extract_state_dict(obj)
    except WeightsError as e:
        raise WeightsError(f"{path}: {e}") from None
    try:
        config = dataclasses.replace(config or ModelConfig(), affine_head=affine_head, affine_convention="official")
    except ConfigError as e:
        raise WeightsError(f"{path}: {e}") from None
    model = GVSL(config)
    _load_checked(model, state, path)
    return model.to(map_location)
