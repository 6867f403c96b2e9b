"""Coarse-to-fine instance refinement of a registration (torch-free driver of ``refine.onnx``).

The network's transform is a first guess; this module improves it for the
pair at hand with the exported refinement graph (greedy diffeomorphic
local-CC ascent, :mod:`gvsl.refine`), on a pyramid of isotropic grids that
cover the fixed image (by default 6 mm, then 3 mm). At each level both images are
preprocessed at that spacing with the model's own settings, the moving one is
carried onto the fixed grid through world space (with the initial shift), the
current world field is resampled onto the level's grid, and the graph runs
``iterations`` steps on it. The result is a world (RAS mm) displacement field
on the finest level's grid, which :class:`gvsl.runtime.register.Registrar`
carries to the fixed image's own grid like the network's field.

At the first level the graph also scores the starting field against no
field (``iterations = 0`` returns the local CC of the start): a network that
has never seen this kind of scan cannot make the result worse than starting
from the initial alignment alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from . import artifact
from .backends import Backend
from .errors import GvslInputError
from .geometry import dvf_mm_to_voxel, dvf_voxel_to_mm
from .preprocess import preprocess
from .preprocess_config import PreprocessConfig
from .refine_options import DEFAULT_LEVELS, RefineOptions
from .resampling import canonical_geometry
from .volume import Volume, voxel_sizes
from .warp import resample_to_grid

__all__ = [
    "DEFAULT_LEVELS",
    "RefineOptions",
    "RefineResult",
    "plan_levels",
    "refine_initial_affine",
    "refine_world_field",
]

#: Largest level grid (voxels) refined: about 512 MB of float32 working tensors in the graph.
MAX_LEVEL_VOXELS = 12_000_000
#: the name of each similarity's figure in a level's report (the graph's ``similarity`` output)
SIMILARITY_KEYS = {"ncc": "local_cc", "mi": "mutual_information"}


@dataclass
class RefineResult:
    """The refined world field ``dvf_mm [3, *shape]`` on grid ``affine``, with per-level figures."""

    dvf_mm: np.ndarray
    affine: np.ndarray
    levels: list[dict[str, Any]]
    started_from_network: bool


def _native_grid(fixed: Volume, cfg: PreprocessConfig) -> tuple[np.ndarray, np.ndarray]:
    """The fixed image's voxel size and extent (mm) along the axes preprocessing gives it (RAS+
    when canonical)."""
    shape, affine = fixed.data.shape[:3], fixed.affine
    if cfg.canonical:
        _, shape, affine = canonical_geometry(shape, affine)
    spacing = voxel_sizes(affine)
    return spacing, np.asarray(shape, dtype=np.float64) * spacing


#: A level grid's axis is never coarser than the scan's own spacing along it divided by this:
#: refining a 3 x 3 x 10 mm chest CT at 3 x 3 x 5 mm scored Dice 0.931 / 0.932 on two CT pairs of
#: EVALUATION.md §1.1g, against 0.918 / 0.916 at its own 10 mm and 0.933 / 0.934 on an isotropic
#: 3 mm grid with 1.7x more voxels (measured with the earlier sigma_update 2).
SLICE_OVERSAMPLING = 2.0


def plan_levels(
    levels: Sequence[float],
    fixed: Volume,
    cfg: PreprocessConfig | None = None,
    max_voxels: int = MAX_LEVEL_VOXELS,
    anisotropic: bool = True,
) -> list[tuple[float, tuple[float, float, float]]]:
    """The pyramid actually run: ``(nominal spacing, grid spacing per axis)`` per level.

    Each axis of a level's grid has the nominal spacing, unless the scan is coarser along it:
    then half the scan's spacing there (:data:`SLICE_OVERSAMPLING`), never finer than the scan's
    finest spacing. A chest CT of 3 x 3 x 10 mm voxels is refined at 3 x 3 x 5 mm, not on an
    isotropic 3 mm grid whose extra voxels only interpolate between its slices; the
    refinement graph measures its kernels in mm, so both grids get the same regularisation.
    ``anisotropic=False`` (a refinement graph exported before it took voxel sizes) keeps grids
    isotropic, never finer than the scan's finest spacing. Levels that add nothing over the
    previous one, or whose grid would exceed ``max_voxels``, are dropped."""
    native, extent = _native_grid(fixed, cfg or PreprocessConfig())
    plan: list[tuple[float, tuple[float, float, float]]] = []
    for s in levels:
        floor = np.maximum(native / SLICE_OVERSAMPLING, native.min()) if anisotropic else native.min()
        spacing = np.maximum(float(s), floor) * np.ones(3)
        grid = tuple(float(g) for g in spacing)
        if float(np.prod(np.ceil(extent / spacing))) > max_voxels:
            continue
        if plan and np.allclose(plan[-1][1], grid):
            continue
        plan.append((float(s), grid))  # type: ignore[arg-type]
    if not plan:
        raise GvslInputError(
            f"{fixed.source}: every refinement level is too large for memory "
            f"(> {max_voxels} voxels); give coarser --refine-levels"
        )
    return plan


def _level_pair(
    fixed: Volume,
    moving: Volume,
    cfg: PreprocessConfig,
    spacing: tuple[float, float, float],
    initial: np.ndarray,
    moving_cfg: PreprocessConfig | None = None,
) -> tuple[Volume, np.ndarray]:
    """Both volumes at ``spacing`` mm with the model's preprocessing (``moving_cfg`` for the
    moving one where its modality differs); the moving one read on the fixed level grid through
    the initial world map ``initial`` (fixed mm -> moving mm)."""
    fixed_level = preprocess(fixed, replace(cfg, spacing=tuple(spacing)))
    moving_level = preprocess(moving, replace(moving_cfg or cfg, spacing=tuple(spacing)))
    shape = fixed_level.data.shape
    if min(shape) < 2:
        raise GvslInputError(f"{fixed.source}: too small for a {max(spacing):g} mm refinement level; use finer levels")
    moving_on_fixed = resample_to_grid(
        moving_level.data,
        np.linalg.inv(initial) @ moving_level.affine,
        fixed_level.affine,
        shape,
        order=1,
        mode="constant",
    )
    return fixed_level, moving_on_fixed


def refine_initial_affine(
    backend: Backend,
    fixed: Volume,
    moving: Volume,
    cfg: PreprocessConfig,
    initial: np.ndarray,
    options: RefineOptions,
    moving_cfg: PreprocessConfig | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Improve the initial world map ``initial`` (4x4, fixed mm -> moving mm) with the affine
    refinement graph on the ``affine_spacing`` grid (or the coarsest pyramid level, if coarser);
    returns the new map and a report. The result is kept only if it raises the local CC.
    ``moving_cfg`` preprocesses the moving volume where it differs from ``cfg``."""
    spacing, grid = plan_levels((max(options.affine_spacing, options.levels[0]),), fixed, cfg, anisotropic=False)[0]
    fixed_level, moving_on_fixed = _level_pair(fixed, moving, cfg, grid, initial, moving_cfg)
    feed = {
        "fixed": np.ascontiguousarray(fixed_level.data, dtype=np.float32)[None, None],
        "moving": np.ascontiguousarray(moving_on_fixed, dtype=np.float32)[None, None],
        "matrix": np.eye(3, 4, dtype=np.float32)[None],
        "step": np.array([options.affine_step], dtype=np.float32),
    }
    before = float(backend.run({**feed, "iterations": np.array(0, np.int64)})["similarity"][0])
    out = backend.run({**feed, "iterations": np.array(int(options.affine_iterations), np.int64)})
    after = float(out["similarity"][0])
    report = {
        "spacing_mm": spacing,
        "grid_mm": [round(g, 4) for g in grid],
        "local_cc_before": round(before, 6),
        "local_cc_after": round(after, 6),
    }
    if not after > before:
        report["kept"] = False
        return initial, report
    matrix = out["matrix_refined"][0].astype(np.float64)
    centre = (np.asarray(fixed_level.data.shape, dtype=np.float64) - 1.0) / 2.0
    voxel = np.eye(4)  # level voxel p -> c + M (p - c) + t
    voxel[:3, :3] = matrix[:, :3]
    voxel[:3, 3] = centre + matrix[:, 3] - matrix[:, :3] @ centre
    report["kept"] = True
    return initial @ fixed_level.affine @ voxel @ np.linalg.inv(fixed_level.affine), report


