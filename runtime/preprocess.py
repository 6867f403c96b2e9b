"""The single preprocessing implementation, shared by training and inference.

Training caches what :func:`preprocess` returns and inference calls it on every
request, so the two can never drift apart. numpy / scipy / nibabel only: this
module is part of the torch-free runtime.

Conventions (GVSL_SPEC §4): volumes are turned to RAS+ closest canonical,
resampled to 1 mm³ by default, then intensities go to [0, 1] — CT by clipping HU
to [-1024, 1024] (the authors' [0, 2048] window on HU+1024 data), MR by robust
percentiles of the nonzero voxels. Resampling aligns voxel *centres*: the first
voxel centre stays where it was, so the affine only changes its zooms.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation

from .atomic import atomic_write
from .cpu_pool import run_pieces
from .errors import GvslInputError

#: File endings nibabel reads as single volumes we accept (.hdr/.img = Analyze/NIfTI pair).
VOLUME_SUFFIXES: tuple[str, ...] = (".nii", ".nii.gz", ".mgz", ".mgh", ".img", ".hdr")

MODALITIES: tuple[str, ...] = ("auto", "ct", "mr", "none")

Pads = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


# ----------------------------------------------------------------------------- config
@dataclass(frozen=True)
class PreprocessConfig:
    """How raw volumes become network input. Saved beside checkpoints and exports
    (``to_dict``) so inference repeats exactly what training did.

    ``spacing`` target voxel size in mm (None keeps the native grid);
    ``modality`` "ct" (HU window), "mr" (nonzero-voxel percentiles), "auto" (CT or
    MR decided per volume from its values, :func:`gvsl.runtime.modality.decide_modality`)
    or "none" (values untouched); ``canonical`` reorients to RAS+ first so that array
    axes mean the same anatomy in every volume.
    """

    spacing: tuple[float, float, float] | None = (1.0, 1.0, 1.0)
    modality: str = "ct"
    ct_window: tuple[float, float] = (-1024.0, 1024.0)
    mr_percentiles: tuple[float, float] = (0.5, 99.5)
    canonical: bool = True

    def __post_init__(self) -> None:
        if self.spacing is not None:
            sp = _float_tuple(self.spacing, 3, "spacing")
            if not all(math.isfinite(s) and s > 0 for s in sp):
                raise ValueError(f"spacing must be three positive mm values, got {sp}")
            object.__setattr__(self, "spacing", sp)
        if self.modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {self.modality!r}")
        win = _float_tuple(self.ct_window, 2, "ct_window")
        if not (all(math.isfinite(v) for v in win) and win[0] < win[1]):
            raise ValueError(f"ct_window must be (low, high) HU with low < high, got {win}")
        object.__setattr__(self, "ct_window", win)
        pct = _float_tuple(self.mr_percentiles, 2, "mr_percentiles")
        if not (0.0 <= pct[0] < pct[1] <= 100.0):
            raise ValueError(f"mr_percentiles must satisfy 0 <= low < high <= 100, got {pct}")
        object.__setattr__(self, "mr_percentiles", pct)
        if self.canonical not in (True, False):
            raise ValueError(f"canonical must be true or false, got {self.canonical!r}")
        object.__setattr__(self, "canonical", bool(self.canonical))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (tuples become lists)."""
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessConfig:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown preprocess config keys: {sorted(unknown)}")
        d = dict(d)
        for k in ("spacing", "ct_window", "mr_percentiles"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        return cls(**d)


def with_modality(cfg: PreprocessConfig, modality: str | None) -> PreprocessConfig:
    """``cfg`` with its modality replaced (``None`` keeps the model's own): how ``--modality``
    overrides what a model was trained with, validated like any config."""
    if modality is None or modality == cfg.modality:
        return cfg
    if modality not in MODALITIES:
        raise GvslInputError(f"--modality {modality}: use one of {', '.join(MODALITIES)}")
    return replace(cfg, modality=modality)


def _float_tuple(value: Any, n: int, name: str) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {n} numbers, got {value!r}") from None
    if len(out) != n:
        raise ValueError(f"{name} must be {n} numbers, got {value!r}")
    return out


# ----------------------------------------------------------------------------- volumes
@dataclass
class Volume:
    """A 3-D float32 array and the 4x4 affine mapping its voxel indices to world mm."""

    data: np.ndarray
    affine: np.ndarray
    source: str = "<array>"
    #: how :func:`preprocess` normalised it ("ct", "mr", "none"; None before preprocessing),
    #: so outputs can report what ``--modality auto`` decided
    modality: str | None = None

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm (column norms of the affine)."""
        return tuple(float(s) for s in voxel_sizes(self.affine))  # type: ignore[return-value]


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
    """Voxel size along each array axis = norm of the affine's 3x3 columns."""
    return np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))


