"""Synthetic "subjects" from one real template: known deformations, real anatomy.

GVSL needs many scans; a fresh install has none. The MNI ICBM152 2009a T1
template and its grey/white-matter maps ship inside nilearn (and a 2 mm copy
inside gvsl itself, ``gvsl/assets/sample``), so every subject here is that
real brain under a random smooth deformation (random affine about the centre
+ a Gaussian-smoothed elastic field) and random MR-like intensity changes
(bias field, gamma, noise, gain). Labels (0 background/CSF, 1 grey matter,
2 white matter) follow the same deformation, and the deformation itself is
returned, so registration can be scored against a known truth.

numpy/scipy only (no torch): warping goes through
:func:`gvsl.runtime.warp.warp_by_displacement` and resampling through
:func:`gvsl.runtime.preprocess.resample`, the runtime's own functions.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from gvsl.runtime.atomic import save_text
from gvsl.runtime.errors import GvslInputError
from gvsl.runtime.geometry import voxel_spacing
from gvsl.runtime.preprocess import Volume, load_volume, resample, save_nifti
from gvsl.runtime.warp import grid_world_coordinates, warp_by_displacement

__all__ = [
    "LABEL_NAMES",
    "SAMPLE_DIR",
    "Subject",
    "SynthConfig",
    "Template",
    "load_template",
    "make_subject",
    "make_subjects",
    "random_displacement",
    "template_paths",
]

#: Label values written by the generator.
LABEL_NAMES = {0: "background", 1: "grey matter", 2: "white matter"}

#: The 2 mm MNI sample bundled with gvsl (T1 + labels), used when nilearn is absent.
SAMPLE_DIR = Path(__file__).parent / "assets" / "sample"
SAMPLE_T1 = SAMPLE_DIR / "mni152_2009a_t1_2mm.nii.gz"
SAMPLE_LABELS = SAMPLE_DIR / "mni152_2009a_gmwm_2mm.nii.gz"


@dataclass(frozen=True)
class SynthConfig:
    """Ranges of the random draws (uniform, per subject; per axis where it has axes).

    ``elastic_mm`` is the largest elastic displacement (each subject draws
    its own peak in [elastic_mm/2, elastic_mm]); ``elastic_sigma_mm`` its
    smoothness; ``bias`` the log-amplitude of the smooth multiplicative bias
    field; ``gamma`` the exponent range; ``noise`` the Gaussian noise std
    relative to the brain intensity.
    """

    rotation_deg: float = 8.0
    scale: float = 0.08
    translation_mm: float = 6.0
    elastic_mm: float = 6.0
    elastic_sigma_mm: float = 16.0
    bias: float = 0.3
    gamma: tuple[float, float] = (0.7, 1.4)
    noise: float = 0.03
    gain: tuple[float, float] = (500.0, 1500.0)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SynthConfig:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown synth keys: {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass
class Template:
    """The source anatomy: intensities in [0, 1], labels (or None), grid affine."""

    image: np.ndarray
    labels: np.ndarray | None
    affine: np.ndarray
    source: str


@dataclass
class Subject:
    """One synthetic subject on the template's grid; ``disp_mm [3, X, Y, Z]`` is the
    pull-back field that made it: ``subject(x) = template(x + disp_mm(x))``."""

    image: np.ndarray
    labels: np.ndarray | None
    affine: np.ndarray
    disp_mm: np.ndarray
    params: dict[str, Any]


def template_paths() -> dict[str, Path]:
    """nilearn's 1 mm MNI ICBM152 2009a T1 / GM / WM files (``pip install nilearn``)."""
    try:
        import nilearn
    except ImportError:
        raise GvslInputError(
            "nilearn is not installed: pip install nilearn (or use the bundled 2 mm sample, load_template('sample'))"
        ) from None
    root = Path(nilearn.__file__).parent / "datasets" / "data"
    paths = {k: root / f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz" for k in ("t1", "gm", "wm")}
    for p in paths.values():
        if not p.is_file():
            raise GvslInputError(f"{p}: missing from the nilearn install; reinstall nilearn", str(p))
    return paths


def _labels_from_maps(gm: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """Hard labels from probability maps (0..255 or 0..1): the most likely of
    background (1 - gm - wm), grey and white matter."""
    scale = 255.0 if max(float(gm.max()), float(wm.max())) > 1.5 else 1.0
    g, w = gm / scale, wm / scale
    bg = np.clip(1.0 - g - w, 0.0, 1.0)
    return np.argmax(np.stack([bg, g, w]), axis=0).astype(np.uint8)


def _crop_box(mask: np.ndarray, margin: int) -> tuple[slice, slice, slice]:
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(axis=0) - margin, 0)
    hi = np.minimum(idx.max(axis=0) + 1 + margin, mask.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))  # type: ignore[return-value]


def _cropped_affine(affine: np.ndarray, box: tuple[slice, slice, slice]) -> np.ndarray:
    out = affine.copy()
    out[:3, 3] = affine[:3, :3] @ np.array([s.start for s in box], dtype=np.float64) + affine[:3, 3]
    return out


