"""What ``gvsl register`` refines with: :class:`RefineOptions` and its defaults.

A module of its own, with nothing heavier than the standard library, so that
the CLI and ``gvsl serve`` take their defaults (iterations, pyramid levels,
regularisation) from here without importing the refinement driver's numpy /
scipy stack: every front end offers the same defaults, written once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from .errors import GvslInputError

__all__ = ["DEFAULT_LEVELS", "DEFAULT_STEPS", "SIMILARITIES", "RefineOptions", "format_levels", "parse_levels"]

#: Pyramid spacings (mm) used unless ``levels`` says otherwise.
DEFAULT_LEVELS = (6.0, 3.0)
#: the refinement's similarities: local normalised cross-correlation (one modality) and mutual
#: information (two: CT onto MR), each with its own graph (refine.onnx, refine_mi.onnx); "auto"
#: takes mi when the two images were normalised as different modalities, else ncc
SIMILARITIES = ("auto", "ncc", "mi")
#: default largest update per iteration (voxels of the finest axis) of each similarity: the
#: mutual information's force changes abruptly with the histogram, and its ascent gains from
#: small steps (a sweep on CT <-> MR tuning pairs, EVALUATION.md §1.1i)
DEFAULT_STEPS = {"ncc": 0.5, "mi": 0.1}


@dataclass(frozen=True)
class RefineOptions:
    """How ``gvsl register`` refines: ``iterations`` at the coarsest level (0 = network only;
    ``decay`` times fewer at each finer one), the pyramid ``levels`` (spacings in mm, coarse
    to fine; :func:`gvsl.runtime.refine.plan_levels`), ``step`` (largest update per
    iteration, in voxels of each level's finest axis; ``None`` = the similarity's own,
    :data:`DEFAULT_STEPS`), ``regularisation`` (0..1: how far the total field is pulled
    towards its smoothed self each step) and ``similarity`` (:data:`SIMILARITIES`).
    ``network``: start from the registration network's prediction (the default) or, when
    ``False``, from the initial (and affine) alignment alone, the network not run: a
    training-free registration, for CPUs where the network's share of the time buys little
    after refinement (EVALUATION.md §1.1h)."""

    iterations: int = 20
    levels: tuple[float, ...] = DEFAULT_LEVELS
    step: float | None = None
    regularisation: float = 0.3
    similarity: str = "auto"
    #: iterations shrink by this factor per finer level (1 = the same number at every level)
    decay: float = 0.5
    #: affine refinement before the network (0 = none), on an isotropic grid of
    #: ``affine_spacing`` mm (the coarsest level's when that is coarser): twelve parameters
    #: need no fine grid, and an 8 mm grid has 8x fewer voxels than a 4 mm one
    affine_iterations: int = 40
    affine_step: float = 1.0
    affine_spacing: float = 8.0
    network: bool = True

    def __post_init__(self) -> None:
        if int(self.iterations) != self.iterations or self.iterations < 0:
            raise GvslInputError(f"--refine {self.iterations}: give a whole number of iterations >= 0")
        if int(self.affine_iterations) != self.affine_iterations or self.affine_iterations < 0:
            raise GvslInputError(f"--refine-affine {self.affine_iterations}: give a whole number of iterations >= 0")
        levels = tuple(float(s) for s in self.levels)
        if not levels or not all(math.isfinite(s) and s > 0 for s in levels):
            raise GvslInputError(f"--refine-levels {self.levels}: give positive spacings in mm, e.g. 6,3")
        object.__setattr__(self, "levels", levels)
        if not (math.isfinite(self.affine_spacing) and self.affine_spacing > 0):
            raise GvslInputError(f"affine spacing {self.affine_spacing}: give a positive spacing in mm")
        if not (math.isfinite(self.decay) and 0 < self.decay <= 1):
            raise GvslInputError(f"refine decay {self.decay}: use a value in (0, 1]")
        if self.step is not None and not (math.isfinite(self.step) and 0 < self.step <= 2):
            raise GvslInputError(f"refine step {self.step}: use a value in (0, 2] voxels")
        if not (math.isfinite(self.regularisation) and 0 <= self.regularisation <= 1):
            raise GvslInputError(f"--regularisation {self.regularisation}: use a value in [0, 1]")
        if not self.network and self.iterations == 0:
            raise GvslInputError(
                "--no-network needs --refine above 0: without the network, refinement is the registration"
            )
        if self.similarity not in SIMILARITIES:
            raise GvslInputError(f"--similarity {self.similarity}: use one of {', '.join(SIMILARITIES)}")

    @property
    def step_size(self) -> float:
        """The largest update per iteration this refinement uses: ``step``, else the similarity's
        default (ncc's while ``similarity`` is still "auto")."""
        if self.step is not None:
            return float(self.step)
        return DEFAULT_STEPS["ncc" if self.similarity == "auto" else self.similarity]

    def for_modalities(self, fixed: str | None, moving: str | None) -> RefineOptions:
        """These options with ``similarity`` decided for a pair normalised as ``fixed`` /
        ``moving`` ("ct", "mr" or ``None``): "auto" becomes mi when both are known and differ
        (a CT onto an MR: intensities related, not alike), else ncc."""
        if self.similarity != "auto":
            return self
        both = fixed is not None and moving is not None
        return replace(self, similarity="mi" if both and fixed != moving else "ncc")

    @property
    def enabled(self) -> bool:
        return self.iterations > 0

    def level_iterations(self, level: int) -> int:
        """Iterations at pyramid level ``level`` (0 = coarsest): ``iterations`` there, then
        ``decay`` times fewer at each finer level (fine levels cost 8x more per iteration and
        start close to the answer), at least one."""
        return max(1, int(round(self.iterations * self.decay**level)))


def format_levels(levels: tuple[float, ...] = DEFAULT_LEVELS) -> str:
    """``levels`` as the CLI writes them: ``6,3``."""
    return ",".join(f"{s:g}" for s in levels)


def parse_levels(text: str) -> tuple[float, ...]:
    """``--refine-levels`` text (``6,3``) as spacings in mm; one clear line when it is not numbers."""
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise GvslInputError(
            f"--refine-levels {text}: give spacings in mm separated by commas, e.g. {format_levels()}"
        ) from None
