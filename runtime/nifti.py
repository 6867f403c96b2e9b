"""NIfTI files (and the MGH / Analyze volumes nibabel also reads): reading them as a
:class:`~gvsl.runtime.volume.Volume`, checked, and writing them atomically.

Every read failure is one :class:`GvslInputError` naming the file. The header is
checked before any voxel is read, so a voxel limit costs nothing on a huge file,
and the voxels are read in full at once, so a truncated gzip stream fails here
rather than halfway through training. Unscaled data is converted straight from
its stored type, and ``.nii.gz`` is inflated by ISA-L when it is installed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from .atomic import atomic_write
from .errors import GvslInputError
from .layout import as_float32
from .volume import Volume, check_affine, check_finite, check_voxels, format_shape, one_line, spatial_shape

#: File endings nibabel reads as single volumes we accept (.hdr/.img = Analyze/NIfTI pair).
VOLUME_SUFFIXES: tuple[str, ...] = (".nii", ".nii.gz", ".mgz", ".mgh", ".img", ".hdr")


def has_volume_suffix(name: str) -> bool:
    """Whether a file name ends in one of :data:`VOLUME_SUFFIXES` (any case)."""
    return name.lower().endswith(VOLUME_SUFFIXES)


def load_volume(
    path: str | os.PathLike[str], max_voxels: int | None = None, keep_dtype: bool = False, isal: bool = True
) -> Volume:
    """Read a NIfTI (or MGH / Analyze) volume as float32, validating everything.

    ``keep_dtype=True`` leaves unscaled integer data in its stored type (float32
    otherwise): for callers that only :func:`gvsl.runtime.preprocess.preprocess` it, which converts while
    it resamples, so a CT never gets a full-size float32 copy.
    ``isal=False`` inflates ``.nii.gz`` with nibabel's zlib reader instead of
    ISA-L (same values; ``gvsl bench --preprocess`` measures what ISA-L buys).

    Every failure is a :class:`GvslInputError` naming the file, so that a bad file
    in a folder of thousands reads as a one-line report, not a traceback. The
    header is checked before any data is read (so ``max_voxels`` is cheap), and
    the full read is forced here so truncated gzip streams fail now, not
    halfway through training.
    """
    p, name = Path(path), str(path)
    img, shape3, aff = open_nifti(p, name, max_voxels)
    return read_nifti(img, shape3, aff, p, keep_dtype, isal)


def open_nifti(p: Path, name: str, max_voxels: int | None) -> tuple[Any, tuple[int, int, int], np.ndarray]:
    """(nibabel image, 3-D shape, affine) after every check that needs only the header."""
    if not p.exists():
        raise GvslInputError(f"{name}: file not found; check the path", name)
    if p.is_dir():
        raise GvslInputError(f"{name}: is a folder; give a .nii or .nii.gz file", name)
    if not has_volume_suffix(p.name):
        raise GvslInputError(
            f"{name}: not a NIfTI file (expected .nii or .nii.gz); convert it, e.g. with dcm2niix or nibabel",
            name,
        )
    if p.stat().st_size == 0:
        raise GvslInputError(f"{name}: file is empty (0 bytes); re-export or re-copy it", name)
    try:
        img = nib.load(str(p))
        shape = tuple(img.shape)
        affine = img.affine
    except Exception as e:  # nibabel raises many unrelated types for garbage input
        raise GvslInputError(
            f"{name}: cannot read as NIfTI ({type(e).__name__}: {one_line(e)}); check the file "
            "is a valid, complete .nii/.nii.gz",
            name,
        ) from e
    shape3 = spatial_shape(shape, name)
    check_voxels(shape3, max_voxels, name)
    return img, shape3, check_affine(affine, name)


def read_nifti(
    img: Any, shape3: tuple[int, int, int], aff: np.ndarray, p: Path, keep_dtype: bool, isal: bool = True
) -> Volume:
    """The voxels of an :func:`open_nifti`-ed file as a :class:`Volume`; read errors name the file."""
    name = str(p)
    try:
        data, may_be_nonfinite = _read_voxels(img, shape3, p, keep_dtype, isal)
    except MemoryError as e:
        raise GvslInputError(
            f"{name}: not enough memory to load {format_shape(tuple(img.shape))} voxels; crop or downsample it",
            name,
        ) from e
    except Exception as e:  # EOFError, zlib.error, OSError, ValueError ... for truncated data
        raise GvslInputError(
            f"{name}: file is corrupt or truncated ({type(e).__name__}: {one_line(e)}); re-export or re-copy it",
            name,
        ) from e
    if may_be_nonfinite:
        check_finite(data, name)
    return Volume(data=data, affine=aff, source=name)


#: Stored types whose float32 conversion needs no scaling and matches nibabel's
#: ``get_fdata(dtype=float32)`` bit for bit (one rounding at most); others take nibabel's path.
DIRECT_DTYPES = frozenset("int8 uint8 int16 uint16 int32 uint32 float32 float64".split())


def _read_voxels(
    img: Any, shape3: tuple[int, int, int], path: Path, keep_dtype: bool = False, isal: bool = True
) -> tuple[np.ndarray, bool]:
    """(float32 voxels, whether they can hold NaN/Inf), the values of
    ``img.get_fdata(dtype=float32)``, in the file's own layout (``keep_dtype``:
    unscaled integer data stays in its stored type).

    NIfTI stores x fastest. The array keeps that layout (x-fastest, Fortran
    order) instead of being transposed to C order here: :func:`gvsl.runtime.preprocess.preprocess`
    resamples the reversed-axes view, which is C-ordered, and transposes only
    its (usually smaller) result. Unscaled data is converted straight from the
    stored type; integer data skips the NaN scan; ``.nii.gz`` is inflated with
    ISA-L when ``isal`` is installed (about twice zlib's speed).
    """
    proxy = img.dataobj
    if nib.is_proxy(proxy) and is_unscaled(proxy) and hasattr(proxy, "get_unscaled"):
        raw = _inflate_nifti(img, path) if isal else None
        if raw is None:
            raw = np.asanyarray(proxy.get_unscaled())
        if raw.dtype.name in DIRECT_DTYPES:
            raw = raw.reshape(shape3, order="A")
            if keep_dtype and raw.dtype.kind in "iu":
                return raw, False
            return as_float32(raw), raw.dtype.kind == "f"
    data = img.get_fdata(dtype=np.float32, caching="unchanged")
    return as_float32(data.reshape(shape3, order="A")), True


def is_unscaled(proxy: Any) -> bool:
    """True when the stored values are the voxel values (scale slope 1, intercept 0)."""
    slope, inter = getattr(proxy, "slope", None), getattr(proxy, "inter", None)
    return slope is not None and inter is not None and float(slope) == 1.0 and float(inter) == 0.0


def _inflate_nifti(img: Any, path: Path) -> np.ndarray | None:
    """The stored voxels of a single-file ``.nii.gz`` inflated by ISA-L, as a zero-copy
    x-fastest view of the inflated bytes; None when isal is absent or the file is not
    a plain single-file NIfTI (nibabel's reader then does the work)."""
    if not path.name.lower().endswith(".nii.gz") or not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        return None
    try:
        from isal import igzip
    except ImportError:
        return None
    proxy = img.dataobj  # the proxy knows the file's offset; the image's header copy may not
    dtype = np.dtype(proxy.dtype)
    offset = int(proxy.offset)
    count = int(np.prod(img.shape))
    buf = igzip.decompress(path.read_bytes())
    if len(buf) < offset + count * dtype.itemsize:
        raise EOFError(f"expected {offset + count * dtype.itemsize} bytes after inflating, got {len(buf)}")
    arr = np.frombuffer(buf, dtype=dtype, count=count, offset=offset)
    return arr.reshape(img.shape, order=getattr(proxy, "order", "F"))


def write_image(img: Any, path: str | os.PathLike[str]) -> None:
    """Write a nibabel image to ``path`` (not atomically: :func:`save_nifti` and
    :func:`gvsl.runtime.io.save_vector_nifti` call it on their temporary file). ``.nii.gz`` is
    deflated by ISA-L at level 1: 2.4x faster than nibabel's zlib level 1 and 9 % smaller on a
    256^3 displacement field, an ordinary gzip stream for every reader."""
    if not str(path).lower().endswith(".nii.gz"):
        nib.save(img, path)
        return
    from isal import igzip

    with igzip.open(path, "wb", compresslevel=1) as f:
        img.to_file_map({"image": nib.FileHolder(fileobj=f)})


def save_nifti(path: str | os.PathLike[str], data: np.ndarray, affine: np.ndarray) -> Path:
    """Write a NIfTI atomically (:func:`atomic_write`), so readers never see a
    half-written file, an interrupted run leaves none, and the file gets the umask's mode.

    bool becomes uint8 and int64 becomes int32 (NIfTI readers choke on int64);
    sform and qform are both set (code 1, scanner) so every viewer agrees.
    """
    arr = np.asarray(data)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    elif arr.dtype == np.int64:
        arr = arr.astype(np.int32)
    elif arr.dtype == np.float16:
        arr = arr.astype(np.float32)
    aff = np.asarray(affine, dtype=np.float64)
    img = nib.Nifti1Image(arr, aff)
    img.set_sform(aff, code=1)
    img.set_qform(aff, code=1)
    img.header.set_xyzt_units("mm")
    return atomic_write(path, lambda tmp: write_image(img, tmp))


__all__ = [
    "DIRECT_DTYPES",
    "VOLUME_SUFFIXES",
    "has_volume_suffix",
    "is_unscaled",
    "load_volume",
    "open_nifti",
    "read_nifti",
    "save_nifti",
    "write_image",
]
