"""DICOM series folders as volumes, read with SimpleITK's GDCM series reader.

Clinical servers receive DICOM, so a series folder is accepted wherever a
NIfTI is. Slice ordering, spacing and orientation come from GDCM (via
``ImageSeriesReader``), never from our own sorting. SimpleITK is optional
(``pip install 'gvsl[dicom]'``) and imported only when a DICOM folder shows up.

ITK works in LPS physical space, NIfTI/nibabel in RAS: the returned affine is
``diag(-1, -1, 1, 1) @ [direction * spacing | origin]`` with array axes in ITK
index order (x, y, z), which is exactly what ``dcm2niix`` / SimpleITK's own
NIfTI writer would store.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .errors import GvslInputError
from .volume import Volume, check_voxels, volume_from_array

__all__ = ["is_dicom_file", "is_dicom_folder", "load_dicom_series", "sitk_to_ras_affine"]

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def is_dicom_file(path: str | os.PathLike[str]) -> bool:
    """True for a DICOM Part 10 file (``DICM`` at byte 128) — the standard's own marker."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def is_dicom_folder(path: str | os.PathLike[str], probe: int = 20) -> bool:
    """A folder whose own files (not sub-folders) include DICOM files (checks up to ``probe``)."""
    p = Path(path)
    if not p.is_dir():
        return False
    seen = 0
    for child in sorted(p.iterdir()):
        if child.is_file():
            if child.suffix.lower() == ".dcm" or is_dicom_file(child):
                return True
            seen += 1
            if seen >= probe:
                break
    return False


def _sitk() -> Any:
    try:
        import SimpleITK as sitk
    except ImportError:
        raise GvslInputError(
            "reading DICOM needs SimpleITK: pip install 'gvsl[dicom]' (or convert the series with dcm2niix)"
        ) from None
    return sitk


def sitk_to_ras_affine(image: Any) -> np.ndarray:
    """4x4 voxel(x, y, z) -> RAS mm affine of a 3-D SimpleITK image."""
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.asarray(image.GetSpacing(), dtype=np.float64)[None, :]
    lps[:3, 3] = image.GetOrigin()
    return _LPS_TO_RAS @ lps


def load_dicom_series(
    folder: str | os.PathLike[str], series_uid: str | None = None, max_voxels: int | None = None
) -> Volume:
    """Read one DICOM series folder as a float32 RAS-affine :class:`Volume`.

    A folder holding several series is refused (naming them) unless
    ``series_uid`` picks one: guessing could silently read a scout or the
    wrong phase.
    """
    sitk = _sitk()
    name = str(folder)
    p = Path(folder)
    if not p.is_dir():
        raise GvslInputError(f"{name}: not a folder; give a DICOM series folder", name)
    reader = sitk.ImageSeriesReader()
    try:
        ids = list(reader.GetGDCMSeriesIDs(str(p)))
    except RuntimeError as e:
        raise GvslInputError(f"{name}: cannot scan for DICOM series ({_short(e)})", name) from None
    if not ids:
        raise GvslInputError(f"{name}: no DICOM series found in this folder; check the path", name)
    if series_uid is None:
        if len(ids) > 1:
            raise GvslInputError(
                f"{name}: holds {len(ids)} DICOM series ({', '.join(ids[:4])}{', ...' if len(ids) > 4 else ''}); "
                "put each series in its own folder or pass its SeriesInstanceUID",
                name,
            )
        series_uid = ids[0]
    elif series_uid not in ids:
        raise GvslInputError(f"{name}: no series {series_uid} here (found {', '.join(ids[:4])})", name)
    files = list(reader.GetGDCMSeriesFileNames(str(p), series_uid))
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as e:
        raise GvslInputError(
            f"{name}: DICOM series could not be read ({_short(e)}); check the files are complete", name
        ) from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise GvslInputError(f"{name}: colour/multi-component DICOM is not a CT/MR volume", name)
    if image.GetDimension() != 3:
        raise GvslInputError(f"{name}: series is {image.GetDimension()}-D; GVSL needs a 3-D volume", name)
    check_voxels(tuple(int(s) for s in image.GetSize()), max_voxels, name)
    data = sitk.GetArrayViewFromImage(image).transpose(2, 1, 0)  # (z, y, x) -> index order (x, y, z)
    return volume_from_array(np.asarray(data, dtype=np.float32), sitk_to_ras_affine(image), source=name)


def _short(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[-1] if lines else type(e).__name__)[:160]
