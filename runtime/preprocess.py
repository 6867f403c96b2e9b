"""The single preprocessing implementation, shared by training and inference, and the
public face of the modules it is built from.

Training caches what :func:`preprocess` returns and inference calls it on every
request, so the two can never drift apart. numpy / scipy / nibabel only: this
module is part of the torch-free runtime.

Conventions (GVSL_SPEC §4): volumes are turned to RAS+ closest canonical,
resampled to 1 mm³ by default, then intensities go to [0, 1] — CT by clipping HU
to [-1024, 1024] (the authors' [0, 2048] window on HU+1024 data), MR by robust
percentiles of the nonzero voxels. Resampling aligns voxel *centres*: the first
voxel centre stays where it was, so the affine only changes its zooms.

Each step lives in a module of its own, and the names users import are
re-exported here (``from gvsl.runtime.preprocess import ...``):

* :mod:`.preprocess_config` — :class:`PreprocessConfig`, the settings;
* :mod:`.volume` — :class:`Volume` and the checks every volume passes;
* :mod:`.nifti` — reading and writing NIfTI files; :mod:`.nifti_stream` — the
  overlapped read of a ``.nii.gz`` behind :func:`load_preprocessed`;
* :mod:`.resampling` — reorientation and resampling; :mod:`.intensity` — normalisation;
* :mod:`.padding` — padding to the sizes the network takes; :mod:`.layout` — the
  memory order of voxel arrays.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
from nibabel.orientations import apply_orientation

from .errors import GvslInputError
from .intensity import normalize_intensity, resolve_modality
from .layout import to_c_float32, x_fastest
from .nifti import VOLUME_SUFFIXES, load_volume, open_nifti, read_nifti, save_nifti
from .nifti_stream import stream_preprocess
from .padding import Pads, pad_to_multiple, pad_to_shape, unpad
from .preprocess_config import MODALITIES, PreprocessConfig, with_modality
from .resampling import RAS_ORNT, canonical_geometry, resample, resample_array, resample_plan, to_canonical
from .volume import Volume, volume_from_array, voxel_sizes


def preprocess(vol: Volume, cfg: PreprocessConfig) -> Volume:
    """canonical (if ``cfg.canonical``) → resample (if ``cfg.spacing``) → normalise.

    ``vol.data`` may be any real type in any memory order (float32 C-ordered out).

    The returned affine maps the preprocessed grid to world mm, so outputs
    computed on it (features, displacement fields) can be saved as NIfTI
    directly or mapped back to the input grid.
    """
    data, affine = vol.data, vol.affine
    if cfg.canonical:  # flips / transposes as a view: the resampling below reads it in place
        ornt, _, affine = canonical_geometry(data.shape, affine)
        if ornt is not RAS_ORNT:
            data = apply_orientation(data, ornt)
    if cfg.spacing is not None:
        if x_fastest(data):
            # NIfTI's x-fastest layout: resample the reversed-axes view, which is C-ordered, so
            # the passes stream through memory; only the result is transposed below
            rev = np.eye(4)[[2, 1, 0, 3]]
            out, out_affine = resample_array(data.T, affine @ rev, tuple(cfg.spacing)[::-1], order=1)
            data, affine = out.T, out_affine @ rev
        else:
            data, affine = resample_array(data, affine, cfg.spacing, order=1)
    owned = not np.may_share_memory(data, vol.data)
    data = to_c_float32(data)
    owned = owned or not np.may_share_memory(data, vol.data)
    modality = resolve_modality(data, cfg, vol.source)
    out = normalize_intensity(data, replace(cfg, modality=modality), inplace=owned)
    return Volume(data=out, affine=affine, source=vol.source, modality=modality)


def preprocessed_shape(vol: Volume, cfg: PreprocessConfig) -> tuple[int, int, int]:
    """The grid shape :func:`preprocess` gives ``vol`` under ``cfg``, without touching a voxel:
    for choosing a grid (``network_spacing``) before the one resampling that is then run."""
    shape, affine = tuple(int(n) for n in vol.data.shape[:3]), vol.affine
    if cfg.canonical:
        _, shape, affine = canonical_geometry(shape, affine)
    plan = resample_plan(shape, affine, cfg.spacing) if cfg.spacing is not None else None
    return shape if plan is None else tuple(int(n) for n in plan[2])


def load_preprocessed(
    path: str | os.PathLike[str], cfg: PreprocessConfig, max_voxels: int | None = None
) -> tuple[Volume, Volume]:
    """``(load_volume(path, keep_dtype=True), preprocess(it, cfg))`` — what
    ``Embedder.prepare`` and the training cache need — with the same numbers, faster.

    The header is read once. A ``.nii.gz`` of unscaled integers is inflated and
    resampled at once (:func:`gvsl.runtime.nifti_stream.stream_preprocess`);
    anything else takes the plain path, read then preprocess, which also gives
    the one-line errors.
    """
    p = Path(path)
    img, shape3, aff = open_nifti(p, str(path), max_voxels)  # once: both paths read this header
    streamed = stream_preprocess(img, shape3, aff, p, cfg)
    if streamed is not None:
        return streamed
    vol = read_nifti(img, shape3, aff, p, keep_dtype=True)
    return vol, preprocess(vol, cfg)


__all__ = [
    "MODALITIES",
    "VOLUME_SUFFIXES",
    "GvslInputError",
    "Pads",
    "PreprocessConfig",
    "Volume",
    "load_preprocessed",
    "load_volume",
    "normalize_intensity",
    "pad_to_multiple",
    "pad_to_shape",
    "preprocess",
    "preprocessed_shape",
    "resample",
    "resolve_modality",
    "save_nifti",
    "to_canonical",
    "unpad",
    "volume_from_array",
    "voxel_sizes",
    "with_modality",
]