def refine_world_field(
    backend: Backend,
    fixed: Volume,
    moving: Volume,
    cfg: PreprocessConfig,
    field_mm: np.ndarray | None,
    field_affine: np.ndarray | None,
    initial: np.ndarray,
    options: RefineOptions,
    timer: Callable[[str], Any] | None = None,
    moving_cfg: PreprocessConfig | None = None,
) -> RefineResult:
    """Refine the world field ``field_mm`` (on grid ``field_affine``; ``None`` = none) between the
    original ``fixed`` and ``moving`` volumes, ``initial`` (4x4, fixed mm -> moving mm) being the
    initial alignment the field is relative to; ``moving_cfg`` preprocesses the moving volume
    where it differs from ``cfg``. The graph's kind says which similarity it maximises
    (refine: ncc, refine_mi: mi), and so which default step applies."""
    similarity = next((name for name, kind in artifact.REFINE_KINDS.items() if kind == backend.info.kind), "ncc")
    options = replace(options, similarity=similarity)
    # graphs exported before the refinement took voxel sizes run on isotropic grids
    anisotropic = "spacing" in backend.input_names
    plan = plan_levels(options.levels, fixed, cfg, anisotropic=anisotropic)
    current, current_affine = field_mm, field_affine
    report: list[dict[str, Any]] = []
    from_network = field_mm is not None
    for index, (spacing, grid) in enumerate(plan):
        fixed_level, moving_on_fixed = _level_pair(fixed, moving, cfg, grid, initial, moving_cfg)
        shape = fixed_level.data.shape
        if current is None:
            start = np.zeros((3, *shape), dtype=np.float32)
        else:
            start_mm = resample_to_grid(current, current_affine, fixed_level.affine, shape, order=1, mode="nearest")
            start = np.asarray(dvf_mm_to_voxel(start_mm, fixed_level.affine), dtype=np.float32)
        feed = {
            "fixed": np.ascontiguousarray(fixed_level.data, dtype=np.float32)[None, None],
            "moving": np.ascontiguousarray(moving_on_fixed, dtype=np.float32)[None, None],
            "step": np.array([options.step_size], dtype=np.float32),
            "regularisation": np.array([options.regularisation], dtype=np.float32),
        }
        if anisotropic:
            feed["spacing"] = np.asarray(voxel_sizes(fixed_level.affine), dtype=np.float32)
        if index == 0 and current is not None:
            zero = np.zeros_like(start)
            score = {}
            for name, candidate in (("network", start), ("initial alignment", zero)):
                out = backend.run({**feed, "dvf": candidate[None], "iterations": np.array(0, np.int64)})
                score[name] = float(out["similarity"][0])
            if score["initial alignment"] > score["network"]:
                start, from_network = zero, False
        iterations = options.level_iterations(index)
        out = backend.run({**feed, "dvf": start[None], "iterations": np.array(iterations, np.int64)})
        refined = out["dvf_refined"][0]
        report.append(
            {
                "spacing_mm": spacing,
                "grid_mm": [round(g, 4) for g in grid],
                "shape": list(shape),
                "iterations": iterations,
                "similarity": options.similarity,
                SIMILARITY_KEYS[options.similarity]: round(float(out["similarity"][0]), 6),
            }
        )
        current = np.asarray(dvf_voxel_to_mm(refined, fixed_level.affine), dtype=np.float32)
        current_affine = fixed_level.affine
        if timer is not None:
            timer(f"refine {spacing:g} mm")
    assert current is not None and current_affine is not None
    return RefineResult(dvf_mm=current, affine=current_affine, levels=report, started_from_network=from_network)
