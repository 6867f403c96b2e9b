"""``Embedder``: GVSL embeddings (and dense features) of whole volumes, torch-free.

Pipeline for one volume (the same functions training uses):

1. read & validate (NIfTI, DICOM folder or ``(array, affine)``);
2. :func:`gvsl.runtime.preprocess.preprocess` with the model's own settings
   (RAS+ reorientation, resampling, intensity normalisation), then
   :func:`pad_to_multiple` (16, zeros, centred);
3. the encoder graph on **sliding windows** of the training patch size
   whenever the padded volume is larger than the patch along any axis
   (windows cover the volume, start and end flush with it, overlap
   ``overlap`` of the window; along axes shorter than the patch the window
   is the whole axis). Windows run ``window_batch`` at a time, so memory is one
   batch of windows plus the output accumulators, whatever the volume size;
4. **global embedding** = the mean of the window embeddings. Every window has
   the same size, so this is exactly global average pooling of the
   bottleneck over all windows (overlapping regions count once per window
   that sees them). For a volume that fits in one patch it is the model's own
   pooled embedding of the padded volume. This *raw* pooled bottleneck is
   then **standardised** per channel, ``(raw - mean) / std``, with the
   statistics the model carries (:class:`EmbeddingStats`, gathered over
   pre-training-like data by ``gvsl embed-stats``): the raw vector is a mean of
   non-negative GroupNorm/ReLU activations whose common component dwarfs what
   differs between scans (cosines of any two scans are ~1), while the
   standardised one measures each channel against its spread over the training
   distribution, so cosine similarity separates scans (EVALUATION.md,
   "Embeddings"). ``embedding="raw"`` keeps the raw vector; a model without
   statistics (older exports) returns the raw vector with one warning;
5. **dense features** (on request) = the windows' ``features`` blended with a
   Gaussian weight (σ = window/8 per axis, the nnU-Net choice: centres of
   windows, where context is complete, dominate), cropped from the padding,
   and resampled (trilinear) from the model grid to the **input's own grid**,
   returned with the input's affine; or left on the model grid
   (``grid="model"``) with that grid's affine, which is cheaper.

One ``Embedder`` is safe to share between threads: it keeps no per-call state
and the backends' ``run`` is thread-safe.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import artifact, cpu_pool
from .backends import Backend, ModelInfo, load_backend
from .errors import GvslInputError
from .io import DEFAULT_MAX_VOXELS, VolumeLike, read_volume
from .padding import pad_to_multiple, unpad
from .preprocess import load_preprocessed, preprocess
from .preprocess_config import PreprocessConfig, with_modality
from .volume import Volume
from .warp import resample_to_grid
from .windows import SIZE_MULTIPLE, gaussian_weight, window_slices, window_starts

__all__ = [
    "EMBEDDING_MODES",
    "Embedder",
    "Embedding",
    "EmbeddingStats",
    "embedding_stats_of",
    "gaussian_weight",
    "window_starts",
]

#: what ``Embedding.embedding`` holds: the standardised vector (default) or the raw pooled bottleneck
EMBEDDING_MODES = ("standardised", "raw")


@dataclass(frozen=True)
class EmbeddingStats:
    """Per-channel mean and std of the raw pooled embedding over pre-training-like data.

    Stored with the weights (``model.json`` key ``embedding_stats``), in the encoder's
    ONNX metadata (:data:`gvsl.runtime.artifact.META_EMBEDDING_STATS`) and in the
    export manifest, so every backend and ``gvsl serve`` standardise the same way.
    ``n`` = how many volumes they were gathered over, ``source`` = what those were.
    """

    mean: np.ndarray
    std: np.ndarray
    n: int = 0
    source: str = ""

    @classmethod
    def from_dict(cls, block: Any, where: str, dim: int | None = None) -> EmbeddingStats:
        """Validate a stored block (a dict, or its JSON text); a damaged one is a one-line
        :class:`GvslInputError` naming ``where`` and the fix."""
        fix = "gather them again with `gvsl embed-stats MODEL_DIR` (then re-export)"
        try:
            if isinstance(block, str):
                block = json.loads(block)
            if not isinstance(block, Mapping):
                raise ValueError("not a JSON object")
            mean = np.asarray(block["mean"], dtype=np.float64)
            std = np.asarray(block["std"], dtype=np.float64)
            if mean.ndim != 1 or mean.shape != std.shape:
                raise ValueError(f"mean {mean.shape} and std {std.shape} must be vectors of one length")
            if dim is not None and mean.shape[0] != dim:
                raise ValueError(f"{mean.shape[0]} channels but the model's embedding has {dim}")
            if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
                raise ValueError("values must be finite and std > 0")
            n = int(block.get("n", 0))
            source = str(block.get("source", ""))
        except (KeyError, TypeError, ValueError) as e:
            raise GvslInputError(f"{where}: embedding statistics are damaged ({e}); {fix}", where) from None
        return cls(mean=mean, std=std, n=n, source=source)

    def to_dict(self) -> dict[str, Any]:
        """The stored (JSON) form: lists of floats, ``n``, ``source``."""
        return {
            "mean": [float(v) for v in self.mean],
            "std": [float(v) for v in self.std],
            "n": int(self.n),
            "source": self.source,
        }

    def standardise(self, raw: np.ndarray) -> np.ndarray:
        """``(raw - mean) / std`` along the last axis, float32."""
        return ((np.asarray(raw, dtype=np.float64) - self.mean) / self.std).astype(np.float32)


def embedding_stats_of(info: ModelInfo) -> EmbeddingStats | None:
    """The statistics a model carries (its ``ModelInfo.extra["embedding_stats"]``, which every
    backend fills from the artifact), or None when it has none."""
    block = info.extra.get("embedding_stats")
    if block is None:
        return None
    dim = info.embedding_dim if info.model.get("widths") else None
    return EmbeddingStats.from_dict(block, info.path, dim)


def _warn_no_stats(path: str) -> None:
    # warnings' default filter shows one message once per process: one line per model
    warnings.warn(
        f"{path}: the model has no embedding statistics, so embeddings are the raw pooled bottleneck "
        "(cosines near 1 for any two scans); fix: `gvsl embed-stats MODEL_DIR` on the trained model, then "
        "`gvsl export` again",
        UserWarning,
        stacklevel=3,
    )


@dataclass
class Embedding:
    """Result of :meth:`Embedder.embed`.

    ``embedding`` ``[C]`` float32: the standardised embedding, or the raw one when
    the embedder was asked for ``embedding="raw"`` or the model has no statistics
    (``standardised`` says which); ``embedding_raw`` ``[C]`` the raw pooled
    bottleneck (None when a server does not send it); ``features``
    ``[F, X, Y, Z]`` float32 on the grid given by ``affine`` (the input's grid
    unless ``grid="model"``) or None; ``windows`` = how many encoder windows were run.
    """

    embedding: np.ndarray
    features: np.ndarray | None
    affine: np.ndarray
    source: str
    windows: int
    model_shape: tuple[int, int, int]
    #: how the volume was normalised ("ct" / "mr" / "none"): what ``--modality auto`` decided
    modality: str | None = None
    #: the raw pooled bottleneck (mean of the window embeddings)
    embedding_raw: np.ndarray | None = None
    #: whether ``embedding`` is standardised with the model's statistics
    standardised: bool = False


class Embedder:
    """Global embeddings and dense features of volumes from a gvsl encoder.

    ``model``: export folder / ``encoder.onnx`` (onnxruntime, tensorrt) or a
    trained model folder / ``.pth`` (torch). ``backend``: auto, onnxruntime,
    tensorrt, torch; ``device``: auto, cpu, cuda, cuda:N. ``overlap`` of
    sliding windows (0 <= overlap < 1), ``window_batch`` windows per call,
    ``max_voxels`` per input volume. ``modality`` overrides the model's
    normalisation (default "auto", as ``gvsl embed``: decided per volume; ct, mr, none;
    None keeps the model's). ``embedding``:
    ``"standardised"`` (default: ``(raw - mean) / std`` with the model's
    statistics; raw with one warning when it has none) or ``"raw"`` (the pooled
    bottleneck); both are in every :class:`Embedding`. Extra keywords go
    to the backend (``threads``, ``cache_dir``, ``max_contexts``, ``allow_cpu_fallback`` ...);
    ``threads`` (>= 1; 0 or None = every core up to 16) also sizes the
    process's one CPU pool for preprocessing (:mod:`gvsl.runtime.cpu_pool`).
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | Backend,
        backend: str = "auto",
        device: str = "auto",
        *,
        overlap: float = 0.5,
        window_batch: int = 1,
        max_voxels: int | None = DEFAULT_MAX_VOXELS,
        modality: str | None = "auto",
        embedding: str = "standardised",
        **backend_options: Any,
    ) -> None:
        if embedding not in EMBEDDING_MODES:
            raise GvslInputError(f"embedding must be one of {', '.join(EMBEDDING_MODES)}, got {embedding!r}")
        if not 0.0 <= overlap < 1.0:
            raise GvslInputError(f"overlap must be in [0, 1), got {overlap}")
        if window_batch < 1:
            raise GvslInputError(f"window_batch must be >= 1, got {window_batch}")
        if backend_options.get("threads") is not None:
            cpu_pool.set_threads(backend_options["threads"])
        if isinstance(model, Backend):
            self.backend = model
        else:
            self.backend = load_backend(
                model, artifact.ENCODER, backend, device, max_batch=window_batch, **backend_options
            )
        if self.backend.info.kind != artifact.ENCODER:
            raise GvslInputError(f"{self.backend.info.path}: not an encoder graph", self.backend.info.path)
        self.overlap = float(overlap)
        self.window_batch = int(window_batch)
        self.max_voxels = max_voxels
        #: the preprocessing this embedder applies: the model's, with ``modality`` if given
        self.preprocess: PreprocessConfig = with_modality(self.info.preprocess, modality)
        #: the model's embedding statistics (None: it has none)
        self.stats: EmbeddingStats | None = embedding_stats_of(self.info)
        #: what ``Embedding.embedding`` holds: "standardised" or "raw"
        self.embedding = embedding if self.stats is not None else "raw"
        if embedding == "standardised" and self.stats is None:
            _warn_no_stats(self.info.path)

    @property
    def info(self) -> ModelInfo:
        return self.backend.info

    @property
    def has_dense(self) -> bool:
        return "features" in self.backend.output_names

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> Embedder:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ steps
    def prepare(self, x: VolumeLike) -> tuple[Volume, Volume]:
        """(original volume, preprocessed volume) — reading and preprocessing only, so
        callers can prefetch the next input while the current one runs."""
        # the original's voxels are only preprocessed here (its grid is what is kept), so
        # integer files stay integer and are converted while they are resampled; a NIfTI
        # file is inflated and resampled at once (load_preprocessed)
        if isinstance(x, str | os.PathLike) and Path(x).is_file():
            return load_preprocessed(x, self.preprocess, max_voxels=self.max_voxels)
        vol = read_volume(x, max_voxels=self.max_voxels, keep_dtype=True)
        return vol, preprocess(vol, self.preprocess)

    def windows(self, shape: Sequence[int]) -> tuple[tuple[int, int, int], list[tuple[slice, slice, slice]]]:
        """(window size, window slices) for a padded volume of ``shape``."""
        return window_slices(shape, self.info.patch_size, self.overlap)

    def _batches(self, padded: np.ndarray, slices: list) -> Iterator[tuple[list, np.ndarray]]:
        for k in range(0, len(slices), self.window_batch):
            group = slices[k : k + self.window_batch]
            yield group, np.stack([padded[s] for s in group])[:, None]

    # ------------------------------------------------------------------ main
    def embed(self, x: VolumeLike, dense: bool = False, grid: str = "input") -> Embedding:
        """Embed one volume (path, DICOM folder, ``(array, affine)`` or Volume).

        ``dense=True`` also returns the local feature map on the input's grid
        (``grid="input"``) or the model's preprocessed grid (``grid="model"``).
        """
        if grid not in ("input", "model"):
            raise GvslInputError(f"grid must be 'input' or 'model', got {grid!r}")
        if dense and not self.has_dense:
            raise GvslInputError(
                f"{self.info.path}: this encoder was exported without dense features; re-export it with "
                "dense features to use --dense",
                self.info.path,
            )
        vol, pre = self.prepare(x)
        return self.embed_prepared(vol, pre, dense=dense, grid=grid)

    def embed_prepared(self, vol: Volume, pre: Volume, dense: bool = False, grid: str = "input") -> Embedding:
        """Second half of :meth:`embed`, on the output of :meth:`prepare`."""
        padded, pads = pad_to_multiple(pre.data, SIZE_MULTIPLE)
        win, slices = self.windows(padded.shape)
        want = ["embedding", "features"] if dense else ["embedding"]
        emb_sum: np.ndarray | None = None
        acc = wsum = weight = None
        if dense:
            acc = np.zeros((self.info.feature_dim, *padded.shape), dtype=np.float32)
            if len(slices) > 1:
                wsum = np.zeros(padded.shape, dtype=np.float32)
                weight = gaussian_weight(win)
        for group, batch in self._batches(padded, slices):
            out = self.backend.run({"image": batch}, want)
            e = out["embedding"].astype(np.float64).sum(axis=0)
            emb_sum = e if emb_sum is None else emb_sum + e
            if dense:
                feats = out["features"]
                for s, f in zip(group, feats, strict=True):
                    if weight is None:
                        acc[(slice(None), *s)] = f
                    else:
                        acc[(slice(None), *s)] += f * weight
                        wsum[s] += weight
        raw = (emb_sum / len(slices)).astype(np.float32)
        standardised = self.embedding == "standardised" and self.stats is not None
        embedding = self.stats.standardise(raw) if standardised else raw  # type: ignore[union-attr]
        features = None
        affine = vol.affine
        if dense:
            if wsum is not None:
                acc /= wsum
            features = np.ascontiguousarray(unpad(acc, pads))
            if grid == "input":
                features = resample_to_grid(features, pre.affine, vol.affine, vol.data.shape, order=1, mode="nearest")
            else:
                affine = pre.affine
        return Embedding(
            embedding=embedding,
            features=features,
            affine=np.asarray(affine, dtype=np.float64),
            source=vol.source,
            windows=len(slices),
            model_shape=tuple(int(s) for s in pre.data.shape),  # type: ignore[arg-type]
            modality=pre.modality,
            embedding_raw=raw,
            standardised=standardised,
        )
