"""Training data: find volumes, preprocess each once into an on-disk cache, and
stream random pairs of crops from two different volumes (GVSL_SPEC §4).

Preprocessing is :func:`gvsl.runtime.preprocess.preprocess`, the same function
inference uses, so a model never sees differently prepared data at test time.
The cache stores float32 ``.npy`` files opened with ``mmap_mode="r"``: epochs
never re-resample, workers share pages through the OS, and a crop reads only
the bytes it needs.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from gvsl.config import SIZE_MULTIPLE
from gvsl.runtime.errors import GvslInputError
from gvsl.runtime.io import save_npy
from gvsl.runtime.preprocess import PreprocessConfig, load_preprocessed, pad_to_shape

NIFTI_SUFFIXES = (".nii", ".nii.gz")

#: Bump when the cached array format or preprocessing code changes meaning.
CACHE_VERSION = 1


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _nifti_in_folder(folder: Path) -> list[Path]:
    # Hidden files are skipped: macOS "._x.nii.gz" droppings and our own
    # in-progress temp files are not volumes.
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and _is_nifti(p)
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def list_volumes(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Expand folders (recursive, sorted), files and glob patterns into NIfTI files.

    Order is kept (first occurrence wins on duplicates) so a run is
    reproducible from its command line. Anything that yields no volume is an
    error rather than silently training on less data.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        text = str(raw)
        if p.is_dir():
            found = _nifti_in_folder(p)
            if not found:
                raise GvslInputError(
                    f"no .nii/.nii.gz files in {text}; point DATA at a folder of NIfTI volumes",
                    text,
                )
        elif p.is_file():
            if not _is_nifti(p):
                raise GvslInputError(
                    f"{text}: not a .nii/.nii.gz file; convert it to NIfTI (e.g. dcm2niix) or "
                    "remove it from the inputs",
                    text,
                )
            found = [p]
        elif glob.has_magic(text):
            matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(text), recursive=True))
            found = []
            for m in matches:
                found.extend(_nifti_in_folder(m) if m.is_dir() else [m] if _is_nifti(m) else [])
            if not found:
                raise GvslInputError(
                    f"no .nii/.nii.gz files match {text}; check the pattern (quote it so the "
                    "shell does not expand it)",
                    text,
                )
        else:
            raise GvslInputError(f"{text}: no such file or folder; check the path", text)
        out.extend(found)
    if not out:
        raise GvslInputError("no input volumes given; pass a folder, files or a glob pattern")
    seen: set[Path] = set()
    unique = []
    for f in out:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


class VolumeCache:
    """Preprocessed volumes as float32 ``.npy`` files in ``cache_dir``.

    The key hashes the resolved path, file size, mtime_ns and the preprocess
    config, so editing a file or changing spacing/modality invalidates it while
    reruns reuse it. Files are written atomically (temp + ``os.replace``) so
    concurrent DDP ranks or a killed run never leave a half-written entry.
    ``hits`` / ``misses`` count lookups in this process.
    """

    def __init__(self, cache_dir: str | os.PathLike[str]) -> None:
        self.cache_dir = Path(cache_dir)
        self.hits = 0
        self.misses = 0

    def key(self, path: str | os.PathLike[str], cfg: PreprocessConfig) -> str:
        p = Path(path).resolve()
        try:
            st = p.stat()
        except OSError as e:
            raise GvslInputError(f"{path}: file not found; check the path", str(path)) from e
        ident = {
            "path": str(p),
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "preprocess": cfg.to_dict(),
            "version": CACHE_VERSION,
        }
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()

    def path_for(self, path: str | os.PathLike[str], cfg: PreprocessConfig) -> Path:
        return self.cache_dir / f"{self.key(path, cfg)}.npy"

    def get(
        self, path: str | os.PathLike[str], cfg: PreprocessConfig, max_voxels: int | None = None
    ) -> np.ndarray:
        """Preprocessed volume [D,H,W] (read-only memmap); computed and stored on a miss."""
        entry = self.path_for(path, cfg)
        if entry.exists():
            try:
                arr = np.load(entry, mmap_mode="r")
                self.hits += 1
                return arr
            except (OSError, ValueError):
                pass  # unreadable entry (e.g. disk was full): rebuild it
        self.misses += 1
        vol = load_preprocessed(path, cfg, max_voxels=max_voxels)[1]
        self._write(entry, vol.data)
        return np.load(entry, mmap_mode="r")

    def _write(self, entry: Path, data: np.ndarray) -> None:
        # temp file + rename: a crash or a parallel worker never leaves a half-written entry
        save_npy(entry, np.ascontiguousarray(data, dtype=np.float32))


def scan_volumes(
    files: Sequence[str | os.PathLike[str]],
    cfg: PreprocessConfig,
    cache: VolumeCache,
    skip_bad: bool,
    progress: Callable[[int, int, Path], None] | None = None,
    max_voxels: int | None = None,
) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Preprocess every file into ``cache`` once, before training starts, so bad
    files surface immediately instead of hours in.

    Returns ``(good, bad)`` where ``bad`` holds ``(path, one-line reason)``;
    with ``skip_bad=False`` the first :class:`GvslInputError` is raised instead.
    ``progress(i, n, path)`` is called after each file with i = files done (1..n).
    """
    good: list[Path] = []
    bad: list[tuple[Path, str]] = []
    n = len(files)
    for i, f in enumerate(files, start=1):
        f = Path(f)
        try:
            arr = cache.get(f, cfg, max_voxels=max_voxels)
            if arr.ndim != 3 or min(arr.shape) < 1:
                raise GvslInputError(
                    f"{f}: empty after preprocessing (shape {arr.shape}); check its spacing", str(f)
                )
        except GvslInputError as e:
            if not skip_bad:
                raise
            bad.append((f, str(e)))
        else:
            good.append(f)
        if progress is not None:
            progress(i, n, f)
    return good, bad


