"""Model configuration: the one description of a GVSL network's shape.

Pure Python (no torch) so that the runtime and the exporters can read and
write it too. It travels with the weights as JSON (``model.json`` beside
``model.safetensors``) and inside ONNX metadata.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any

from gvsl.runtime import windows
from gvsl.runtime.geometry import AFFINE_CONVENTIONS, LEGACY_AFFINE_CONVENTION, check_affine_convention

#: Official GVSL widths: encoder 32..512, decoder 256..32.
DEFAULT_WIDTHS: tuple[int, ...] = (32, 64, 128, 256, 512, 256, 128, 64, 32)

#: Named presets for ``--widths``; ``tiny`` keeps CPU tests fast.
WIDTH_PRESETS: dict[str, tuple[int, ...]] = {
    "default": DEFAULT_WIDTHS,
    "small": (16, 32, 64, 128, 256, 128, 64, 32, 16),
    "tiny": (8, 16, 16, 32, 32, 32, 16, 16, 8),
}

#: Head widths (affine, deform, restore) that go with each preset: the
#: official 256/16/16 would dwarf a tiny backbone.
HEAD_PRESETS: dict[str, tuple[int, int, int]] = {
    "default": (256, 16, 16),
    "small": (128, 16, 16),
    "tiny": (32, 8, 8),
}

#: Four 2x poolings: every spatial size the network sees is a multiple of this (defined once, in the runtime).
SIZE_MULTIPLE = windows.SIZE_MULTIPLE

#: What registration does with the affine head (``ModelConfig.affine_head``):
#: ``trained`` uses its output; ``identity`` replaces it by the identity, for
#: weights whose affine head never learnt (the official release, GVSL_SPEC §5).
AFFINE_HEADS: tuple[str, ...] = ("trained", "identity")


class ConfigError(ValueError):
    """A configuration that cannot describe a GVSL network."""


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a GVSL network (backbone + Z-matching head + restoration head).

    ``widths`` are the nine U-Net widths (inc, down1..down4, up1..up4).
    ``affine_width`` / ``deform_width`` / ``restore_width`` are the hidden
    widths of the affine, deformable and restoration heads (official: 256, 16,
    16). Every width must be a multiple of 8 because GroupNorm uses width/8
    groups (restoration: width/4). ``affine_head`` (one of :data:`AFFINE_HEADS`)
    says whether registration applies the affine head or the identity; training
    always runs the head.

    ``affine_convention`` says how the affine head's ``[M | t]`` is read
    (:func:`gvsl.spatial.affine_to_voxel`): ``"centered"`` (new models) about
    the grid centre in voxels, the same transform on any grid shape;
    ``"official"`` the authors' normalised-coordinate quirk, under which a
    rotation shears on a non-cubic grid (official checkpoints need it). A
    description without the key (exported before the choice existed) reads
    as ``"official"``.
    """

    widths: tuple[int, ...] = DEFAULT_WIDTHS
    in_channels: int = 1
    affine_head: str = "trained"
    affine_width: int = 256
    deform_width: int = 16
    restore_width: int = 16
    affine_convention: str = "centered"

    def __post_init__(self) -> None:
        if self.affine_head not in AFFINE_HEADS:
            raise ConfigError(f"affine_head must be one of {', '.join(AFFINE_HEADS)}, got {self.affine_head!r}")
        try:
            check_affine_convention(self.affine_convention)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        widths = tuple(int(w) for w in self.widths)
        object.__setattr__(self, "widths", widths)
        if len(widths) != 9:
            raise ConfigError(f"widths needs 9 numbers (got {len(widths)}): {widths}")
        for w in widths:
            if w <= 0 or w % 8:
                raise ConfigError(
                    f"every width must be a positive multiple of 8 (GroupNorm uses width/8 "
                    f"groups); got {w} in {widths}"
                )
        for name in ("affine_width", "deform_width"):
            if getattr(self, name) <= 0 or getattr(self, name) % 8:
                raise ConfigError(
                    f"{name} must be a positive multiple of 8 (GroupNorm uses width/8 groups), "
                    f"got {getattr(self, name)}"
                )
        if self.restore_width <= 0 or self.restore_width % 4:
            raise ConfigError(f"restore_width must be a positive multiple of 4, got {self.restore_width}")
        if self.in_channels < 1:
            raise ConfigError(f"in_channels must be >= 1, got {self.in_channels}")

    @property
    def embedding_dim(self) -> int:
        """Length of the global embedding (channels of the bottleneck)."""
        return self.widths[4]

    @property
    def feature_dim(self) -> int:
        """Channels of the dense local features (last decoder output)."""
        return self.widths[8]

    @classmethod
    def from_preset(cls, name_or_widths: str | tuple[int, ...] | list[int], **kw: Any) -> "ModelConfig":
        """Build from a preset name (``tiny``/``small``/``default``, head widths
        included) or a comma-separated / sequence of nine widths (official heads)."""
        if isinstance(name_or_widths, str):
            if name_or_widths in WIDTH_PRESETS:
                names = ("affine_width", "deform_width", "restore_width")
                heads = dict(zip(names, HEAD_PRESETS[name_or_widths], strict=True))
                return cls(widths=WIDTH_PRESETS[name_or_widths], **{**heads, **kw})
            try:
                widths = tuple(int(x) for x in name_or_widths.split(","))
            except ValueError:
                raise ConfigError(
                    f"unknown widths {name_or_widths!r}: use one of "
                    f"{', '.join(WIDTH_PRESETS)} or nine comma-separated numbers"
                ) from None
            return cls(widths=widths, **kw)
        return cls(widths=tuple(name_or_widths), **kw)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["widths"] = list(self.widths)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown model config keys: {sorted(unknown)}")
        d = dict(d)
        d.setdefault("affine_convention", LEGACY_AFFINE_CONVENTION)  # written before the field existed
        if "widths" in d:
            d["widths"] = tuple(d["widths"])
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        return cls.from_dict(json.loads(text))


@dataclass(frozen=True)
class LossWeights:
    """Weights of the three GVSL loss terms (official: all 1)."""

    ncc: float = 1.0
    mse: float = 1.0
    smooth: float = 1.0

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


__all__ = [
    "AFFINE_HEADS",
    "AFFINE_CONVENTIONS",
    "ConfigError",
    "DEFAULT_WIDTHS",
    "HEAD_PRESETS",
    "LossWeights",
    "ModelConfig",
    "SIZE_MULTIPLE",
    "WIDTH_PRESETS",
]