def _has_volume_suffix(name: str) -> bool:
    return name.lower().endswith(VOLUME_SUFFIXES)


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(int(s)) for s in shape)


def _spatial_shape(shape: tuple[int, ...], name: str) -> tuple[int, int, int]:
    """Validate a raw shape and return it as 3-D (trailing singleton dims dropped)."""
    shape = tuple(int(s) for s in shape)
    if any(s == 0 for s in shape) or len(shape) == 0:
        raise GvslInputError(
            f"{name}: volume is empty (shape {shape}); give a volume with voxels", name
        )
    squeezed = shape
    while len(squeezed) > 3 and squeezed[-1] == 1:
        squeezed = squeezed[:-1]
    if len(squeezed) > 3:
        raise GvslInputError(
            f"{name}: volume is {len(shape)}-D ({_fmt_shape(shape)}); give a single 3-D volume "
            "(split it with fslsplit or nibabel)",
            name,
        )
    if len(squeezed) < 3 or min(squeezed) < 2:
        raise GvslInputError(
            f"{name}: image is 2-D ({_fmt_shape(shape)}); GVSL needs a 3-D volume with at least "
            "2 voxels along every axis (stack the slices into one NIfTI, e.g. with dcm2niix)",
            name,
        )
    return squeezed  # type: ignore[return-value]


def _check_voxels(shape: tuple[int, int, int], max_voxels: int | None, name: str) -> None:
    n = math.prod(shape)
    if max_voxels is not None and n > max_voxels:
        raise GvslInputError(
            f"{name}: volume has {n} voxels ({_fmt_shape(shape)}), more than the limit of "
            f"{max_voxels}; crop or downsample it first, or raise the limit",
            name,
        )


def _check_affine(affine: Any, name: str) -> np.ndarray:
    try:
        aff = np.asarray(affine, dtype=np.float64)
    except (TypeError, ValueError):
        aff = np.full((4, 4), np.nan)
    if aff.shape != (4, 4):
        raise GvslInputError(f"{name}: affine must be 4x4, got shape {aff.shape}", name)
    ok = bool(np.isfinite(aff).all())
    if ok:
        det = float(np.linalg.det(aff[:3, :3]))
        ok = math.isfinite(det) and abs(det) > 1e-12 * max(
            1.0, float(np.abs(aff[:3, :3]).max()) ** 3
        )
    if not ok:
        raise GvslInputError(
            f"{name}: voxel-to-world affine is not finite or not invertible; fix the header's "
            "sform/qform (voxel sizes and directions) and save again",
            name,
        )
    return aff


def _check_finite(data: np.ndarray, name: str) -> None:
    if not np.isfinite(data).all():
        bad = int(data.size - np.count_nonzero(np.isfinite(data)))
        raise GvslInputError(
            f"{name}: {bad} voxel(s) are NaN or Inf; replace them (e.g. numpy.nan_to_num) and "
            "save again",
            name,
        )


