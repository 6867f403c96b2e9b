"""The runtime's volume record and the checks every volume passes, whatever its source.

A :class:`Volume` is what every reader returns (a NIfTI file, a DICOM series, an
in-memory array) and what preprocessing, embedding and registration take. The
checks here (shape, voxel count, affine, finite values) are shared by those
readers, so a bad input gets the same one-line :class:`GvslInputError`, naming
it and the fix, wherever it came from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import GvslInputError
from .geometry import voxel_spacing


@dataclass
class Volume:
    """A 3-D float32 array and the 4x4 affine mapping its voxel indices to world mm."""

    data: np.ndarray
    affine: np.ndarray
    source: str = "<array>"
    #: how :func:`gvsl.runtime.preprocess.preprocess` normalised it ("ct", "mr", "none"; None before preprocessing),
    #: so outputs can report what ``--modality auto`` decided
    modality: str | None = None

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm (column norms of the affine)."""
        return tuple(float(s) for s in voxel_sizes(self.affine))  # type: ignore[return-value]


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
    """Voxel size along each array axis = norm of the affine's 3x3 columns, as an array
    (:func:`gvsl.runtime.geometry.voxel_spacing`, which gives them as floats)."""
    return np.asarray(voxel_spacing(affine), dtype=np.float64)


def volume_from_array(data: Any, affine: Any, source: str = "<array>") -> Volume:
    """Wrap an in-memory array with the same validation as :func:`gvsl.runtime.nifti.load_volume`."""
    arr = np.asarray(data)
    if arr.dtype.kind not in "biuf":
        raise GvslInputError(
            f"{source}: voxel type {arr.dtype} is not a real number type; give a numeric array",
            source,
        )
    shape3 = spatial_shape(arr.shape, source)
    aff = check_affine(affine, source)
    arr = np.ascontiguousarray(arr.reshape(shape3), dtype=np.float32)
    check_finite(arr, source)
    return Volume(data=arr, affine=aff, source=source)


def spatial_shape(shape: tuple[int, ...], name: str) -> tuple[int, int, int]:
    """Validate a raw shape and return it as 3-D (trailing singleton dims dropped)."""
    shape = tuple(int(s) for s in shape)
    if any(s == 0 for s in shape) or len(shape) == 0:
        raise GvslInputError(f"{name}: volume is empty (shape {shape}); give a volume with voxels", name)
    squeezed = shape
    while len(squeezed) > 3 and squeezed[-1] == 1:
        squeezed = squeezed[:-1]
    if len(squeezed) > 3:
        raise GvslInputError(
            f"{name}: volume is {len(shape)}-D ({format_shape(shape)}); give a single 3-D volume "
            "(split it with fslsplit or nibabel)",
            name,
        )
    if len(squeezed) < 3 or min(squeezed) < 2:
        raise GvslInputError(
            f"{name}: image is 2-D ({format_shape(shape)}); GVSL needs a 3-D volume with at least "
            "2 voxels along every axis (stack the slices into one NIfTI, e.g. with dcm2niix)",
            name,
        )
    return squeezed  # type: ignore[return-value]


def check_voxels(shape: tuple[int, int, int], max_voxels: int | None, name: str) -> None:
    """Refuse a volume of more than ``max_voxels`` voxels (None: no limit), so one input cannot
    take a server's memory; readers call it on the header, before reading any voxel."""
    n = math.prod(shape)
    if max_voxels is not None and n > max_voxels:
        raise GvslInputError(
            f"{name}: volume has {n} voxels ({format_shape(shape)}), more than the limit of "
            f"{max_voxels}; crop or downsample it first, or raise the limit",
            name,
        )


def check_affine(affine: Any, name: str) -> np.ndarray:
    """``affine`` as a float64 4x4 voxel-to-world matrix, refused unless it is finite and invertible
    (every world position and resampling step depends on it)."""
    try:
        aff = np.asarray(affine, dtype=np.float64)
    except (TypeError, ValueError):
        aff = np.full((4, 4), np.nan)
    if aff.shape != (4, 4):
        raise GvslInputError(f"{name}: affine must be 4x4, got shape {aff.shape}", name)
    ok = bool(np.isfinite(aff).all())
    if ok:
        det = float(np.linalg.det(aff[:3, :3]))
        ok = math.isfinite(det) and abs(det) > 1e-12 * max(1.0, float(np.abs(aff[:3, :3]).max()) ** 3)
    if not ok:
        raise GvslInputError(
            f"{name}: voxel-to-world affine is not finite or not invertible; fix the header's "
            "sform/qform (voxel sizes and directions) and save again",
            name,
        )
    return aff


def check_finite(data: np.ndarray, name: str) -> None:
    """Refuse voxels that are NaN or Inf: one would spread through resampling and every window."""
    if not np.isfinite(data).all():
        bad = int(data.size - np.count_nonzero(np.isfinite(data)))
        raise GvslInputError(
            f"{name}: {bad} voxel(s) are NaN or Inf; replace them (e.g. numpy.nan_to_num) and save again",
            name,
        )


def format_shape(shape: tuple[int, ...]) -> str:
    """A shape as error messages write it: ``512x512x300``."""
    return "x".join(str(int(s)) for s in shape)


def one_line(e: BaseException, limit: int = 120) -> str:
    """An exception's message on one line, cut to ``limit`` characters, to quote inside an error."""
    msg = " ".join(str(e).split()) or "no details"
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


__all__ = [
    "Volume",
    "check_affine",
    "check_finite",
    "check_voxels",
    "format_shape",
    "one_line",
    "spatial_shape",
    "volume_from_array",
    "voxel_sizes",
]