def load_template(
    source: str | os.PathLike[str] = "mni", spacing: float | None = 2.0, margin_mm: float = 8.0
) -> Template:
    """The anatomy subjects are made from.

    ``"mni"``: nilearn's MNI T1 with GM/WM labels; ``"sample"``: the 2 mm copy
    bundled with gvsl (no nilearn needed); any other value is a NIfTI path
    (no labels). The volume is resampled to ``spacing`` mm (None keeps it)
    and cropped to the non-zero region plus ``margin_mm``; intensities go to
    [0, 1] (99.5th percentile of non-zero voxels = 1).
    """
    labels = None
    src = str(source)
    if src == "mni":
        paths = template_paths()
        t1 = load_volume(paths["t1"])
        maps = [load_volume(paths[k]) for k in ("gm", "wm")]
        if spacing is not None:
            t1 = resample(t1, spacing, order=1)
            maps = [resample(m, spacing, order=1) for m in maps]
        labels = _labels_from_maps(maps[0].data, maps[1].data)
        vol = t1
    elif src == "sample":
        if not SAMPLE_T1.is_file():
            raise GvslInputError(f"{SAMPLE_T1}: bundled sample missing; reinstall gvsl", str(SAMPLE_T1))
        vol = load_volume(SAMPLE_T1)
        lab = load_volume(SAMPLE_LABELS)
        if spacing is not None:
            vol = resample(vol, spacing, order=1)
            lab = resample(lab, spacing, order=0)
        labels = np.rint(lab.data).astype(np.uint8)
    else:
        vol = _load_first_frame(source)
        if spacing is not None:
            vol = resample(vol, spacing, order=1)
    data = np.asarray(vol.data, dtype=np.float32)
    data = data - min(float(data.min()), 0.0)
    fg = data > 0
    if not fg.any():
        raise GvslInputError(f"{src}: volume is empty (all zero); give a real scan", src)
    hi = float(np.percentile(data[fg], 99.5))
    data = np.clip(data / max(hi, 1e-6), 0.0, 1.0)
    sp = float(np.mean(voxel_spacing(vol.affine)))
    box = _crop_box(fg, int(round(margin_mm / sp)))
    return Template(
        image=np.ascontiguousarray(data[box]),
        labels=None if labels is None else np.ascontiguousarray(labels[box]),
        affine=_cropped_affine(vol.affine, box),
        source=src,
    )


def _load_first_frame(path: str | os.PathLike[str]) -> Volume:
    """A 3-D volume, or the first frame of a 4-D series (e.g. an fMRI run), validated."""
    p = Path(path)
    try:
        img = nib.load(str(p))
    except Exception:
        return load_volume(p)  # gives the runtime's one-line error for unreadable files
    if len(img.shape) == 4:
        data = np.asarray(img.dataobj[..., 0], dtype=np.float32)
        from gvsl.runtime.preprocess import volume_from_array

        return volume_from_array(data, img.affine, source=f"{p}[frame 0]")
    return load_volume(p)


@functools.lru_cache(maxsize=64)
def _upsampling_matrix(coarse: int, fine: int) -> np.ndarray:
    """``[fine, coarse]`` matrix of the 1-D cubic-spline zoom (scipy's ``zoom``, order 3,
    mode nearest, cut to ``fine``): a 3-D zoom is this matrix applied along each axis."""
    m = ndimage.zoom(np.eye(coarse), (fine / coarse, 1.0), order=3, mode="nearest")
    return np.ascontiguousarray(m[:fine], dtype=np.float32)


def _smooth_noise(shape: tuple[int, ...], sigma_vox: float, rng: np.random.Generator, channels: int) -> np.ndarray:
    """``channels`` smooth random fields of unit peak, drawn on a coarse grid (sigma/2
    steps, so the cost does not grow with the resolution) and upsampled by a separable
    cubic spline (three small matrix products: fast enough to draw fields on the fly)."""
    step = max(1.0, sigma_vox / 2.0)
    coarse = tuple(max(2, int(np.ceil(n / step)) + 1) for n in shape)
    mats = [_upsampling_matrix(m, n) for m, n in zip(coarse, shape, strict=True)]
    out = np.empty((channels, *shape), dtype=np.float32)
    for c in range(channels):
        f = ndimage.gaussian_filter(rng.standard_normal(coarse), sigma=max(sigma_vox / step, 0.5), mode="reflect")
        f = f.astype(np.float32)
        f = (mats[0] @ f.reshape(coarse[0], -1)).reshape(shape[0], coarse[1], coarse[2])
        f = np.matmul(mats[1], f) @ mats[2].T
        out[c] = f / max(float(np.abs(f).max()), 1e-6)
    return out


