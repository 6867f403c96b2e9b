"""Reading a ``.nii.gz`` and preprocessing it at the same time: the fast path of
:func:`gvsl.runtime.preprocess.load_preprocessed`.

For a ``.nii.gz`` of unscaled integers, inflating takes most of the time and
runs on one core (ISA-L releases the GIL). A thread inflates the stream while
the caller's thread resamples each slab of z-planes already inflated along x
and y (those passes need nothing outside the slab); the z pass, if any, runs at
the end on the smaller array. The numbers are those of reading the file and
then preprocessing it.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation

from .cpu_pool import PARALLEL_MIN_VOXELS
from .intensity import normalize_intensity, resolve_modality
from .layout import to_c_float32
from .nifti import DIRECT_DTYPES, is_unscaled
from .preprocess_config import PreprocessConfig
from .resampling import RAS_ORNT, canonical_geometry, resample_axis, resample_plan
from .volume import Volume

#: Bytes of stored voxels per streamed slab: big enough for the resampling threads,
#: small enough that the first slab arrives early and the last one leaves little work.
_SLAB_BYTES = 8 << 20


def stream_preprocess(
    img: Any, shape3: tuple[int, int, int], aff: np.ndarray, p: Path, cfg: PreprocessConfig
) -> tuple[Volume, Volume] | None:
    """``(volume as stored, preprocessed volume)`` of a file :func:`~gvsl.runtime.nifti.open_nifti`
    has opened, read and preprocessed at once; None where this path does not apply (no
    isal, scaled or float data, axes that reorientation permutes, nothing to resample
    within a slab, a stream that ends early), and the caller then reads it plainly."""
    name = str(p)
    if not name.lower().endswith(".nii.gz") or cfg.spacing is None:
        return None
    try:
        from isal import isal_zlib
    except ImportError:
        return None
    proxy = img.dataobj
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)) or getattr(proxy, "order", "F") != "F":
        return None
    dtype = np.dtype(proxy.dtype)
    if not is_unscaled(proxy) or dtype.kind not in "iu":
        return None
    if dtype.name not in DIRECT_DTYPES or int(np.prod(shape3)) < PARALLEL_MIN_VOXELS:
        return None
    ornt, _, affine = canonical_geometry(shape3, aff) if cfg.canonical else (RAS_ORNT, shape3, aff)
    if not np.array_equal(ornt[:, 0], [0, 1, 2]):
        return None  # a permuted axis order: the slabs would not be slabs of the output
    rev = np.eye(4)[[2, 1, 0, 3]]
    plan = resample_plan(shape3[::-1], affine @ rev, tuple(cfg.spacing)[::-1])
    if plan is None or plan[0] == [0]:
        return None  # nothing to do within a slab
    passes, scale, new_shape, new_affine = plan

    nx, ny, nz = shape3
    offset, plane = int(proxy.offset), nx * ny * dtype.itemsize
    total = offset + nz * plane
    buf = np.empty(total, dtype=np.uint8)
    state = {"ready": 0, "error": None}
    cond = threading.Condition()

    def inflate() -> None:
        try:
            d, pos = isal_zlib.decompressobj(31), 0
            with open(p, "rb") as f:
                while pos < total:
                    chunk = f.read(1 << 22)
                    if not chunk:
                        break
                    out = d.decompress(chunk)
                    n = min(len(out), total - pos)
                    buf[pos : pos + n] = np.frombuffer(out, dtype=np.uint8, count=n)
                    pos += n
                    with cond:
                        state["ready"] = pos
                        cond.notify()
            if pos < total:
                raise EOFError(f"stream ended after {pos} of {total} bytes")
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            with cond:
                state["error"] = e
                cond.notify()

    raw = buf[offset:].view(dtype).reshape(shape3, order="F")
    view = apply_orientation(raw, ornt).T  # [z, y, x]: C-ordered up to flips
    in_plane = [a for a in passes if a != 0]
    mid_shape = (nz, int(new_shape[1]) if 1 in passes else ny, int(new_shape[2]) if 2 in passes else nx)
    mid = np.empty(mid_shape, dtype=np.float32)
    step = max(1, _SLAB_BYTES // plane)
    z_flip = ornt[2, 1] < 0
    worker = threading.Thread(target=inflate, name="gvsl-inflate", daemon=True)
    worker.start()
    try:
        for z0 in range(0, nz, step):
            z1 = min(nz, z0 + step)
            with cond:
                while state["ready"] < offset + z1 * plane and state["error"] is None:
                    cond.wait()
                if state["error"] is not None:
                    break
            a, b = (nz - z1, nz - z0) if z_flip else (z0, z1)  # the slab's planes in the oriented view
            slab = view[a:b]
            for ax in in_plane:
                slab = resample_axis(slab, ax, int(new_shape[ax]), float(scale[ax]), 1)
            mid[a:b] = slab
    finally:
        worker.join()
    if state["error"] is not None:
        return None  # truncated or unusual stream: the plain path reports or handles it
    data = mid
    if 0 in passes:
        data = resample_axis(data, 0, int(new_shape[0]), float(scale[0]), 1)
    out = to_c_float32(data.T)
    vol = Volume(data=raw, affine=aff, source=name)
    modality = resolve_modality(out, cfg, name)
    normalised = normalize_intensity(out, replace(cfg, modality=modality), inplace=True)
    return vol, Volume(data=normalised, affine=new_affine @ rev, source=name, modality=modality)


__all__ = ["stream_preprocess"]
