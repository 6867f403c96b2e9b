"""``Registrar``: register a moving volume to a fixed one with a gvsl registration graph.

Everything is returned **on the fixed image's original grid and affine**, in
the moving image's original intensities, so results drop straight into the
clinical pipeline:

1. both volumes are preprocessed with the model's settings (RAS+,
   resampling, normalisation); the moving one is then resampled onto the
   fixed one's model grid through world coordinates (``init="world"``: the
   scanners' frames are trusted; ``init="center"``: the two field-of-view
   centres are superimposed first, for images whose world origins disagree);
2. the graph predicts the affine and the fused displacement ``dvf`` (voxels,
   pull-back: fixed voxel ``p`` reads moving voxel ``p + dvf(p)``) on the
   padded model grid;
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
the fixed grid) before (initial alignment only) and after, and the Jacobian
determinant of ``x -> x + d(x)``: minimum and % of voxels with det <= 0
(folding).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import artifact as A
from .backends import Backend, ModelInfo, load_backend
from .errors import GvslInputError
from .geometry import dvf_voxel_to_mm, model_affine_convention, network_affine_to_voxel
from .io import DEFAULT_MAX_VOXELS, VolumeLike, load_labels, read_volume, save_displacement_field
from .metrics import folding_stats, jacobian_determinant, ncc
from .preprocess import Volume, normalize_intensity, pad_to_multiple, preprocess, save_nifti
from .warp import resample_to_grid, warp_by_displacement

__all__ = ["INITS", "Registrar", "Registration", "network_affine_to_voxel"]

INITS = ("world", "center")
SIZE_MULTIPLE = 16


def _translation(v: Sequence[float]) -> np.ndarray:
    t = np.eye(4)
    t[:3, 3] = v
    return t


def _centre(vol: Volume) -> np.ndarray:
    a = vol.affine
    return a[:3, :3] @ ((np.asarray(vol.data.shape, dtype=np.float64) - 1) / 2) + a[:3, 3]


@dataclass
class Registration:
    """Result of :meth:`Registrar.register`; every array is on the fixed image's grid
    (``affine``, shape of ``fixed``).

    ``warped`` moving image (its own intensities); ``labels`` warped label maps
    (same dtype and values as given); ``dvf_mm`` ``[3, X, Y, Z]`` pull-back
    displacement in RAS mm (``moving_point = fixed_point + d``);
    ``matrix`` the affine head's ``[3, 4]`` (official normalised convention)
    and ``world_matrix`` the same affine as a 4x4 RAS map fixed mm -> moving mm
    (initial shift included); ``moving_before`` the moving image after the
    initial alignment only; ``metrics`` the quality figures.
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


