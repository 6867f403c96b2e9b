"""Training pairs drawn on the fly from the label-map generator, mixed with real volumes.

``gvsl train --synth RECIPE --synth-ratio R`` feeds the trainer from
:class:`SynthPairSource`: each pair comes from :class:`gvsl.generator.SynthGenerator`
with probability R (two draws sharing one appearance model), else from the
real-volume :class:`gvsl.data.PairDataset`. It has the dataset's interface
(``sample``, iteration, ``state_dict`` / ``load_state_dict``), so the training loop
does not know which it has. Its random stream is
``SeedSequence(seed, spawn_key=(rank, SYNTH_STREAM))``: distinct per DDP rank and
from the real dataset's own stream, stored in checkpoints so a resume continues
exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from gvsl.data import PairDataset
from gvsl.generator import SynthGenerator
from gvsl.runtime.errors import GvslInputError
from gvsl.runtime.preprocess import PreprocessConfig

__all__ = ["SYNTH_STREAM", "SynthPairSource", "check_ratio"]

#: spawn-key entry of the synthetic stream (the real dataset uses worker ids 0, 1, ...)
SYNTH_STREAM = 1 << 20


def check_ratio(ratio: float) -> float:
    """The share of synthetic pairs, refused outside [0, 1] with one line."""
    r = float(ratio)
    if not (math.isfinite(r) and 0.0 <= r <= 1.0):
        raise GvslInputError(f"--synth-ratio {ratio}: must be in [0, 1] (the share of pairs drawn from the generator)")
    return r


class SynthPairSource:
    """Endless ``{"x1": [1,D,H,W], "x2": [1,D,H,W]}`` pairs: synthetic with probability
    ``ratio``, else from ``real``; synthetic pairs are normalised as ``pre`` says for their
    drawn modality (CT window or MR percentiles), i.e. like real inputs."""

    def __init__(
        self,
        generator: SynthGenerator,
        ratio: float,
        real: PairDataset | None,
        pre: PreprocessConfig,
        patch_size: tuple[int, int, int],
        *,
        seed: int = 0,
        rank: int = 0,
    ) -> None:
        self.generator = generator
        self.ratio = check_ratio(ratio)
        if real is None and self.ratio < 1.0:
            raise GvslInputError(
                f"--synth-ratio {ratio}: {1 - self.ratio:.0%} of pairs should be real volumes but none were "
                "given; pass DATA or --synth-ratio 1"
            )
        self.real = real
        self.pre = pre
        self.patch_size = tuple(int(p) for p in patch_size)
        self.rng = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(int(rank), SYNTH_STREAM)))
        self.drawn = {"synthetic": 0, "real": 0}

    @classmethod
    def from_recipe(
        cls, recipe: dict[str, Any], ratio: float, real: PairDataset | None, pre: PreprocessConfig,
        patch_size: tuple[int, int, int], **kw: Any,
    ) -> SynthPairSource:  # fmt: skip
        """A source over a loaded recipe at the training spacing (the recipe's when ``pre`` keeps
        native grids); label maps are read once, here."""
        spacing = None
        if pre.spacing is not None:
            if len(set(pre.spacing)) != 1:
                raise GvslInputError(f"--spacing {pre.spacing}: the generator draws isotropic grids; give one value")
            spacing = pre.spacing[0]
        return cls(SynthGenerator(recipe, spacing=spacing), ratio, real, pre, patch_size, **kw)

    def sample(self) -> dict[str, torch.Tensor]:
        """One pair: the synthetic/real choice is drawn every time (so the stream does not
        depend on the ratio's history), then the pair itself."""
        synthetic = self.rng.random() < self.ratio or self.real is None
        if not synthetic:
            self.drawn["real"] += 1
            return self.real.sample()  # type: ignore[union-attr]
        self.drawn["synthetic"] += 1
        a, b = self.generator.draw_pair(self.rng, self.patch_size)
        x1 = self.generator.normalised(a, self.pre)
        x2 = self.generator.normalised(b, self.pre)
        return {"x1": torch.from_numpy(x1)[None], "x2": torch.from_numpy(x2)[None]}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield self.sample()

    def state_dict(self) -> dict[str, Any]:
        """The synthetic stream's state and the real dataset's (JSON-able)."""
        return {
            "synth_rng": self.rng.bit_generator.state,
            "real": None if self.real is None else self.real.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "synth_rng" not in state:
            raise GvslInputError("checkpoint was saved without the synthetic source; resume without --synth")
        self.rng.bit_generator.state = state["synth_rng"]
        if self.real is not None and state.get("real") is not None:
            self.real.load_state_dict(state["real"])
