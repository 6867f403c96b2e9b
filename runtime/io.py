"""Inputs and outputs of the runtime: any volume source to a :class:`Volume`, batch
input listing, and atomic writers for everything the runtime saves.

A volume is a NIfTI path, a DICOM series folder, an in-memory ``(array,
affine)`` pair or a :class:`Volume`; all go through the same validation as
training (``gvsl.runtime.volume``), so a bad input is one
:class:`GvslInputError` naming it. Every writer goes to a temporary file in
the destination folder and renames it, so a crash or a concurrent reader
never sees half a file, and every file gets the user's umask (see ``atomic``).
"""

from __future__ import annotations

import glob
import io
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from .atomic import atomic_write, save_text
from .dicom import is_dicom_folder, load_dicom_series
from .errors import GvslInputError
from .nifti import has_volume_suffix, load_volume, write_image
from .volume import Volume, check_voxels, volume_from_array

__all__ = [
    "DEFAULT_MAX_VOXELS",
    "InputItem",
    "VolumeLike",
    "atomic_write",
    "list_inputs",
    "load_labels",
    "read_volume",
    "save_displacement_field",
    "save_npy",
    "save_npz",
    "save_text",
    "save_vector_nifti",
]

#: Default voxel limit per input (512 x 512 x 2048): large enough for whole-body CT,
#: small enough that one request cannot take a server's memory. Configurable.
DEFAULT_MAX_VOXELS = 512 * 512 * 2048

VolumeLike = Any  # str | PathLike | Volume | tuple[np.ndarray, np.ndarray]


def read_volume(
    x: VolumeLike, max_voxels: int | None = DEFAULT_MAX_VOXELS, name: str | None = None, keep_dtype: bool = False
) -> Volume:
    """Any supported volume source -> validated float32 :class:`Volume` (original grid);
    ``keep_dtype``: integer NIfTI data stays in its stored type (see :func:`load_volume`)."""
    if isinstance(x, Volume):
        vol = volume_from_array(x.data, x.affine, source=name or x.source)
    elif isinstance(x, tuple | list) and len(x) == 2 and not isinstance(x[0], str | os.PathLike):
        data, affine = x
        vol = volume_from_array(data, affine, source=name or "<array>")
    elif isinstance(x, str | os.PathLike):
        p = Path(x)
        if p.is_dir():
            if not is_dicom_folder(p):
                raise GvslInputError(
                    f"{x}: folder holds no DICOM files; give a NIfTI file or a DICOM series folder", str(x)
                )
            return load_dicom_series(p, max_voxels=max_voxels)
        return load_volume(p, max_voxels=max_voxels, keep_dtype=keep_dtype)
    else:
        raise GvslInputError(
            f"{name or type(x).__name__}: give a file path, a DICOM folder or an (array, affine) pair, not "
            f"{type(x).__name__}"
        )
    check_voxels(vol.data.shape, max_voxels, vol.source)
    return vol


def load_labels(x: VolumeLike, max_voxels: int | None = DEFAULT_MAX_VOXELS) -> tuple[np.ndarray, np.ndarray, str]:
    """A label map as ``(integer array, affine, name)``: values must be whole numbers,
    so nearest-neighbour warping can hand back exactly the same labels."""
    vol = read_volume(x, max_voxels=max_voxels)
    data = vol.data
    dtype = np.int32
    if isinstance(x, str | os.PathLike) and Path(x).is_file():
        on_disk = nib.load(str(x)).get_data_dtype()
        if np.issubdtype(on_disk, np.integer) and np.dtype(on_disk).itemsize <= 4:
            dtype = np.dtype(on_disk).type
    elif isinstance(x, tuple | list) and np.issubdtype(np.asarray(x[0]).dtype, np.integer):
        dtype = np.asarray(x[0]).dtype.type
    rounded = np.rint(data)
    if not np.array_equal(rounded, data):
        raise GvslInputError(
            f"{vol.source}: label map has non-integer values; give a segmentation with whole-number labels",
            vol.source,
        )
    return rounded.astype(dtype), vol.affine, vol.source


# ----------------------------------------------------------------------------- batch inputs
@dataclass(frozen=True)
class InputItem:
    """One batch input and the relative output name (no suffix) derived from it."""

    path: Path
    key: str


def _strip_suffix(name: str) -> str:
    low = name.lower()
    for suf in (".nii.gz", ".nii", ".mgz", ".mgh", ".img", ".hdr"):
        if low.endswith(suf):
            return name[: -len(suf)]
    return name


def _scan_folder(root: Path) -> list[Path]:
    """NIfTI files and DICOM series folders under ``root`` (recursive, sorted)."""
    found: list[Path] = []
    if is_dicom_folder(root):
        found.append(root)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        d = Path(dirpath)
        for f in sorted(filenames):
            if has_volume_suffix(f) and not f.startswith(".") and not f.lower().endswith(".img"):
                found.append(d / f)
        for sub in dirnames:
            if is_dicom_folder(d / sub):
                found.append(d / sub)
    return found