class Registrar:
    """Deformable registration with a gvsl registration graph (thread-safe; reuse it).

    ``model``: export folder / ``registration.onnx`` (onnxruntime, tensorrt)
    or a trained model folder / ``.pth`` (torch). ``init``: "world" or
    "center" (see module doc). ``fill``: value outside the moving image's
    field of view ("min" = its minimum, i.e. air/background). Extra keywords
    go to the backend (``threads``, ``cache_dir``, ``max_shape`` ...).
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | Backend,
        backend: str = "auto",
        device: str = "auto",
        *,
        init: str = "world",
        fill: float | str = "min",
        max_voxels: int | None = DEFAULT_MAX_VOXELS,
        **backend_options: Any,
    ) -> None:
        if init not in INITS:
            raise GvslInputError(f"--init {init}: use one of {', '.join(INITS)}")
        if not (fill == "min" or isinstance(fill, int | float)):
            raise GvslInputError(f"fill must be 'min' or a number, got {fill!r}")
        if isinstance(model, Backend):
            self.backend = model
        else:
            self.backend = load_backend(model, A.REGISTRATION, backend, device, **backend_options)
        if self.backend.info.kind != A.REGISTRATION:
            raise GvslInputError(f"{self.backend.info.path}: not a registration graph", self.backend.info.path)
        self.init = init
        self.fill = fill
        self.max_voxels = max_voxels

    @property
    def info(self) -> ModelInfo:
        return self.backend.info

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> Registrar:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def register(
        self,
        fixed: VolumeLike,
        moving: VolumeLike,
        labels: VolumeLike | Sequence[VolumeLike] | None = None,
    ) -> Registration:
        """Register ``moving`` onto ``fixed``; ``labels`` are label maps of the moving
        image (one or a list; any grid, their own affine is used)."""
        fvol = read_volume(fixed, max_voxels=self.max_voxels, name=None)
        mvol = read_volume(moving, max_voxels=self.max_voxels, name=None)
        if labels is None:
            label_list: list[Any] = []
        elif isinstance(labels, list):
            label_list = labels
        else:
            label_list = [labels]
        label_maps = [load_labels(lab, max_voxels=self.max_voxels) for lab in label_list]
        cfg = self.info.preprocess
        fpre = preprocess(fvol, cfg)
        mpre = preprocess(mvol, cfg)
        shift = _centre(mvol) - _centre(fvol) if self.init == "center" else np.zeros(3)

        # moving onto the fixed model grid through world space (+ initial shift); 0 = background
        moving_on_fixed = resample_to_grid(
            mpre.data, _translation(-shift) @ mpre.affine, fpre.affine, fpre.data.shape, order=1, mode="constant"
        )
        fpad, pads = pad_to_multiple(fpre.data, SIZE_MULTIPLE)
        mpad, _ = pad_to_multiple(moving_on_fixed, SIZE_MULTIPLE)
        out = self.backend.run({"fixed": fpad[None, None], "moving": mpad[None, None]}, ["affine", "dvf"])
        matrix = out["affine"][0].astype(np.float64)
        dvf = out["dvf"][0]  # [3, *padded fixed model grid], voxels

        # world field on the fixed image's own grid. The padded grid is kept: where the
        # fixed image reaches past the last model voxel centre (resampling rounds the
        # size), the network's own prediction in the margin beats repeating the edge.
        pad_affine = fpre.affine @ _translation([-b for b, _ in pads])
        d_model = dvf_voxel_to_mm(dvf, pad_affine).astype(np.float32)
        dvf_mm = resample_to_grid(d_model, pad_affine, fvol.affine, fvol.data.shape, order=1, mode="nearest")
        dvf_mm += shift.reshape(3, 1, 1, 1).astype(np.float32)

        fill = float(mvol.data.min()) if self.fill == "min" else float(self.fill)
        warped = warp_by_displacement(mvol.data, mvol.affine, fvol.affine, dvf_mm, order=1, cval=fill)
        before = warp_by_displacement(
            mvol.data, mvol.affine, fvol.affine, None, order=1, cval=fill, shift_mm=shift, dst_shape=fvol.data.shape
        )
        warped_labels = [
            warp_by_displacement(lab, lab_aff, fvol.affine, dvf_mm, order=0, cval=0) for lab, lab_aff, _ in label_maps
        ]

        # the affine head's matrix as a world map (fixed RAS mm -> moving RAS mm)
        vox = np.eye(4)
        vox[:3] = network_affine_to_voxel(matrix, fpad.shape, model_affine_convention(self.info.model))
        world_matrix = _translation(shift) @ pad_affine @ vox @ np.linalg.inv(pad_affine)

        fixed_n = normalize_intensity(fvol.data, cfg)
        det = jacobian_determinant(dvf_mm, fvol.affine)
        jmin, folding = folding_stats(det)
        metrics = {
            "ncc_before": ncc(fixed_n, normalize_intensity(before, cfg)),
            "ncc_after": ncc(fixed_n, normalize_intensity(warped, cfg)),
            "jacobian_min": jmin,
            "folding_percent": folding,
            "max_displacement_mm": float(np.sqrt((dvf_mm.astype(np.float64) ** 2).sum(axis=0)).max()),
        }
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
        )
