"""How raw volumes become network input: :class:`PreprocessConfig`, saved with every
trained model and export so that inference repeats what training did."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from .errors import GvslInputError

MODALITIES: tuple[str, ...] = ("auto", "ct", "mr", "none")


@dataclass(frozen=True)
class PreprocessConfig:
    """How raw volumes become network input. Saved beside checkpoints and exports
    (``to_dict``) so inference repeats exactly what training did.

    ``spacing`` target voxel size in mm (None keeps the native grid);
    ``modality`` "ct" (HU window), "mr" (nonzero-voxel percentiles), "auto" (CT or
    MR decided per volume from its values, :func:`gvsl.runtime.modality.decide_modality`)
    or "none" (values untouched); ``canonical`` reorients to RAS+ first so that array
    axes mean the same anatomy in every volume.
    """

    spacing: tuple[float, float, float] | None = (1.0, 1.0, 1.0)
    modality: str = "ct"
    ct_window: tuple[float, float] = (-1024.0, 1024.0)
    mr_percentiles: tuple[float, float] = (0.5, 99.5)
    canonical: bool = True

    def __post_init__(self) -> None:
        if self.spacing is not None:
            sp = _float_tuple(self.spacing, 3, "spacing")
            if not all(math.isfinite(s) and s > 0 for s in sp):
                raise ValueError(f"spacing must be three positive mm values, got {sp}")
            object.__setattr__(self, "spacing", sp)
        if self.modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {self.modality!r}")
        win = _float_tuple(self.ct_window, 2, "ct_window")
        if not (all(math.isfinite(v) for v in win) and win[0] < win[1]):
            raise ValueError(f"ct_window must be (low, high) HU with low < high, got {win}")
        object.__setattr__(self, "ct_window", win)
        pct = _float_tuple(self.mr_percentiles, 2, "mr_percentiles")
        if not (0.0 <= pct[0] < pct[1] <= 100.0):
            raise ValueError(f"mr_percentiles must satisfy 0 <= low < high <= 100, got {pct}")
        object.__setattr__(self, "mr_percentiles", pct)
        if self.canonical not in (True, False):
            raise ValueError(f"canonical must be true or false, got {self.canonical!r}")
        object.__setattr__(self, "canonical", bool(self.canonical))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (tuples become lists)."""
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessConfig:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown preprocess config keys: {sorted(unknown)}")
        d = dict(d)
        for k in ("spacing", "ct_window", "mr_percentiles"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        return cls(**d)


def with_modality(cfg: PreprocessConfig, modality: str | None) -> PreprocessConfig:
    """``cfg`` with its modality replaced (``None`` keeps the model's own): how ``--modality``
    overrides what a model was trained with, validated like any config."""
    if modality is None or modality == cfg.modality:
        return cfg
    if modality not in MODALITIES:
        raise GvslInputError(f"--modality {modality}: use one of {', '.join(MODALITIES)}")
    return replace(cfg, modality=modality)


def _float_tuple(value: Any, n: int, name: str) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {n} numbers, got {value!r}") from None
    if len(out) != n:
        raise ValueError(f"{name} must be {n} numbers, got {value!r}")
    return out


__all__ = ["MODALITIES", "PreprocessConfig", "with_modality"]
