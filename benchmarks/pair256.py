"""Write the 256^3 registration pair of BENCHMARKS.md ("A 256^3 pair: peak memory and where the
time goes"): nilearn's MNI ICBM152 2009a T1 (1 mm) zero-padded to 256^3 as the fixed image, and
the same voxels under a frame rotated by (2, 0, 4) degrees and shifted by (6, -4, 3) mm as the
moving one, so the true transform is known and rigid:

    python benchmarks/pair256.py OUT_FOLDER   # writes fixed256.nii.gz and moving256.nii.gz
"""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np


def _rotation(degrees: tuple[float, float, float]) -> np.ndarray:
    rx, ry, rz = np.deg2rad(degrees)
    x = np.array([[1, 0, 0], [0, np.cos(rx), -np.sin(rx)], [0, np.sin(rx), np.cos(rx)]])
    y = np.array([[np.cos(ry), 0, np.sin(ry)], [0, 1, 0], [-np.sin(ry), 0, np.cos(ry)]])
    z = np.array([[np.cos(rz), -np.sin(rz), 0], [np.sin(rz), np.cos(rz), 0], [0, 0, 1]])
    return z @ y @ x


def main(out: Path) -> None:
    from gvsl.synth import template_paths

    t1 = nib.load(template_paths()["t1"])
    data = np.asarray(t1.dataobj, dtype=np.float32)
    padded = np.zeros((256, 256, 256), np.float32)
    start = [(256 - n) // 2 for n in data.shape]
    padded[tuple(slice(s, s + n) for s, n in zip(start, data.shape, strict=True))] = data
    affine = t1.affine.copy()
    affine[:3, 3] -= affine[:3, :3] @ np.asarray(start, dtype=np.float64)
    frame = np.eye(4)
    frame[:3, :3] = _rotation((2.0, 0.0, 4.0))
    frame[:3, 3] = (6.0, -4.0, 3.0)
    out.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(padded, affine), out / "fixed256.nii.gz")
    nib.save(nib.Nifti1Image(padded, frame @ affine), out / "moving256.nii.gz")
    print(f"{out}/fixed256.nii.gz, {out}/moving256.nii.gz: 256^3 at 1 mm")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "."))