def list_inputs(specs: Iterable[str | os.PathLike[str]]) -> tuple[list[InputItem], list[tuple[str, str]]]:
    """Expand files, folders (recursive) and glob patterns into inputs.

    Returns ``(items, problems)``: a spec that matches nothing is a problem, not
    an exception, so a batch still runs the rest. Output keys keep the folder
    structure below a folder argument (``ct/p1/scan.nii.gz`` -> ``p1/scan``;
    with several arguments the folder's own name leads: ``ct/p1/scan``), so
    same-named files in different folders do not overwrite each other; two
    inputs with the same key are reported instead of silently clobbered.
    Files and globs are keyed by file name.
    """
    items: list[InputItem] = []
    problems: list[tuple[str, str]] = []
    specs = [str(s) for s in specs]
    for s in specs:
        p = Path(s)
        if p.is_dir():
            found = _scan_folder(p)
            if not found:
                problems.append((s, "folder holds no NIfTI files or DICOM series"))
            # one folder: keys relative to it; several arguments: prefixed with the folder's name
            top = Path(p.resolve().name)
            for f in found:
                rel = f.relative_to(p) if f != p else Path()
                key = (top / rel) if (len(specs) > 1 or f == p) else rel
                items.append(InputItem(f, _strip_suffix(key.as_posix())))
        elif p.is_file():
            items.append(InputItem(p, _strip_suffix(p.name)))
        elif glob.has_magic(s):
            matches = sorted(glob.glob(s, recursive=True))
            hits = [
                Path(m)
                for m in matches
                if (Path(m).is_file() and has_volume_suffix(m) and not m.lower().endswith(".img")) or is_dicom_folder(m)
            ]
            if not hits:
                problems.append((s, "pattern matches no NIfTI file or DICOM folder"))
            items += [InputItem(h, _strip_suffix(h.name)) for h in hits]
        else:
            problems.append((s, "file not found; check the path"))
    seen: dict[str, Path] = {}
    unique: list[InputItem] = []
    for it in items:
        if it.key in seen:
            if seen[it.key].resolve() != it.path.resolve():
                problems.append((str(it.path), f"same output name as {seen[it.key]}; put them in separate folders"))
            continue
        seen[it.key] = it.path
        unique.append(it)
    return unique, problems


# ----------------------------------------------------------------------------- writers
def save_npy(path: str | os.PathLike[str], array: np.ndarray) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(array))

    return atomic_write(path, write)


def save_npz(path: str | os.PathLike[str], **arrays: np.ndarray) -> Path:
    def write(tmp: str) -> None:
        buf = io.BytesIO()
        np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
        Path(tmp).write_bytes(buf.getvalue())

    return atomic_write(path, write)


def save_vector_nifti(
    path: str | os.PathLike[str], vectors: np.ndarray, affine: np.ndarray, intent: str = "vector"
) -> Path:
    """Write ``vectors [X, Y, Z, K]`` as a 5-D NIfTI ``[X, Y, Z, 1, K]`` with ``intent``
    (the layout ITK, ANTs and SimpleITK read as a vector image)."""
    v = np.asarray(vectors, dtype=np.float32)
    img = nib.Nifti1Image(v[:, :, :, None, :], np.asarray(affine, dtype=np.float64))
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    img.header.set_intent(intent)
    img.header.set_xyzt_units("mm")
    return atomic_write(path, lambda tmp: write_image(img, tmp))


def save_displacement_field(path: str | os.PathLike[str], dvf_mm_ras: np.ndarray, affine: np.ndarray) -> Path:
    """Write a displacement field the way ITK / ANTs / SimpleITK apply it.

    ``dvf_mm_ras`` is ``[3, X, Y, Z]``: for each voxel of the grid ``affine``
    (the fixed image's), the displacement in RAS millimetres from the fixed
    point to the corresponding moving point (a pull-back field:
    ``moving_point = fixed_point + d(fixed_point)``). ITK stores vectors in its
    LPS physical frame and reads NIfTI vector components as they are, so the
    file holds ``(-dx, -dy, dz)`` (RAS -> LPS), in a 5-D ``[X, Y, Z, 1, 3]``
    image with intent ``vector`` (1007) — the same convention as ANTs'
    ``*Warp.nii.gz``. nibabel users: negate the first two components to get
    RAS millimetres back.
    """
    d = np.asarray(dvf_mm_ras, dtype=np.float32)
    if d.ndim != 4 or d.shape[0] != 3:
        raise ValueError(f"displacement field must be [3, X, Y, Z], got {d.shape}")
    lps = np.moveaxis(d, 0, -1).copy()
    lps[..., :2] *= -1.0
    return save_vector_nifti(path, lps, affine, intent="vector")
