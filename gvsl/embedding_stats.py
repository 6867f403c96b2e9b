"""Statistics of the raw pooled embedding over pre-training-like data, stored with the weights.

The encoder's raw global embedding is the mean of non-negative GroupNorm/ReLU
bottleneck activations: its common component dwarfs what differs between scans,
so the cosine of any two scans is ~1. Per-channel standardisation with the mean
and std of that raw vector over the data the model was pre-trained on makes the
cosine measure what differs (EVALUATION.md, "Embeddings").
:func:`gather_embedding_stats` computes them exactly as the runtime computes
embeddings (the :class:`gvsl.runtime.embed.Embedder`, torch backend): volumes
are preprocessed and windowed like any input; synthetic draws (the training
generator, :mod:`gvsl.generator`) come at the training patch size, normalised
for their drawn modality, i.e. one window each, as training sees them.
:func:`write_embedding_stats` stores the block under ``"embedding_stats"`` in
``model.json`` and in the safetensors header copy; ``gvsl export`` carries it
into the encoder's ONNX metadata and ``manifest.json``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from gvsl.runtime.embed import Embedder, EmbeddingStats
from gvsl.runtime.errors import GvslInputError

__all__ = ["STATS_KEY", "gather_embedding_stats", "model_files", "synthetic_volumes", "write_embedding_stats"]

#: model.json key of the block
STATS_KEY = "embedding_stats"
#: std floor, relative to the largest channel std: a dead channel (always 0) stays ~0, not inf
STD_FLOOR = 1e-3


def synthetic_volumes(recipe: str | Path, n: int, patch_size: tuple[int, int, int], preprocess: Any, seed: int = 0):
    """``n`` synthetic subjects from the training generator ``recipe`` (a recipe name or
    file), each at ``patch_size`` and normalised like a training input; yields
    ``(array [D, H, W] float32, label)``."""
    from gvsl.generator import SynthGenerator, load_recipe

    spacing = None
    if preprocess.spacing is not None:
        if len(set(preprocess.spacing)) != 1:
            raise GvslInputError(f"spacing {preprocess.spacing}: the generator draws isotropic grids only")
        spacing = preprocess.spacing[0]
    generator = SynthGenerator(load_recipe(recipe), spacing=spacing)
    rng = np.random.default_rng(seed)
    for k in range(n):
        draw = generator.draw(rng, tuple(patch_size))
        yield generator.normalised(draw, preprocess), f"synth:{k}:{draw.params.get('source', '')}:{draw.modality}"


def gather_embedding_stats(
    model: str | Path | Embedder,
    volumes: Iterable[Any] = (),
    *,
    synth: str | Path | None = None,
    n: int = 256,
    seed: int = 0,
    backend: str = "torch",
    device: str = "auto",
) -> EmbeddingStats:
    """Mean and std of the raw pooled embedding of ``model`` over ``volumes`` (paths,
    DICOM folders, ``(array, affine)``) and ``n`` draws of recipe ``synth``.

    ``model`` is a trained model folder (torch backend) or an export folder, or an
    :class:`Embedder`. The std of each channel is floored at ``STD_FLOOR`` times the
    largest one, so a channel that never varies does not divide by zero.
    """
    embedder = model if isinstance(model, Embedder) else Embedder(model, backend, device, embedding="raw")
    rows: list[np.ndarray] = []
    sources: list[str] = []
    volumes = list(volumes)
    for vol in volumes:
        rows.append(embedder.embed(vol).embedding_raw)
    if volumes:
        sources.append(f"{len(volumes)} volumes")
    if synth is not None:
        if n < 1:
            raise GvslInputError(f"--n {n}: draw at least one synthetic subject")
        backend_ = embedder.backend
        for image, _ in synthetic_volumes(synth, n, embedder.info.patch_size, embedder.info.preprocess, seed):
            out = backend_.run({"image": image[None, None].astype(np.float32)}, ["embedding"])
            rows.append(out["embedding"][0].astype(np.float32))
        sources.append(f"{n} draws of recipe {Path(str(synth)).name} (seed {seed})")
    if len(rows) < 2:
        raise GvslInputError("embedding statistics need at least 2 volumes or synthetic draws; give DATA or --synth")
    table = np.stack(rows).astype(np.float64)
    mean = table.mean(axis=0)
    std = table.std(axis=0)
    std = np.maximum(std, STD_FLOOR * float(std.max()) + 1e-12)
    return EmbeddingStats(mean=mean, std=std, n=len(rows), source="; ".join(sources))


def model_files(model_dir: str | Path) -> tuple[Path, Path]:
    """``(model.json, model.safetensors)`` of a trained model folder; anything else is one line."""
    from gvsl.io import CONFIG_NAME, WEIGHTS_NAME

    folder = Path(model_dir)
    if not folder.is_dir() or not (folder / WEIGHTS_NAME).is_file():
        raise GvslInputError(
            f"{folder}: not a gvsl model folder (no {WEIGHTS_NAME}); give the folder `gvsl train` wrote "
            "(a run folder's model/)",
            folder,
        )
    return folder / CONFIG_NAME, folder / WEIGHTS_NAME


def write_embedding_stats(model_dir: str | Path, stats: EmbeddingStats) -> Path:
    """Store ``stats`` under ``"embedding_stats"`` in ``model_dir``'s ``model.json`` and in the
    metadata copy inside ``model.safetensors`` (both written atomically; the tensors are
    unchanged, but the file's sha256 changes, so re-export). Returns the model.json path."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from gvsl.io import atomic_write, save_text

    cfg, weights = model_files(model_dir)
    with safe_open(str(weights), framework="pt") as f:
        header = dict(f.metadata() or {})
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iteration
    try:
        meta = json.loads(cfg.read_text()) if cfg.is_file() else json.loads(header.get("gvsl") or "{}")
    except (OSError, ValueError) as e:
        raise GvslInputError(f"{cfg}: unreadable model config ({e}); re-save the model", cfg) from None
    meta[STATS_KEY] = stats.to_dict()
    header["gvsl"] = json.dumps(meta)
    atomic_write(weights, lambda p: save_file(state, p, metadata=header))
    save_text(cfg, json.dumps(meta, indent=2) + "\n")
    return cfg
