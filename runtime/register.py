"""``Registrar``: register a moving volume to a fixed one with a gvsl registration graph.

Everything is returned **on the fixed image's original grid and affine**, in
the moving image's original intensities, so results drop straight into the
clinical pipeline:

1. both volumes are preprocessed with the model's settings (RAS+,
   resampling, normalisation); the moving one is then resampled onto the
   fixed one's model grid through world coordinates after an initial shift
   (``init="world"``: the scanners' frames are trusted; ``"center"``: the two
   field-of-view centres are superimposed; ``"moments"``: the intensity
   centres of mass are; ``"auto"``, the default: world when the two fields of
   view overlap by at least half of the smaller one, moments otherwise, since
   two patients' scans often have world origins hundreds of mm apart);
2. the graph predicts the affine and the fused displacement ``dvf`` (voxels,
   pull-back: fixed voxel ``p`` reads moving voxel ``p + dvf(p)``) on the
   padded model grid (unless ``RefineOptions.network`` is off: then the
   refinement starts from the initial alignment alone, a training-free
   registration that spares the network's time on a CPU);
   then, unless refinement is off, :mod:`gvsl.runtime.refine` improves the
   transform for this pair with the exported ``refine.onnx`` graph
   (coarse-to-fine greedy local-CC ascent; for two modalities, ``similarity``
   "auto" or "mi", the mutual-information ascent of ``refine_mi.onnx``);
3. that field becomes a world field ``d(x)`` in RAS mm (``A · dvf`` with the
   grid's affine ``A``, plus the initial shift), is resampled trilinearly to
   the fixed image's voxel centres (from the padded grid, so voxels just past
   the last model voxel get the network's margin prediction, not a copy of
   the edge), and then pulls the *original* moving
   image (trilinear) and label maps (nearest neighbour, labels exact) onto
   the fixed grid: ``warped(x) = moving(x + d(x))``. One interpolation of the
   moving image, whatever grids the inputs came on.

The displacement field written by :meth:`Registration.save_dvf` is that
``d``, stored the way ITK / ANTs / SimpleITK apply displacement fields (see
:func:`gvsl.runtime.io.save_displacement_field`): ``antsApplyTransforms -i
moving -r fixed -t dvf.nii.gz`` or SimpleITK's ``DisplacementFieldTransform``
reproduce ``warped``.

Quality figures: global NCC (Pearson r of the model-normalised intensities on
the fixed grid) before (initial alignment only) and after, the Jacobian
determinant of ``x -> x + d(x)``: minimum and % of voxels with det <= 0
(folding), the seconds spent in each stage and, given label maps of the fixed
image, the Dice of each warped moving label against them.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from . import artifact, cpu_pool
from .backends import Backend, ModelInfo, load_backend, resolve_model_file
from .errors import GvslInputError
from .geometry import dvf_voxel_to_mm, model_affine_convention, network_affine_to_voxel
from .intensity import normalize_intensity
from .io import DEFAULT_MAX_VOXELS, VolumeLike, load_labels, read_volume, save_displacement_field
from .metrics import folding_stats, jacobian_determinant, label_dice, max_displacement, ncc
from .nifti import save_nifti
from .padding import pad_to_multiple
from .preprocess import preprocess, preprocessed_shape
from .preprocess_config import with_modality
from .refine import RefineOptions, refine_initial_affine, refine_world_field
from .volume import Volume
from .warp import grid_world_coordinates, resample_to_grid, row_pieces, warp_by_displacement
from .windows import SIZE_MULTIPLE

__all__ = [
    "INITS",
    "RefineOptions",
    "Registrar",
    "Registration",
    "fov_overlap",
    "compose_initial",
    "initial_shift",
    "network_affine_to_voxel",
    "score_labels",
]

INITS = ("auto", "world", "center", "moments")
#: how much coarser (fraction) the network's grid may be along an axis to spare its padding
MAX_GRID_STRETCH = 0.1
#: ``init="auto"`` trusts world coordinates when the fields of view overlap by this fraction of the smaller
AUTO_WORLD_OVERLAP = 0.5


def _translation(v: Sequence[float]) -> np.ndarray:
    t = np.eye(4)
    t[:3, 3] = v
    return t


def _centre(vol: Volume) -> np.ndarray:
    a = vol.affine
    return a[:3, :3] @ ((np.asarray(vol.data.shape, dtype=np.float64) - 1) / 2) + a[:3, 3]


def _world_box(vol: Volume) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned world (RAS mm) bounding box of a volume's field of view (voxel edges)."""
    n = np.asarray(vol.data.shape[:3], dtype=np.float64)
    corners = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], dtype=np.float64) * n - 0.5
    world = corners @ vol.affine[:3, :3].T + vol.affine[:3, 3]
    return world.min(axis=0), world.max(axis=0)