def _check_patch(patch_size: int | Sequence[int]) -> tuple[int, int, int]:
    ps = (patch_size,) * 3 if isinstance(patch_size, int) else tuple(patch_size)
    if len(ps) != 3 or not all(
        isinstance(s, (int, np.integer)) and s > 0 and s % SIZE_MULTIPLE == 0 for s in ps
    ):
        raise GvslInputError(
            f"patch_size must be three positive multiples of {SIZE_MULTIPLE} (the U-Net pools "
            f"four times by 2), got {patch_size}"
        )
    return tuple(int(s) for s in ps)  # type: ignore[return-value]


VolumeSource = np.ndarray | Callable[[], np.ndarray]


class PairDataset(IterableDataset):
    """Endless stream of ``{"x1": [1,D,H,W], "x2": [1,D,H,W]}`` random crops.

    Iterable rather than map-style because GVSL training is step-based: pairs
    are drawn with replacement forever and there is no natural epoch. Each item
    takes x1 from this rank's shard (``volumes[rank::world_size]`` when there
    are at least ``world_size`` volumes, else all of them) and x2 from all
    volumes except x1's, so the pair is always two different volumes unless only
    one exists. Both crops are centred at the same random relative position of
    their volumes (see :meth:`sample`); volumes smaller than the patch are
    zero-padded (0 = background after normalisation), centred.

    Randomness comes from one ``np.random.Generator`` seeded with
    ``SeedSequence(seed, spawn_key=(rank, worker_id))`` (worker 0 when iterated
    in-process), so ranks and DataLoader workers draw different streams and a
    given (seed, rank, worker) always gives the same one. ``state_dict`` /
    ``load_state_dict`` save and restore that generator: with in-process
    iteration (``num_workers=0``, the way the trainer uses it, since crops from
    memmaps are cheap) a resumed run continues the exact stream. Workers cannot
    report their state back, so with workers each derives its stream from the
    loaded state plus its id — reproducible, but not the same as in-process.

    ``volumes`` are 3-D arrays or zero-argument callables returning one (so
    workers open memmaps themselves instead of receiving pickled copies); see
    :meth:`from_cache`.
    """

    def __init__(
        self,
        volumes: Sequence[VolumeSource],
        patch_size: int | Sequence[int],
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__()
        if len(volumes) == 0:
            raise GvslInputError(
                "no usable training volumes; check DATA and the skipped-file report"
            )
        if not (0 <= rank < world_size):
            raise ValueError(
                f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}"
            )
        self.volumes = list(volumes)
        self.patch_size = _check_patch(patch_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        n = len(self.volumes)
        self.shard = list(range(rank, n, world_size)) if n >= world_size else list(range(n))
        self._arrays: dict[int, np.ndarray] = {}
        self._rng: np.random.Generator | None = None
        self._rng_pid = -1
        self._loaded_state: dict[str, Any] | None = None

    @classmethod
    def from_cache(
        cls,
        files: Sequence[str | os.PathLike[str]],
        cfg: PreprocessConfig,
        cache: VolumeCache,
        patch_size: int | Sequence[int],
        **kw: Any,
    ) -> PairDataset:
        """Dataset over cached volumes (run :func:`scan_volumes` first so none is bad)."""
        return cls([partial(cache.get, Path(f), cfg) for f in files], patch_size, **kw)

    # -- pickling for DataLoader workers: drop open memmaps and the live generator
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_arrays"] = {}
        if self._rng is not None:
            state["_loaded_state"] = self.state_dict()["rng"]
        state["_rng"] = None
        return state

    def _array(self, i: int) -> np.ndarray:
        arr = self._arrays.get(i)
        if arr is None:
            src = self.volumes[i]
            arr = src() if callable(src) else np.asarray(src)
            if arr.ndim != 3:
                raise ValueError(f"volume {i} must be 3-D, got shape {arr.shape}")
            self._arrays[i] = arr
        return arr

    def _generator(self) -> np.random.Generator:
        if self._rng is not None:
            if self._rng_pid == os.getpid():
                return self._rng
            # inherited through fork by a DataLoader worker: derive from it like a loaded state
            self._loaded_state = self._rng.bit_generator.state
        info = get_worker_info()
        worker = 0 if info is None else info.id
        if self._loaded_state is None:
            rng = np.random.default_rng(
                np.random.SeedSequence(self.seed, spawn_key=(self.rank, worker))
            )
        else:
            rng = np.random.default_rng()
            rng.bit_generator.state = self._loaded_state
            if info is not None and info.num_workers > 1:
                base = int(rng.integers(0, 2**63))
                rng = np.random.default_rng(np.random.SeedSequence(base, spawn_key=(worker,)))
        self._rng, self._rng_pid = rng, os.getpid()
        return rng

    def state_dict(self) -> dict[str, Any]:
        """Generator state (JSON/pickle-able) to store in a checkpoint."""
        rng = self._generator()
        return {"rng": rng.bit_generator.state, "seed": self.seed, "rank": self.rank}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._loaded_state = state["rng"]
        self._rng = None

    def crop(self, arr: np.ndarray, where: np.ndarray) -> np.ndarray:
        """Crop of ``patch_size`` centred at fraction ``where`` (per axis, in [0, 1]) of
        the volume, shifted inside at the borders; zero-padded where the volume is
        smaller than the patch."""
        idx = []
        for n, p, u in zip(arr.shape, self.patch_size, where, strict=True):
            start = min(max(int(round(float(u) * n - p / 2)), 0), n - p) if n > p else 0
            idx.append(slice(start, start + p))
        patch = np.array(arr[tuple(idx)], dtype=np.float32)
        if patch.shape != self.patch_size:
            patch, _ = pad_to_shape(patch, self.patch_size, value=0.0)
        return patch

    def sample(self) -> dict[str, torch.Tensor]:
        """Draw one pair: two volumes, cropped at the same *relative* position.

        GVSL learns to register x2 onto x1, which only makes sense when both
        crops hold roughly the same anatomy (the authors feed whole, similarly
        framed volumes). Volumes are in RAS+ after preprocessing, so the same
        fractional position picks corresponding regions; the augmentation then
        supplies the misalignment the Z-matching head must undo.
        """
        rng = self._generator()
        n = len(self.volumes)
        i = self.shard[int(rng.integers(len(self.shard)))]
        if n > 1:
            j = int(rng.integers(n - 1))
            j += j >= i  # uniform over the other volumes
        else:
            j = i
        where = rng.random(3)
        x1 = self.crop(self._array(i), where)
        x2 = self.crop(self._array(j), where)
        return {"x1": torch.from_numpy(x1)[None], "x2": torch.from_numpy(x2)[None]}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield self.sample()


def make_batch(
    items: Iterator[dict[str, torch.Tensor]], batch_size: int
) -> dict[str, torch.Tensor]:
    """Stack ``batch_size`` items from an iterator into ``{"x1": [B,1,D,H,W], "x2": ...}``."""
    drawn = [next(items) for _ in range(batch_size)]
    return {k: torch.stack([d[k] for d in drawn]) for k in drawn[0]}


__all__ = [
    "CACHE_VERSION",
    "NIFTI_SUFFIXES",
    "PairDataset",
    "VolumeCache",
    "list_volumes",
    "make_batch",
    "scan_volumes",
]
