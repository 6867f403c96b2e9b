"""The backend contract: what a model is (:class:`ModelInfo`) and how it runs (:class:`Backend`).

A backend runs one exported graph (encoder or registration) on numpy arrays:
``backend.run({"image": x}, ["embedding"]) -> {"embedding": y}``. It is created
once and reused, and ``run`` is safe to call from many threads at once. The
helpers here (device names, cache folder, engine shape profiles) are shared by
every backend.
"""

from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import artifact
from ..errors import GvslInputError
from ..preprocess_config import PreprocessConfig
from ..windows import SIZE_MULTIPLE

#: Sliding-window size assumed for an official ``.pth`` (it records no training patch).
DEFAULT_PATCH = (128, 128, 128)

#: graph kind -> (input names, output names), the export contract
GRAPH_IO = {
    artifact.ENCODER: (artifact.ENCODER_INPUTS, artifact.ENCODER_OUTPUTS),
    artifact.REGISTRATION: (artifact.REGISTRATION_INPUTS, artifact.REGISTRATION_OUTPUTS),
    artifact.REFINE: (artifact.REFINE_INPUTS, artifact.REFINE_OUTPUTS),
    artifact.REFINE_MI: (artifact.REFINE_INPUTS, artifact.REFINE_OUTPUTS),
    artifact.REFINE_AFFINE: (artifact.REFINE_AFFINE_INPUTS, artifact.REFINE_AFFINE_OUTPUTS),
}


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


class Backend(ABC):
    """Runs one gvsl graph on float32 numpy arrays. Thread-safe ``run``; reuse the object."""

    name: str = "backend"
    info: ModelInfo
    #: the inputs the loaded graph really has, where it may lack optional ones (set by the backend)
    graph_inputs: tuple[str, ...] | None = None

    @property
    def input_names(self) -> tuple[str, ...]:
        """The inputs ``run`` reads: the contract's, less the optional ones an older graph lacks."""
        return self.graph_inputs if self.graph_inputs is not None else GRAPH_IO[self.info.kind][0]

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


def device_index(device: str) -> int:
    """CUDA ordinal of ``cuda`` / ``cuda:N`` / ``gpu`` / ``auto`` (0 unless N is given)."""
    if device in ("cuda", "gpu", "auto"):
        return 0
    if device.startswith("cuda:"):
        try:
            return int(device.split(":", 1)[1])
        except ValueError:
            pass
    raise GvslInputError(f"--device {device}: use auto, cpu, cuda or cuda:N")


def check_device(device: str) -> str:
    """``device`` lower-cased and validated: auto, cpu, cuda or cuda:N (``gpu`` means cuda)."""
    device = (device or "auto").lower()
    if device in ("auto", "cpu", "cuda", "gpu") or device.startswith("cuda:"):
        _ = device.startswith("cuda:") and device_index(device)
        return "cuda" if device == "gpu" else device
    raise GvslInputError(f"--device {device}: use auto, cpu, cuda or cuda:N")


def cache_folder(option: str | os.PathLike[str] | None) -> Path:
    """Folder of engine / int8 caches: ``option``, else ``$GVSL_CACHE_DIR``, else ``~/.cache/gvsl``."""
    if option:
        return Path(option)
    base = os.environ.get("GVSL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "gvsl"
    )
    return Path(base)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def shape_str(shape: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in shape)


def contract_inputs(kind: str, present: Collection[str]) -> tuple[str, ...] | None:
    """The contract's inputs of a ``kind`` graph whose inputs are ``present``, in contract order;
    ``None`` when they are not the contract's (optional inputs of older exports may be absent)."""
    want = GRAPH_IO[kind][0]
    optional = set(artifact.OPTIONAL_INPUTS.get(kind, ()))
    have = set(present)
    if not (set(want) - optional <= have <= set(want)):
        return None
    return tuple(n for n in want if n in have)


def input_profile(info: ModelInfo, max_shape: Sequence[int] | None, max_batch: int) -> dict[str, tuple]:
    """(min, opt, max) input shapes for engine builders: encoder windows never exceed
    the patch; the registration graph takes the whole padded volume up to ``max_shape``; the
    refine graph takes whole level grids of any size >= 2 and fixed-shape scalars."""
    if info.kind in (artifact.REFINE, artifact.REFINE_MI, artifact.REFINE_AFFINE):
        top = tuple(int(s) for s in (max_shape or (256, 256, 256)))
        prof: dict[str, tuple] = {}
        for name, channels in (("fixed", 1), ("moving", 1), ("dvf", 3)):
            prof[name] = ((1, channels, 2, 2, 2), (1, channels, 96, 96, 96), (1, channels, *top))
        prof["iterations"] = ((), (), ())
        prof["step"] = prof["regularisation"] = ((1,), (1,), (1,))
        prof["spacing"] = ((3,), (3,), (3,))
        prof["matrix"] = ((1, 3, 4), (1, 3, 4), (1, 3, 4))
        return {n: prof[n] for n in GRAPH_IO[info.kind][0]}
    patch = tuple(int(p) for p in info.patch_size)
    top = patch
    if info.kind == artifact.REGISTRATION:
        wanted = tuple(int(s) for s in (max_shape or (256, 256, 256)))
        top = tuple(max(-(-w // SIZE_MULTIPLE) * SIZE_MULTIPLE, p) for w, p in zip(wanted, patch, strict=True))
    lo = (1, 1, SIZE_MULTIPLE, SIZE_MULTIPLE, SIZE_MULTIPLE)
    opt = (1, 1, *patch)
    hi = (max(1, max_batch), 1, *top)
    return {n: (lo, opt, hi) for n in GRAPH_IO[info.kind][0]}


__all__ = [
    "DEFAULT_PATCH",
    "GRAPH_IO",
    "contract_inputs",
    "Backend",
    "ModelInfo",
    "cache_folder",
    "check_device",
    "device_index",
    "file_sha256",
    "input_profile",
    "shape_str",
]
