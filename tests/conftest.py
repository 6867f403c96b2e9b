"""Shared fixtures: real anatomy from the MNI ICBM152 template shipped with nilearn,
so preprocessing and data tests run on true NIfTI files without downloads."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import nilearn
import numpy as np
import pytest

import gvsl.torch_backend  # noqa: F401 - registers the "torch" backend, as the CLI does

MNI_DIR = Path(nilearn.__file__).parent / "datasets" / "data"


def _mni(kind: str) -> Path:
    return MNI_DIR / f"mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz"


@pytest.fixture(scope="session")
def mni_t1_path() -> Path:
    """The 1 mm MNI T1 template (197x233x189, uint8)."""
    path = _mni("t1")
    if not path.exists():
        pytest.skip(f"nilearn's MNI template is missing: {path}")
    return path


@pytest.fixture(scope="session")
def mni_small_arrays(mni_t1_path: Path) -> dict[str, np.ndarray]:
    """T1, GM and WM templates decimated 4x and cropped to 40x48x40 (loaded once)."""
    out = {}
    for kind in ("t1", "gm", "wm"):
        full = np.asarray(nib.load(_mni(kind)).dataobj)
        out[kind] = np.ascontiguousarray(full[::4, ::4, ::4][5:45, 5:53, 4:44])
    return out


@pytest.fixture
def small_nifti_dir(tmp_path: Path, mni_small_arrays: dict[str, np.ndarray]) -> Path:
    """Folder with three small real volumes on deliberately different grids.

    t1.nii.gz: RAS, 4 mm, int16.  gm.nii.gz: x flipped (LAS), 4 mm, float32.
    wm.nii.gz: axes 0/1 swapped (ARS), 3 mm, uint8.
    """
    folder = tmp_path / "vols"
    folder.mkdir()
    t1, gm, wm = (mni_small_arrays[k] for k in ("t1", "gm", "wm"))

    aff = np.diag([4.0, 4.0, 4.0, 1.0])
    aff[:3, 3] = (-80.0, -110.0, -56.0)
    nib.save(nib.Nifti1Image(t1.astype(np.int16), aff), folder / "t1.nii.gz")

    aff = np.diag([-4.0, 4.0, 4.0, 1.0])
    aff[:3, 3] = (76.0, -110.0, -56.0)
    nib.save(nib.Nifti1Image(gm[::-1].astype(np.float32) / 255.0, aff), folder / "gm.nii.gz")

    aff = np.array(
        [[0.0, 3.0, 0.0, -60.0], [3.0, 0.0, 0.0, -80.0], [0.0, 0.0, 3.0, -40.0], [0, 0, 0, 1]]
    )
    nib.save(nib.Nifti1Image(wm.transpose(1, 0, 2).astype(np.uint8), aff), folder / "wm.nii.gz")
    return folder