def load_volume(
    path: str | os.PathLike[str], max_voxels: int | None = None, keep_dtype: bool = False, isal: bool = True
) -> Volume:
    """Read a NIfTI (or MGH / Analyze) volume as float32, validating everything.

    ``keep_dtype=True`` leaves unscaled integer data in its stored type (float32
    otherwise): for callers that only :func:`preprocess` it, which converts while
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
    img, shape3, aff = _open(p, name, max_voxels)
    return _read_volume(img, shape3, aff, p, keep_dtype, isal)


def _read_volume(
    img: Any, shape3: tuple[int, int, int], aff: np.ndarray, p: Path, keep_dtype: bool, isal: bool = True
) -> Volume:
    """The voxels of an :func:`_open`-ed file as a :class:`Volume`; read errors name the file."""
    name = str(p)
    try:
        data, may_be_nonfinite = _read_voxels(img, shape3, p, keep_dtype, isal)
    except MemoryError as e:
        raise GvslInputError(
            f"{name}: not enough memory to load {_fmt_shape(tuple(img.shape))} voxels; crop or downsample it",
            name,
        ) from e
    except Exception as e:  # EOFError, zlib.error, OSError, ValueError ... for truncated data
        raise GvslInputError(
            f"{name}: file is corrupt or truncated ({type(e).__name__}: {_one_line(e)}); "
            "re-export or re-copy it",
            name,
        ) from e
    if may_be_nonfinite:
        _check_finite(data, name)
    return Volume(data=data, affine=aff, source=name)


def _open(p: Path, name: str, max_voxels: int | None) -> tuple[Any, tuple[int, int, int], np.ndarray]:
    """(nibabel image, 3-D shape, affine) after every check that needs only the header."""
    if not p.exists():
        raise GvslInputError(f"{name}: file not found; check the path", name)
    if p.is_dir():
        raise GvslInputError(f"{name}: is a folder; give a .nii or .nii.gz file", name)
    if not _has_volume_suffix(p.name):
        raise GvslInputError(
            f"{name}: not a NIfTI file (expected .nii or .nii.gz); convert it, e.g. with "
            "dcm2niix or nibabel",
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
            f"{name}: cannot read as NIfTI ({type(e).__name__}: {_one_line(e)}); check the file "
            "is a valid, complete .nii/.nii.gz",
            name,
        ) from e
    shape3 = _spatial_shape(shape, name)
    _check_voxels(shape3, max_voxels, name)
    return img, shape3, _check_affine(affine, name)


#: Stored types whose float32 conversion needs no scaling and matches nibabel's
#: ``get_fdata(dtype=float32)`` bit for bit (one rounding at most); others take nibabel's path.
_DIRECT_DTYPES = frozenset("int8 uint8 int16 uint16 int32 uint32 float32 float64".split())


def _read_voxels(
    img: Any, shape3: tuple[int, int, int], path: Path, keep_dtype: bool = False, isal: bool = True
) -> tuple[np.ndarray, bool]:
    """(float32 voxels, whether they can hold NaN/Inf), the values of
    ``img.get_fdata(dtype=float32)``, in the file's own layout (``keep_dtype``:
    unscaled integer data stays in its stored type).

    NIfTI stores x fastest. The array keeps that layout (x-fastest, Fortran
    order) instead of being transposed to C order here: :func:`preprocess`
    resamples the reversed-axes view, which is C-ordered, and transposes only
    its (usually smaller) result. Unscaled data is converted straight from the
    stored type; integer data skips the NaN scan; ``.nii.gz`` is inflated with
    ISA-L when ``isal`` is installed (about twice zlib's speed).
    """
    proxy = img.dataobj
    if nib.is_proxy(proxy) and _unscaled(proxy) and hasattr(proxy, "get_unscaled"):
        raw = _inflate_nifti(img, path) if isal else None
        if raw is None:
            raw = np.asanyarray(proxy.get_unscaled())
        if raw.dtype.name in _DIRECT_DTYPES:
            raw = raw.reshape(shape3, order="A")
            if keep_dtype and raw.dtype.kind in "iu":
                return raw, False
            return _as_float32(raw), raw.dtype.kind == "f"
    data = img.get_fdata(dtype=np.float32, caching="unchanged")
    return _as_float32(data.reshape(shape3, order="A")), True


def _unscaled(proxy: Any) -> bool:
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


def _as_float32(a: np.ndarray) -> np.ndarray:
    """float32 copy in ``a``'s own memory order (no transpose), on threads for big arrays."""
    if a.dtype == np.float32 and (a.flags.c_contiguous or a.flags.f_contiguous) and a.flags.writeable:
        return a
    out = np.empty(a.shape, dtype=np.float32, order="F" if a.flags.f_contiguous else "C")
    if a.flags.f_contiguous:  # slabs along the slowest (last) axis
        n = a.shape[2]
        per = max(1, a.shape[0] * a.shape[1])
        step = max(1, _CHUNK // per)
        pieces = [(k, min(k + step, n)) for k in range(0, n, step)]

        def work(k0: int, k1: int) -> None:
            out[:, :, k0:k1] = a[:, :, k0:k1]

        _run_chunks(work, pieces, out.size)
        return out
    out[...] = a
    return out


def _x_fastest(a: np.ndarray) -> bool:
    """True for NIfTI's layout (also after flips / reorientation views): axis 0 has the
    smallest stride and axis 2 the largest, so ``a.T`` walks memory in C order."""
    s = [abs(x) for x in a.strides]
    return a.ndim == 3 and a.size > 1 and s[0] < s[1] < s[2]


def _to_c_float32(a: np.ndarray) -> np.ndarray:
    """``np.ascontiguousarray(a, dtype=float32)``, fast for large x-fastest arrays:
    blocks of 64 x Y x 64 voxels copied plane by plane stay in cache on both sides."""
    if a.ndim != 3 or a.flags.c_contiguous or not _x_fastest(a) or a.size < _PARALLEL_MIN:
        return np.ascontiguousarray(a, dtype=np.float32)
    out = np.empty(a.shape, dtype=np.float32)
    nx, ny, nz = a.shape
    block = 64

    def work(x0: int, x1: int) -> None:
        for z0 in range(0, nz, block):
            dst, src = out[x0:x1, :, z0 : z0 + block], a[x0:x1, :, z0 : z0 + block]
            for y in range(ny):
                dst[:, y, :] = src[:, y, :]

    _run_chunks(work, [(x, min(x + block, nx)) for x in range(0, nx, block)], out.size)
    return out


def _one_line(e: BaseException, limit: int = 120) -> str:
    msg = " ".join(str(e).split()) or "no details"
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def volume_from_array(data: Any, affine: Any, source: str = "<array>") -> Volume:
    """Wrap an in-memory array with the same validation as :func:`load_volume`."""
    arr = np.asarray(data)
    if arr.dtype.kind not in "biuf":
        raise GvslInputError(
            f"{source}: voxel type {arr.dtype} is not a real number type; give a numeric array",
            source,
        )
    shape3 = _spatial_shape(arr.shape, source)
    aff = _check_affine(affine, source)
    arr = np.ascontiguousarray(arr.reshape(shape3), dtype=np.float32)
    _check_finite(arr, source)
    return Volume(data=arr, affine=aff, source=source)


# ----------------------------------------------------------------------------- geometry
def to_canonical(vol: Volume) -> Volume:
    """Reorient to RAS+ closest canonical (flips / axis permutations only, no
    interpolation); identical to ``nibabel.as_closest_canonical``."""
    ornt = io_orientation(vol.affine)
    if np.array_equal(ornt, [[0, 1], [1, 1], [2, 1]]):
        return vol
    data = np.ascontiguousarray(apply_orientation(vol.data, ornt))
    affine = vol.affine @ inv_ornt_aff(ornt, vol.data.shape)
    return Volume(data=data, affine=affine, source=vol.source)


def resample(vol: Volume, spacing: tuple[float, float, float] | float, order: int = 1) -> Volume:
    """Resample to ``spacing`` mm, keeping the first voxel centre and the directions.

    New shape = round(old_shape * old_spacing / new_spacing) (at least 1); new
    voxel i sits at old index i * new/old along each axis, values beyond the last
    old centre repeat the edge. Orders 0 (nearest, for labels) and 1 (linear)
    run as separable, threaded 1-D passes (two gathers and a multiply-add per
    axis, shrinking axes first), much faster than a trilinear
    ``affine_transform`` on CT-sized volumes; higher orders use scipy splines.
    Axes whose spacing already matches (within 1e-3 mm) are left untouched.
    """
    data, affine = _resample_array(vol.data, vol.affine, spacing, order)
    if data is vol.data:
        return vol
    return Volume(data=data, affine=affine, source=vol.source)


def _resample_array(
    data: np.ndarray, affine: np.ndarray, spacing: tuple[float, float, float] | float, order: int
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`resample` on a bare array, which may be any strided view (``preprocess``
    passes the un-copied RAS+ view); returns ``data`` itself when nothing changes."""
    plan = _resample_plan(data.shape, affine, spacing)
    if plan is None:
        return data, affine
    passes, scale, new_shape, new_affine = plan
    if order in (0, 1):
        for ax in passes:
            data = _resample_axis(data, ax, int(new_shape[ax]), float(scale[ax]), order)
        return np.ascontiguousarray(data, dtype=np.float32), new_affine
    from scipy import ndimage

    out = ndimage.affine_transform(
        np.asarray(data, dtype=np.float32),
        scale,
        output_shape=tuple(int(s) for s in new_shape),
        order=order,
        mode="nearest",
        output=np.float32,
    )
    return out, new_affine


def _resample_plan(
    shape: tuple[int, ...], affine: np.ndarray, spacing: tuple[float, float, float] | float
) -> tuple[list[int], np.ndarray, np.ndarray, np.ndarray] | None:
    """(axes to resample, shrinking ones first; old-index step per new voxel; new shape;
    new affine) for :func:`resample`, or None when every axis already has ``spacing``."""
    target = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,))
    if not (np.isfinite(target).all() and (target > 0).all()):
        raise ValueError(f"spacing must be positive mm values, got {spacing}")
    old = voxel_sizes(affine)
    redo = np.abs(old - target) > 1e-3
    if not redo.any():
        return None
    scale = np.where(redo, target / old, 1.0)
    size = np.asarray(shape)
    new_shape = np.where(redo, np.maximum(1, np.round(size / scale)), size).astype(int)
    new_affine = affine.copy()
    new_affine[:3, :3] = affine[:3, :3] * scale[None, :]
    # shrink first: later passes then touch fewer voxels
    passes = [int(a) for a in sorted(np.flatnonzero(redo), key=lambda a: new_shape[a] / size[a])]
    return passes, scale, new_shape, new_affine


def _resample_axis(data: np.ndarray, axis: int, n_new: int, step: float, order: int) -> np.ndarray:
    """1-D nearest/linear interpolation of ``data`` along ``axis`` at i*step, edge-clamped.

    The output is cut into pieces of about :data:`_CHUNK` voxels along another
    axis, so each piece's gathers and temporaries stay in the CPU cache, and the
    pieces run on a thread pool (numpy releases the GIL in gathers and
    arithmetic). The arithmetic per voxel does not depend on the cut.
    """
    n_old = data.shape[axis]
    x = np.arange(n_new, dtype=np.float64) * step
    if order == 0:
        i0 = np.minimum(np.floor(x + 0.5).astype(np.intp), n_old - 1)
        i1 = w = None
    else:
        i0 = np.minimum(np.floor(x).astype(np.intp), n_old - 1)
        i1 = np.minimum(i0 + 1, n_old - 1)
        wshape = [1, 1, 1]
        wshape[axis] = n_new
        w = (x - i0).clip(0.0, 1.0).astype(np.float32).reshape(wshape)
    out_shape = list(data.shape)
    out_shape[axis] = n_new
    out = np.empty(out_shape, dtype=np.float32)
    split = 1 if axis == 0 else 0

    def work(start: int, stop: int) -> None:
        sl = [slice(None)] * 3
        sl[split] = slice(start, stop)
        src, dst = data[tuple(sl)], out[tuple(sl)]
        if i1 is None:
            dst[...] = np.take(src, i0, axis=axis)
            return
        lo = np.take(src, i0, axis=axis)
        hi = np.take(src, i1, axis=axis)
        if lo.dtype != np.float32:  # integer input (load_volume(keep_dtype=True)): convert here, piece by piece
            lo, hi = lo.astype(np.float32), hi.astype(np.float32)
        np.subtract(hi, lo, out=hi)
        hi *= w
        np.add(hi, lo, out=dst)

    n_split = out.shape[split]
    per = max(1, out.size // max(n_split, 1))
    step_n = max(1, _CHUNK // per)
    _run_chunks(work, [(a, min(a + step_n, n_split)) for a in range(0, n_split, step_n)], out.size)
    return out


#: Voxels per work item of the threaded passes: a piece and its temporaries stay in the
#: CPU caches, and there are few enough pieces that threads rarely wait for the GIL.
_CHUNK = 1 << 18
#: Below this many voxels threads cost more than they save.
_PARALLEL_MIN = 1 << 20


def _run_chunks(fn: Any, pieces: list[tuple[int, int]], size: int) -> None:
    """Run ``fn(start, stop)`` for every piece on the process's CPU pool when ``size``
    voxels are worth threads (:func:`gvsl.runtime.cpu_pool.run_pieces`)."""
    run_pieces(fn, pieces, parallel=size >= _PARALLEL_MIN)


# ----------------------------------------------------------------------------- intensity
def normalize_intensity(data: np.ndarray, cfg: PreprocessConfig, name: str = "<array>") -> np.ndarray:
    """Map intensities to [0, 1] float32 (``ct``: HU window; ``mr``: robust min/max
    of nonzero voxels, because MR has no absolute scale and its zero background
    would otherwise dominate the statistics; ``auto``: whichever of the two
    :func:`resolve_modality` decides for these values); ``none`` only casts to float32."""
    return _normalize(np.asarray(data, dtype=np.float32), cfg, inplace=False, name=name)


def resolve_modality(data: np.ndarray, cfg: PreprocessConfig, name: str = "<array>") -> str:
    """The normalisation ``cfg`` means for this volume: its modality, or for ``auto`` the
    decision of :func:`gvsl.runtime.modality.decide_modality` (one-line error when it cannot)."""
    if cfg.modality != "auto":
        return cfg.modality
    from .modality import decide_modality

    return decide_modality(data, name)


def _normalize(data: np.ndarray, cfg: PreprocessConfig, inplace: bool, name: str = "<array>") -> np.ndarray:
    """:func:`normalize_intensity` on float32 ``data``, overwriting it when ``inplace``
    (``preprocess`` owns its resampled array), in threaded cache-sized pieces.
    The same float32 operations in the same order as ever, so results are unchanged."""
    if cfg.modality == "auto":
        cfg = replace(cfg, modality=resolve_modality(data, cfg, name))
    if cfg.modality == "ct":
        lo, hi = cfg.ct_window
        f_lo, f_scale = np.float32(lo), np.float32(1.0 / (hi - lo))
        if not data.flags.c_contiguous:
            out = np.clip(data, lo, hi)
            out -= f_lo
            out *= f_scale
            return out
        out = data if inplace else np.empty(data.shape, np.float32)
        src, dst = data.reshape(-1), out.reshape(-1)

        def ct(a: int, b: int) -> None:
            piece = dst[a:b]
            np.clip(src[a:b], lo, hi, out=piece)
            piece -= f_lo
            piece *= f_scale

        _run_chunks(ct, _flat_pieces(dst.size), dst.size)
        return out
    if cfg.modality == "mr":
        nonzero = data[data != 0]
        if nonzero.size == 0:
            return np.zeros_like(data)
        lo, hi = (float(v) for v in np.percentile(nonzero, cfg.mr_percentiles))
        if not hi > lo:  # constant image: nothing to scale, keep it finite
            return np.zeros_like(data)
        out = data if inplace else np.empty(data.shape, np.float32)
        np.subtract(data, np.float32(lo), out=out)
        out *= np.float32(1.0 / (hi - lo))
        np.clip(out, 0.0, 1.0, out=out)
        return out
    return data


def _flat_pieces(n: int) -> list[tuple[int, int]]:
    return [(a, min(a + _CHUNK, n)) for a in range(0, n, _CHUNK)]


# ----------------------------------------------------------------------------- padding
def _pads_for(shape: tuple[int, ...], target: tuple[int, ...]) -> Pads:
    pads = []
    for n, t in zip(shape, target, strict=True):
        total = max(0, int(t) - int(n))
        pads.append((total // 2, total - total // 2))
    return tuple(pads)  # type: ignore[return-value]


def _apply_pads(data: np.ndarray, pads: Pads, value: float) -> np.ndarray:
    if not any(b or a for b, a in pads):
        return data
    width = [(0, 0)] * (data.ndim - 3) + [tuple(p) for p in pads]
    return np.pad(data, width, mode="constant", constant_values=value)


def pad_to_multiple(
    data: np.ndarray, multiple: int = 16, value: float = 0.0
) -> tuple[np.ndarray, Pads]:
    """Pad the last 3 axes up to a multiple of ``multiple`` (the U-Net pools 4x by 2).

    Padding is split before = total // 2, after = the rest, so the content stays
    centred; returns the array (unchanged object if no padding is needed) and the
    pads ``((b0, a0), (b1, a1), (b2, a2))`` for :func:`unpad`.
    """
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    shape = data.shape[-3:]
    target = tuple(-(-int(n) // multiple) * multiple for n in shape)
    pads = _pads_for(shape, target)
    return _apply_pads(data, pads, value), pads


def pad_to_shape(
    data: np.ndarray, shape: tuple[int, int, int], value: float = 0.0
) -> tuple[np.ndarray, Pads]:
    """Pad the last 3 axes up to at least ``shape`` (axes already large enough are kept)."""
    pads = _pads_for(data.shape[-3:], tuple(shape))
    return _apply_pads(data, pads, value), pads


def unpad(data: Any, pads: Pads) -> Any:
    """Undo :func:`pad_to_multiple` / :func:`pad_to_shape` on the last 3 axes
    (works on [D,H,W], [C,D,H,W] and torch tensors alike)."""
    idx = tuple(slice(b, n - a) for (b, a), n in zip(pads, data.shape[-3:], strict=True))
    return data[(Ellipsis, *idx)]


# ----------------------------------------------------------------------------- pipeline
def preprocess(vol: Volume, cfg: PreprocessConfig) -> Volume:
    """canonical (if ``cfg.canonical``) → resample (if ``cfg.spacing``) → normalise.

    ``vol.data`` may be any real type in any memory order (float32 C-ordered out).

    The returned affine maps the preprocessed grid to world mm, so outputs
    computed on it (features, displacement fields) can be saved as NIfTI
    directly or mapped back to the input grid.
    """
    data, affine = vol.data, vol.affine
    if cfg.canonical:  # flips / transposes as a view: the resampling below reads it in place
        ornt = io_orientation(affine)
        if not np.array_equal(ornt, [[0, 1], [1, 1], [2, 1]]):
            affine = affine @ inv_ornt_aff(ornt, data.shape)
            data = apply_orientation(data, ornt)
    if cfg.spacing is not None:
        if _x_fastest(data):
            # NIfTI's x-fastest layout: resample the reversed-axes view, which is C-ordered, so
            # the passes stream through memory; only the result is transposed below
            rev = np.eye(4)[[2, 1, 0, 3]]
            out, out_affine = _resample_array(data.T, affine @ rev, tuple(cfg.spacing)[::-1], order=1)
            data, affine = out.T, out_affine @ rev
        else:
            data, affine = _resample_array(data, affine, cfg.spacing, order=1)
    owned = not np.may_share_memory(data, vol.data)
    data = _to_c_float32(data)
    owned = owned or not np.may_share_memory(data, vol.data)
    modality = resolve_modality(data, cfg, vol.source)
    out = _normalize(data, replace(cfg, modality=modality), inplace=owned)
    return Volume(data=out, affine=affine, source=vol.source, modality=modality)


def load_preprocessed(
    path: str | os.PathLike[str], cfg: PreprocessConfig, max_voxels: int | None = None
) -> tuple[Volume, Volume]:
    """``(load_volume(path, keep_dtype=True), preprocess(it, cfg))`` — what
    ``Embedder.prepare`` and the training cache need — with the same numbers, faster.

    For a ``.nii.gz`` of unscaled integers, inflating takes most of the time and
    runs on one core (ISA-L releases the GIL): a thread inflates the stream while
    this one resamples each slab of z-planes already inflated along x and y (those
    passes need nothing outside the slab); the z pass, if any, runs at the end on
    the smaller array. Anything unusual (no isal, scaled or float data, axes that
    reorientation permutes, a stream that ends early) takes the plain path, which
    also gives the one-line errors.
    """
    p = Path(path)
    img, shape3, aff = _open(p, str(path), max_voxels)  # once: both paths read this header
    streamed = _stream_preprocess(img, shape3, aff, p, cfg)
    if streamed is not None:
        return streamed
    vol = _read_volume(img, shape3, aff, p, keep_dtype=True)
    return vol, preprocess(vol, cfg)


#: Bytes of stored voxels per streamed slab: big enough for the resampling threads,
#: small enough that the first slab arrives early and the last one leaves little work.
_SLAB_BYTES = 8 << 20


def _stream_preprocess(
    img: Any, shape3: tuple[int, int, int], aff: np.ndarray, p: Path, cfg: PreprocessConfig
) -> tuple[Volume, Volume] | None:
    """:func:`load_preprocessed`'s overlapped path for an :func:`_open`-ed file, or None
    where it does not apply."""
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
    if not _unscaled(proxy) or dtype.kind not in "iu":
        return None
    if dtype.name not in _DIRECT_DTYPES or int(np.prod(shape3)) < _PARALLEL_MIN:
        return None
    ornt = io_orientation(aff) if cfg.canonical else np.array([[0, 1], [1, 1], [2, 1]])
    if not np.array_equal(ornt[:, 0], [0, 1, 2]):
        return None  # a permuted axis order: the slabs would not be slabs of the output
    affine = aff @ inv_ornt_aff(ornt, shape3)
    rev = np.eye(4)[[2, 1, 0, 3]]
    plan = _resample_plan(shape3[::-1], affine @ rev, tuple(cfg.spacing)[::-1])
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
                slab = _resample_axis(slab, ax, int(new_shape[ax]), float(scale[ax]), 1)
            mid[a:b] = slab
    finally:
        worker.join()
    if state["error"] is not None:
        return None  # truncated or unusual stream: the plain path reports or handles it
    data = mid
    if 0 in passes:
        data = _resample_axis(data, 0, int(new_shape[0]), float(scale[0]), 1)
    out = _to_c_float32(data.T)
    vol = Volume(data=raw, affine=aff, source=name)
    modality = resolve_modality(out, cfg, name)
    normalised = _normalize(out, replace(cfg, modality=modality), inplace=True)
    return vol, Volume(data=normalised, affine=new_affine @ rev, source=name, modality=modality)


# ----------------------------------------------------------------------------- output
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
    return atomic_write(path, lambda tmp: nib.save(img, tmp))


__all__ = [
    "MODALITIES",
    "VOLUME_SUFFIXES",
    "Pads",
    "PreprocessConfig",
    "Volume",
    "load_volume",
    "normalize_intensity",
    "pad_to_multiple",
    "pad_to_shape",
    "preprocess",
    "resample",
    "save_nifti",
    "to_canonical",
    "unpad",
    "volume_from_array",
    "voxel_sizes",
]