def random_displacement(
    shape: tuple[int, int, int], affine: np.ndarray, rng: np.random.Generator, cfg: SynthConfig
) -> tuple[np.ndarray, dict[str, Any]]:
    """Pull-back displacement ``[3, X, Y, Z]`` in RAS mm: an elastic field, then a
    random affine about the grid centre, ``d(x) = A (x + e(x) - c) + c + t - x``."""
    sp = float(np.mean(voxel_spacing(affine)))
    peak = rng.uniform(0.5, 1.0) * cfg.elastic_mm
    elastic = _smooth_noise(shape, cfg.elastic_sigma_mm / sp, rng, 3) * np.float32(peak)
    ang = np.deg2rad(rng.uniform(-cfg.rotation_deg, cfg.rotation_deg, 3))
    cx, cy, cz = np.cos(ang)
    sx, sy, sz = np.sin(ang)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    scl = rng.uniform(1 - cfg.scale, 1 + cfg.scale, 3)
    lin = rz @ ry @ rx @ np.diag(scl)
    t = rng.uniform(-cfg.translation_mm, cfg.translation_mm, 3)
    x = grid_world_coordinates(affine, shape)
    c = affine[:3, :3] @ ((np.asarray(shape, dtype=np.float64) - 1) / 2) + affine[:3, 3]
    p = x + elastic - c.reshape(3, 1, 1, 1)
    mapped = np.einsum("ij,j...->i...", lin, p) + (c + t).reshape(3, 1, 1, 1)
    disp = (mapped - x).astype(np.float32)
    params = {
        "rotation_deg": np.rad2deg(ang).round(3).tolist(),
        "scale": scl.round(4).tolist(),
        "translation_mm": t.round(3).tolist(),
        "elastic_peak_mm": round(float(peak), 3),
    }
    return disp, params


def _intensity(image: np.ndarray, rng: np.random.Generator, cfg: SynthConfig) -> tuple[np.ndarray, dict[str, Any]]:
    """MR-like appearance: gamma, smooth bias field, gain, Rician-ish noise; background stays ~0."""
    g = float(rng.uniform(*cfg.gamma))
    out = np.power(np.clip(image, 0.0, 1.0), g, dtype=np.float32)
    sp_vox = max(image.shape) / 3.0
    bias = np.exp(np.float32(cfg.bias) * _smooth_noise(image.shape, sp_vox, rng, 1)[0])
    out *= bias
    noise = rng.normal(0.0, cfg.noise, size=image.shape).astype(np.float32)
    out = np.abs(out + noise * (out > 0.02) + 0.3 * noise * (out <= 0.02))
    gain = float(rng.uniform(*cfg.gain))
    return (out * np.float32(gain)).astype(np.float32), {"gamma": round(g, 4), "gain": round(gain, 2)}


def make_subject(template: Template, rng: np.random.Generator, cfg: SynthConfig | None = None) -> Subject:
    """One random subject on the template's grid (image, labels, the true field)."""
    cfg = cfg or SynthConfig()
    shape = template.image.shape
    disp, params = random_displacement(shape, template.affine, rng, cfg)
    img = warp_by_displacement(template.image, template.affine, template.affine, disp, order=1, cval=0.0)
    labels = None
    if template.labels is not None:
        labels = warp_by_displacement(template.labels, template.affine, template.affine, disp, order=0, cval=0)
    img, iparams = _intensity(img, rng, cfg)
    return Subject(image=img, labels=labels, affine=template.affine.copy(), disp_mm=disp, params={**params, **iparams})


def make_subjects(
    out_dir: str | os.PathLike[str],
    n: int,
    seed: int = 0,
    source: str | os.PathLike[str] = "mni",
    spacing: float | None = 2.0,
    cfg: SynthConfig | None = None,
    prefix: str = "subject",
    save_fields: bool = False,
) -> list[dict[str, Any]]:
    """Write ``n`` subjects as ``PREFIX_K.nii.gz`` (+ ``PREFIX_K_labels.nii.gz``, and
    ``PREFIX_K_disp.nii.gz`` with ``save_fields``) and ``PREFIX_synth.json`` (the
    exact settings and per-subject draws); returns one record per subject."""
    if n < 1:
        raise GvslInputError(f"--n {n}: make at least one subject")
    cfg = cfg or SynthConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    template = load_template(source, spacing)
    records = []
    for k in range(n):
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(k,)))
        s = make_subject(template, rng, cfg)
        rec: dict[str, Any] = {
            "index": k,
            "image": str(save_nifti(out / f"{prefix}_{k:03d}.nii.gz", s.image, s.affine)),
        }
        if s.labels is not None:
            rec["labels"] = str(save_nifti(out / f"{prefix}_{k:03d}_labels.nii.gz", s.labels, s.affine))
        if save_fields:
            rec["disp"] = str(
                save_nifti(out / f"{prefix}_{k:03d}_disp.nii.gz", np.moveaxis(s.disp_mm, 0, -1), s.affine)
            )
        rec["params"] = s.params
        records.append(rec)
    meta = {
        "source": str(source),
        "spacing": spacing,
        "seed": seed,
        "n": n,
        "config": cfg.to_dict(),
        "labels": {str(k): v for k, v in LABEL_NAMES.items()} if template.labels is not None else None,
        "subjects": records,
    }
    save_text(out / f"{prefix}_synth.json", json.dumps(meta, indent=2) + "\n")
    return records


def load_label_map(path: str | os.PathLike[str]) -> np.ndarray:
    """Integer label array of a NIfTI (as stored, no reorientation)."""
    return np.rint(np.asarray(nib.load(str(path)).dataobj)).astype(np.int64)