def fov_overlap(fixed: Volume, moving: Volume, shift_mm: Sequence[float] = (0.0, 0.0, 0.0)) -> float:
    """Volume of the intersection of the two fields of view (the moving one moved by
    ``-shift_mm``, i.e. after an initial alignment ``shift_mm``) over the smaller one."""
    flo, fhi = _world_box(fixed)
    mlo, mhi = _world_box(moving)
    shift = np.asarray(shift_mm, dtype=np.float64)
    mlo, mhi = mlo - shift, mhi - shift
    inter = np.prod(np.clip(np.minimum(fhi, mhi) - np.maximum(flo, mlo), 0.0, None))
    smaller = min(np.prod(fhi - flo), np.prod(mhi - mlo))
    return float(inter / smaller) if smaller > 0 else 0.0


def centre_of_mass(vol: Volume) -> np.ndarray:
    """World (RAS mm) centre of mass of a preprocessed volume's intensities (values below 0 count 0)."""
    weights = np.clip(np.asarray(vol.data, dtype=np.float64), 0.0, None)
    total = weights.sum()
    if not np.isfinite(total) or total <= 0:
        raise GvslInputError(
            f"{vol.source}: no foreground for --init moments (the image is empty after normalisation); "
            "use --init world or center",
            vol.source,
        )
    index = [np.arange(n, dtype=np.float64) for n in weights.shape]
    com = np.array(
        [(weights.sum(axis=tuple(a for a in range(3) if a != axis)) * index[axis]).sum() / total for axis in range(3)]
    )
    return vol.affine[:3, :3] @ com + vol.affine[:3, 3]


def initial_shift(
    init: str, fixed: Volume, moving: Volume, fixed_pre: Volume, moving_pre: Volume
) -> tuple[np.ndarray, str]:
    """The initial alignment ``shift`` (moving point = fixed point + shift) and the mode used."""
    if init == "auto":
        init = "world" if fov_overlap(fixed, moving) >= AUTO_WORLD_OVERLAP else "moments"
    if init == "world":
        shift = np.zeros(3)
    elif init == "center":
        shift = _centre(moving) - _centre(fixed)
    else:
        shift = centre_of_mass(moving_pre) - centre_of_mass(fixed_pre)
    if fov_overlap(fixed, moving, shift) <= 0.0:
        raise GvslInputError(
            f"{moving.source}: does not overlap {fixed.source} even after --init {init} alignment "
            "(no common field of view); check that the two scans show the same anatomy",
            moving.source,
        )
    return shift, init


