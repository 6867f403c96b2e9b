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
   pooled embedding of the padded volume;
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

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import artifact, cpu_pool
from .backends import Backend, ModelInfo, load_backend
from .errors import GvslInputError
from .io import DEFAULT_MAX_VOXELS, VolumeLike, read_volume
from .preprocess import PreprocessConfig, Volume, load_preprocessed, pad_to_multiple, preprocess, unpad, with_modality
from .warp import resample_to_grid
from .windows import SIZE_MULTIPLE, gaussian_weight, window_slices, window_starts

__all__ = ["Embedder", "Embedding", "gaussian_weight", "window_starts"]


@dataclass
class Embedding:
    """Result of :meth:`Embedder.embed`.

    ``embedding`` ``[C]`` float32; ``features`` ``[F, X, Y, Z]`` float32 on the
    grid given by ``affine`` (the input's grid unless ``grid="model"``) or
    None; ``windows`` = how many encoder windows were run.
    """

    embedding: np.ndarray
    features: np.ndarray | None
    affine: np.ndarray
    source: str
    windows: int
    model_shape: tuple[int, int, int]
    #: how the volume was normalised ("ct" / "mr" / "none"): what ``--modality auto`` decided
    modality: str | None = None


class Embedder:
    """Global embeddings and dense features of volumes from a gvsl encoder.

    ``model``: export folder / ``encoder.onnx`` (onnxruntime, tensorrt) or a
    trained model folder / ``.pth`` (torch). ``backend``: auto, onnxruntime,
    tensorrt, torch; ``device``: auto, cpu, cuda, cuda:N. ``overlap`` of
    sliding windows (0 <= overlap < 1), ``window_batch`` windows per call,
    ``max_voxels`` per input volume. ``modality`` overrides the model's
    normalisation (auto, ct, mr, none; None keeps the model's). Extra keywords go
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
        modality: str | None = None,
        **backend_options: Any,
    ) -> None:
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
        embedding = (emb_sum / len(slices)).astype(np.float32)
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
        )