@dataclass
class Registration:
    """Result of :meth:`Registrar.register`; every array is on the fixed image's grid
    (``affine``, shape of ``fixed``).

    ``warped`` moving image (its own intensities); ``labels`` warped label maps
    (same dtype and values as given); ``dvf_mm`` ``[3, X, Y, Z]`` pull-back
    displacement in RAS mm (``moving_point = fixed_point + d``);
    ``matrix`` the affine head's ``[3, 4]`` (in the model's affine convention)
    and ``world_matrix`` the same affine as a 4x4 RAS map fixed mm -> moving mm
    (initial alignment included); ``moving_before`` the moving image after the
    initial alignment only; ``metrics`` the quality figures; ``init`` the initial
    alignment used and ``shift_mm`` its world shift (moving point = fixed point
    + shift); ``initial_matrix`` the 4x4 world map the network started from (the
    shift, then the affine refinement when it ran, reported in
    ``affine_refinement``); ``dice`` per label map (by source) the Dice of each
    label against the fixed labels given; ``stages`` seconds per stage;
    ``refinement`` one record per refinement level run.
    """

    warped: np.ndarray
    affine: np.ndarray
    dvf_mm: np.ndarray
    labels: list[np.ndarray]
    matrix: np.ndarray
    world_matrix: np.ndarray
    metrics: dict[str, float]
    fixed: np.ndarray
    moving_before: np.ndarray
    fixed_source: str = "<fixed>"
    moving_source: str = "<moving>"
    label_sources: list[str] = field(default_factory=list)
    init: str = "world"
    shift_mm: np.ndarray = field(default_factory=lambda: np.zeros(3))
    initial_matrix: np.ndarray = field(default_factory=lambda: np.eye(4))
    affine_refinement: dict[str, Any] = field(default_factory=dict)
    dice: dict[str, dict[str, float]] = field(default_factory=dict)
    stages: dict[str, float] = field(default_factory=dict)
    refinement: list[dict[str, Any]] = field(default_factory=list)
    #: how the fixed and the moving image were normalised (what ``--modality auto`` decided)
    modalities: tuple[str | None, str | None] = (None, None)
    #: whether the registration network ran (``False``: refinement from the initial alignment
    #: alone, ``matrix`` the identity)
    network: bool = True

    def save_warped(self, path: str | os.PathLike[str]) -> Path:
        return save_nifti(path, self.warped, self.affine)

    def save_dvf(self, path: str | os.PathLike[str]) -> Path:
        """ITK/ANTs displacement field NIfTI (LPS vectors, intent vector, 5-D)."""
        return save_displacement_field(path, self.dvf_mm, self.affine)

    def save_labels(self, paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
        if len(paths) != len(self.labels):
            raise ValueError(f"{len(self.labels)} label maps but {len(paths)} paths")
        return [save_nifti(p, lab, self.affine) for p, lab in zip(paths, self.labels, strict=True)]

    def save_png(self, path: str | os.PathLike[str], title: str | None = None) -> Path:
        from .figures import save_registration_png

        return save_registration_png(
            path, self.fixed, self.moving_before, self.warped, self.affine, title=title, metrics=self.metrics
        )


def network_spacing(spacing: Sequence[float], shape: Sequence[int], stretch: float = MAX_GRID_STRETCH) -> tuple:
    """Per axis, the network grid's spacing: the model's own, or up to ``stretch`` coarser where
    that makes the axis a multiple of the network's ``SIZE_MULTIPLE`` voxels instead of padding
    it. The network's cost grows with its voxels and padding adds them (the chest CT's 98 x 98 x
    85 model grid pads to 112 x 112 x 96, +45 %); a grid 2-6 % coarser costs the refinement that
    follows nothing measurable. ``shape`` is the model grid's at ``spacing``; resampling rounds
    ``n * s / s'`` to the new size, which is then the multiple below ``n``."""
    out = []
    for s, n in zip(spacing, shape, strict=True):
        m = (int(n) // SIZE_MULTIPLE) * SIZE_MULTIPLE
        out.append(float(s) * n / m if m and n % SIZE_MULTIPLE and n / m <= 1.0 + stretch else float(s))
    return tuple(out)


def compose_initial(initial: np.ndarray, field_mm: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The total pull-back field ``x -> initial(x + d(x)) - x`` on the grid ``affine`` of ``d``
    (``field_mm [3, *shape]``, relative to the initially aligned moving image):
    ``L d(x) + (L - I) x + t`` for ``initial = [L | t]``, the second term added slab by slab on the CPU pool
    (:func:`grid_world_coordinates` of the map ``(L - I) affine + t``: no ``[3, *shape]``
    float64 array)."""
    linear = np.asarray(initial, dtype=np.float64)[:3, :3]
    out = np.einsum("ij,j...->i...", linear.astype(np.float32), field_mm).astype(np.float32)
    if np.allclose(linear, np.eye(3), atol=1e-12):
        return out + np.asarray(initial[:3, 3], dtype=np.float32).reshape(3, 1, 1, 1)
    moved = np.eye(4)  # index -> (L - I) x + t
    moved[:3] = (linear - np.eye(3)) @ np.asarray(affine, dtype=np.float64)[:3]
    moved[:3, 3] += np.asarray(initial[:3, 3], dtype=np.float64)
    shape = field_mm.shape[1:]

    def work(start: int, stop: int) -> None:
        out[:, start:stop] += grid_world_coordinates(moved, shape, slice(start, stop))

    cpu_pool.run_chunks(work, row_pieces(shape), int(np.prod(shape)))
    return out


def score_labels(
    warped_labels: Sequence[np.ndarray],
    label_maps: Sequence[tuple[np.ndarray, np.ndarray, str]],
    reference_maps: Sequence[tuple[np.ndarray, np.ndarray, str]],
    fixed: Volume,
) -> dict[str, dict[str, float]]:
    """Per-label Dice of each warped moving label map (on the fixed grid) against the fixed
    image's label map in the same position (read onto the fixed grid when it lies elsewhere)."""
    scores: dict[str, dict[str, float]] = {}
    for moved, (_, _, name), (ref, ref_affine, _) in zip(warped_labels, label_maps, reference_maps, strict=False):
        on_fixed = ref
        if ref.shape != fixed.data.shape or not np.allclose(ref_affine, fixed.affine, atol=1e-4):
            on_fixed = resample_to_grid(ref, ref_affine, fixed.affine, fixed.data.shape, order=0, mode="constant")
        scores[name] = label_dice(moved, on_fixed)
    return scores


def _refine_file(model: Any, kind: str = artifact.REFINE) -> Path | None:
    """``refine.onnx`` (or ``refine_affine.onnx``) for ``model``: beside it in its export folder,
    else the one shipped with the default model (the graphs have no learned weights, so any
    export's copy serves)."""
    if not isinstance(model, Backend):
        try:
            path, fmt = resolve_model_file(model, kind)
            if fmt == "onnx":
                return path
        except GvslInputError:
            pass
    from .default_model import default_model_dir

    shipped = Path(default_model_dir()) / f"{kind}.onnx"
    return shipped if shipped.is_file() else None


def _as_list(items: VolumeLike | Sequence[VolumeLike] | None) -> list[Any]:
    if items is None:
        return []
    return list(items) if isinstance(items, list | tuple) else [items]


class Registrar:
    """Deformable registration with a gvsl registration graph (thread-safe; reuse it).

    ``model``: export folder / ``registration.onnx`` (onnxruntime, tensorrt)
    or a trained model folder / ``.pth`` (torch). ``init``: "auto", "world",
    "center" or "moments" (see module doc). ``refine``: the instance
    refinement after the network (:class:`RefineOptions`; ``None`` or
    ``iterations=0`` = the network alone; default: :class:`RefineOptions`' defaults); ``refine_model``: the
    ``refine.onnx`` to run (default: the one beside ``model``, else the one
    shipped with gvsl; ``similarity="mi"`` runs ``refine_mi.onnx``, found the
    same way). ``fill``: value outside the moving image's field of
    view ("min" = its minimum, i.e. air/background). ``modality``: how both
    images are normalised (default "auto", as ``gvsl register``: CT windowing or MR
    percentiles, decided per image; ct, mr, none; ``None`` = the model's own), or
    a (fixed, moving) pair of them for a cross-modal pair that ``auto`` cannot
    decide. Extra keywords go to the backends (``threads``, ``cache_dir``,
    ``max_shape`` ...).
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | Backend,
        backend: str = "auto",
        device: str = "auto",
        *,
        init: str = "auto",
        refine: RefineOptions | None = None,
        refine_model: str | os.PathLike[str] | Backend | None = None,
        fill: float | str = "min",
        max_voxels: int | None = DEFAULT_MAX_VOXELS,
        modality: str | tuple[str | None, str | None] | None = "auto",
        **backend_options: Any,
    ) -> None:
        if init not in INITS:
            raise GvslInputError(f"--init {init}: use one of {', '.join(INITS)}")
        if not (fill == "min" or isinstance(fill, int | float)):
            raise GvslInputError(f"fill must be 'min' or a number, got {fill!r}")
        if backend_options.get("threads"):
            cpu_pool.set_threads(backend_options["threads"])
        self._model = model  # where the refine graphs of other similarities are looked for
        if isinstance(model, Backend):
            self.backend = model
        else:
            self.backend = load_backend(model, artifact.REGISTRATION, backend, device, **backend_options)
        if self.backend.info.kind != artifact.REGISTRATION:
            raise GvslInputError(f"{self.backend.info.path}: not a registration graph", self.backend.info.path)
        self.refine_options = refine if refine is not None else RefineOptions()
        # the refinement graphs are ONNX files: a torch model still refines through ONNX Runtime
        refine_backend = "onnxruntime" if backend in ("auto", "torch") else backend
        self.refiner: Backend | None = None
        if isinstance(refine_model, Backend):
            self.refiner = refine_model
        else:
            path = Path(refine_model) if refine_model is not None else _refine_file(model)
            if path is not None:
                self.refiner = load_backend(path, artifact.REFINE, refine_backend, device, **backend_options)
            elif self.refine_options.enabled:
                warnings.warn(
                    f"{self.backend.info.path}: this export has no refine.onnx; registering with the network alone "
                    "(re-export with `gvsl export` for refinement)",
                    stacklevel=2,
                )
        #: refine graphs by similarity; the mutual information's is loaded on first use
        self._refiners: dict[str, Backend | None] = {"ncc": self.refiner}
        self._refine_backend = (refine_backend, device, backend_options)
        self._refiners_lock = threading.Lock()
        self.affine_refiner: Backend | None = None
        affine_path = _refine_file(model, artifact.REFINE_AFFINE) if not isinstance(refine_model, Backend) else None
        if affine_path is not None:
            self.affine_refiner = load_backend(
                affine_path, artifact.REFINE_AFFINE, refine_backend, device, **backend_options
            )
        self.init = init
        self.fill = fill
        self.max_voxels = max_voxels
        fixed_modality, moving_modality = modality if isinstance(modality, tuple) else (modality, modality)
        #: the model's preprocessing of the fixed and of the moving image, with ``modality`` if given
        self.preprocess = with_modality(self.info.preprocess, fixed_modality)
        self.moving_preprocess = with_modality(self.info.preprocess, moving_modality)

    @property
    def info(self) -> ModelInfo:
        return self.backend.info

    def close(self) -> None:
        self.backend.close()
        for extra in {id(r): r for r in (*self._refiners.values(), self.affine_refiner)}.values():
            if extra is not None:
                extra.close()

    def refiner_for(self, similarity: str) -> Backend | None:
        """The refine graph of ``similarity`` (``refine.onnx`` for ncc, ``refine_mi.onnx`` for mi:
        beside the model, else the shipped one), loaded once; ``None`` when there is none."""
        with self._refiners_lock:
            if similarity not in self._refiners:
                kind = artifact.REFINE_KINDS[similarity]
                path = _refine_file(self._model, kind)
                backend, device, options = self._refine_backend
                self._refiners[similarity] = (
                    None if path is None else load_backend(path, kind, backend, device, **options)
                )
            return self._refiners[similarity]

    def __enter__(self) -> Registrar:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def register(
        self,
        fixed: VolumeLike,
        moving: VolumeLike,
        labels: VolumeLike | Sequence[VolumeLike] | None = None,
        fixed_labels: VolumeLike | Sequence[VolumeLike] | None = None,
        *,
        init: str | None = None,
        refine: RefineOptions | None = None,
    ) -> Registration:
        """Register ``moving`` onto ``fixed``; ``labels`` are label maps of the moving
        image (one or a list; any grid, their own affine is used) and ``fixed_labels``
        the matching label maps of the fixed image (same order), scored by Dice.
        ``init`` / ``refine`` override this registrar's settings for this call."""
        init = init or self.init
        if init not in INITS:
            raise GvslInputError(f"--init {init}: use one of {', '.join(INITS)}")
        options = refine if refine is not None else self.refine_options
        stages: dict[str, float] = {}
        clock = [time.perf_counter()]

        def lap(name: str) -> None:
            now = time.perf_counter()
            stages[name] = stages.get(name, 0.0) + now - clock[0]
            clock[0] = now

        fvol = read_volume(fixed, max_voxels=self.max_voxels, name=None)
        mvol = read_volume(moving, max_voxels=self.max_voxels, name=None)
        label_maps = [load_labels(lab, max_voxels=self.max_voxels) for lab in _as_list(labels)]
        reference_maps = [load_labels(lab, max_voxels=self.max_voxels) for lab in _as_list(fixed_labels)]
        if reference_maps and len(reference_maps) != len(label_maps):
            raise GvslInputError(
                f"--fixed-labels: {len(reference_maps)} given for {len(label_maps)} --labels; give one fixed label "
                "map per moving label map, in the same order"
            )
        network_cfg = self.preprocess  # the network's grid: the model's, stretched a little where that spares padding
        if network_cfg.spacing is not None:
            shape = preprocessed_shape(fvol, network_cfg)
            network_cfg = replace(network_cfg, spacing=network_spacing(network_cfg.spacing, shape))
        fpre = preprocess(fvol, network_cfg)
        mpre = preprocess(mvol, self.moving_preprocess)  # auto: each image is normalised as what it is
        # what auto decided holds for every later grid (refinement levels, metrics)
        cfg, moving_cfg = (
            with_modality(self.preprocess, fpre.modality),
            with_modality(self.moving_preprocess, mpre.modality),
        )
        # "auto" similarity: mutual information when the two were normalised as different modalities
        options = options.for_modalities(fpre.modality, mpre.modality)
        refiner = self.refiner_for(options.similarity) if options.enabled else None
        if options.enabled and refiner is None:
            graph = f"{artifact.REFINE_KINDS[options.similarity]}.onnx"
            raise GvslInputError(
                f"{self.info.path}: refinement asked for, but no {graph} was found; re-export the model with "
                "`gvsl export`, or use --refine 0",
                self.info.path,
            )
        shift, init_used = initial_shift(init, fvol, mvol, fpre, mpre)
        initial = _translation(shift)  # fixed mm -> moving mm, before the network
        lap("read and preprocess")
        affine_report: dict[str, Any] = {}
        if self.affine_refiner is not None and options.enabled and options.affine_iterations > 0:
            initial, affine_report = refine_initial_affine(
                self.affine_refiner, fvol, mvol, cfg, initial, options, moving_cfg
            )
            lap("refine affine")

        fpad, pads = pad_to_multiple(fpre.data, SIZE_MULTIPLE)
        pad_affine = fpre.affine @ _translation([-b for b, _ in pads])
        field_mm: np.ndarray | None = None
        field_affine: np.ndarray | None = None
        matrix = np.eye(3, 4)  # the affine head's identity (in either convention) when the network does not run
        if options.network:
            # moving onto the fixed model grid through world space (initial alignment); 0 = background
            moving_on_fixed = resample_to_grid(
                mpre.data, np.linalg.inv(initial) @ mpre.affine, fpre.affine, fpre.data.shape, order=1, mode="constant"
            )
            mpad, _ = pad_to_multiple(moving_on_fixed, SIZE_MULTIPLE)
            out = self.backend.run({"fixed": fpad[None, None], "moving": mpad[None, None]}, ["affine", "dvf"])
            matrix = out["affine"][0].astype(np.float64)
            dvf = out["dvf"][0]  # [3, *padded fixed model grid], voxels
            # world field on the padded model grid. The padded grid is kept: where the fixed image
            # reaches past the last model voxel centre (resampling rounds the size), the network's
            # own prediction in the margin beats repeating the edge.
            field_mm = dvf_voxel_to_mm(dvf, pad_affine).astype(np.float32)
            field_affine = pad_affine
            lap("network")

        refinement: list[dict[str, Any]] = []
        if refiner is not None:
            result = refine_world_field(
                refiner,
                fvol,
                mvol,
                cfg,
                field_mm,
                field_affine,
                initial,
                options,
                timer=lap,
                moving_cfg=moving_cfg,
            )
            field_mm, field_affine = result.dvf_mm, result.affine
            refinement = result.levels
            for level in refinement:
                level["start"] = "network" if result.started_from_network else "initial alignment"
        assert field_mm is not None and field_affine is not None  # RefineOptions: no network means refinement

        dvf_mm = resample_to_grid(field_mm, field_affine, fvol.affine, fvol.data.shape, order=1, mode="nearest")
        dvf_mm = compose_initial(initial, dvf_mm, fvol.affine)
        fill = float(mvol.data.min()) if self.fill == "min" else float(self.fill)
        warped = warp_by_displacement(mvol.data, mvol.affine, fvol.affine, dvf_mm, order=1, cval=fill)
        before = warp_by_displacement(
            mvol.data, mvol.affine, fvol.affine, None, order=1, cval=fill, shift_mm=shift, dst_shape=fvol.data.shape
        )
        warped_labels = [
            warp_by_displacement(lab, lab_aff, fvol.affine, dvf_mm, order=0, cval=0) for lab, lab_aff, _ in label_maps
        ]
        lap("warp")

        # the affine head's matrix as a world map (fixed RAS mm -> moving RAS mm)
        vox = np.eye(4)
        vox[:3] = network_affine_to_voxel(matrix, fpad.shape, model_affine_convention(self.info.model))
        world_matrix = initial @ pad_affine @ vox @ np.linalg.inv(pad_affine)

        fixed_n = normalize_intensity(fvol.data, cfg)
        det = jacobian_determinant(dvf_mm, fvol.affine)
        jmin, folding = folding_stats(det)
        metrics = {
            "ncc_before": ncc(fixed_n, normalize_intensity(before, moving_cfg)),
            "ncc_after": ncc(fixed_n, normalize_intensity(warped, moving_cfg)),
            "jacobian_min": jmin,
            "folding_percent": folding,
            "max_displacement_mm": max_displacement(dvf_mm),
        }
        dice_scores = score_labels(warped_labels, label_maps, reference_maps, fvol)
        metrics.update({f"dice_mean[{Path(name).name}]": scores["mean"] for name, scores in dice_scores.items()})
        lap("metrics")
        return Registration(
            warped=warped,
            affine=fvol.affine,
            dvf_mm=dvf_mm,
            labels=warped_labels,
            matrix=matrix,
            world_matrix=world_matrix,
            metrics=metrics,
            fixed=fvol.data,
            moving_before=before,
            fixed_source=fvol.source,
            moving_source=mvol.source,
            label_sources=[name for _, _, name in label_maps],
            init=init_used,
            shift_mm=shift,
            initial_matrix=initial,
            affine_refinement=affine_report,
            dice=dice_scores,
            stages=stages,
            refinement=refinement,
            modalities=(fpre.modality, mpre.modality),
            network=options.network,
        )
