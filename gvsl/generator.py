"""A SynthSeg-style generator: CT- and MR-like subjects drawn from label maps.

A model that must work on scans it never saw learns best from images whose
anatomy is real but whose appearance is random (SynthSeg, SynthMorph). This
module turns label maps into such images, numpy/scipy only, fast enough to run
inside the training loop (one 64^3-96^3 draw is well under a second on a core):

* **label maps** come from a *recipe* (a JSON file, see ``gvsl/assets/recipes``):
  the MNI brain template (grey/white matter plus CSF, skull and scalp derived
  from the T1), any label NIfTIs (e.g. a chest CT's segments, TotalSegmentator
  outputs) optionally refined by thresholding their image, label maps made by
  k-means clustering of real volumes, and random shapes (argmax of smoothed
  noise fields);
* **a subject** is the label map pulled through a random smooth deformation
  (affine + elastic, :func:`gvsl.synth.random_displacement`) onto a grid of the
  requested shape, painted per label (CT: a random HU value inside the range of
  the label's tissue class; MR: an arbitrary mean per label), then blurred,
  bias-modulated (MR), gamma-corrected (MR), noised, resampled as if acquired
  with thick slices along a random axis, flipped and cut to a field of view;
* **a pair** for Z-matching is two draws of one label map with different
  deformations and artefacts but the same appearance model (modality, per-label
  intensities, gamma, flips), so that NCC between them is meaningful.

Labels move with the image: the warped label map is returned with every draw,
and a voxel's intensity before artefacts is a function of its label only.
Draws are reproducible from a ``numpy.random.Generator``.

The file is past 600 lines because the recipe's validation, the label-map sources
and the drawing belong together: every recipe key is read and checked here, next
to the code that honours it.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from gvsl.runtime.errors import GvslInputError
from gvsl.runtime.io import atomic_write
from gvsl.runtime.preprocess import (
    PreprocessConfig,
    Volume,
    load_volume,
    normalize_intensity,
    resample,
    save_nifti,
    to_canonical,
)
from gvsl.runtime.warp import warp_by_displacement
from gvsl.synth import SynthConfig, _smooth_noise, load_template, random_displacement

__all__ = [
    "CT_HU",
    "RECIPE_DIR",
    "Draw",
    "LabelMap",
    "SynthGenerator",
    "load_recipe",
    "recipe_path",
    "write_draws",
]

RECIPE_FORMAT = "gvsl-synth-recipe"

#: Recipes shipped with gvsl (``--synth default`` names ``default.json`` here).
RECIPE_DIR = Path(__file__).parent / "assets" / "recipes"

#: Default HU range of each tissue class (a label's mean HU is drawn uniformly inside its class's range).
CT_HU: dict[str, tuple[float, float]] = {
    "air": (-1010.0, -960.0),
    "lung": (-920.0, -700.0),
    "fat": (-130.0, -70.0),
    "fluid": (0.0, 20.0),
    "soft": (20.0, 80.0),
    "bone": (300.0, 1200.0),
}

#: MR mean of a class when the recipe gives none: [0, 1] for tissue, dark for air and lung.
MR_MEAN_DARK = (0.0, 0.05)

_TOP_KEYS = {"format", "description", "notes", "held_out", "root", "spacing", "shape", "sources", "appearance",
             "deformation", "artefacts", "recipe_file"}  # fmt: skip
_SOURCE_KEYS = {
    "mni": {"name", "kind", "probability", "p_ct", "template"},
    "label_map": {"name", "kind", "probability", "p_ct", "label_maps", "images", "labels", "default_class", "derive"},
    "masks": {"name", "kind", "probability", "p_ct", "folders", "images", "labels", "default_class", "derive"},
    "clusters": {"name", "kind", "probability", "p_ct", "images", "k", "classes"},
    "shapes": {"name", "kind", "probability", "p_ct", "n_labels", "sigma_mm"},
}
_APPEARANCE = {"p_ct": 0.5, "ct_hu": {}, "ct_std_hu": [2.0, 25.0], "mr_mean": [0.0, 1.0], "mr_std": [0.0, 0.06],
               "gamma": [0.7, 1.5]}  # fmt: skip
_ARTEFACTS = {"bias": 0.35, "blur_mm": [0.0, 1.5], "ct_noise_hu": [0.0, 25.0], "mr_noise": [0.0, 0.04],
              "p_thick": 0.5, "slice_mm": [3.0, 10.0], "p_flip": [0.5, 0.0, 0.0], "p_fov": 0.2,
              "fov_keep": [0.6, 1.0]}  # fmt: skip
_DEFORMATION = {"rotation_deg": 10.0, "scale": 0.1, "translation_mm": 8.0, "elastic_mm": 6.0, "elastic_sigma_mm": 16.0}


# ----------------------------------------------------------------------------- recipe
def recipe_path(name: str | os.PathLike[str]) -> Path:
    """A recipe file: a path, or the name of one shipped with gvsl (``default``, ``default_v2``)."""
    p = Path(name)
    if p.is_file():
        return p
    shipped = RECIPE_DIR / f"{name}.json"
    if shipped.is_file():
        return shipped
    names = ", ".join(sorted(f.stem for f in RECIPE_DIR.glob("*.json")))
    raise GvslInputError(f"{name}: no such recipe file; give a JSON recipe path or one of: {names}", str(name))


def load_recipe(name: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Read and validate a recipe; relative file names become absolute (against ``root``,
    else the recipe's ``"root"`` key taken relative to the recipe file, else the recipe's
    folder), so the returned dict is self-contained and can be stored in a checkpoint."""
    path = recipe_path(name)
    try:
        recipe = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise GvslInputError(f"{path}: not a readable JSON recipe ({e}); fix the file", str(path)) from None
    if not isinstance(recipe, dict) or recipe.get("format") != RECIPE_FORMAT:
        raise GvslInputError(f'{path}: not a gvsl recipe; it needs "format": "{RECIPE_FORMAT}"', str(path))
    base = Path(root) if root is not None else path.parent / recipe.get("root", ".")
    recipe = json.loads(json.dumps(recipe))  # a private copy
    recipe["recipe_file"] = str(path.resolve())
    for src in recipe.get("sources", []):
        for key in ("label_maps", "images"):
            if key in src:
                src[key] = [str(f) for f in _expand(src[key], base.resolve(), path, src.get("name", "?"))]
        if "folders" in src:
            src["folders"] = [str(f) for f in _expand(src["folders"], base.resolve(), path, src.get("name", "?"), True)]
    validate_recipe(recipe, str(path))
    return recipe


def _expand(entries: Any, base: Path, recipe: Path, source: str, folders: bool = False) -> list[Path]:
    """Files named by a recipe source: paths, folders (their NIfTIs) or glob patterns; with
    ``folders``, the folders themselves (each one subject's masks)."""
    items = [entries] if isinstance(entries, str) else list(entries)
    out: list[Path] = []
    for item in items:
        p = Path(item) if Path(item).is_absolute() else base / item
        if folders:
            found = sorted(Path(f) for f in glob.glob(str(p)) if Path(f).is_dir()) if glob.has_magic(str(p)) else []
            found = found or ([p] if p.is_dir() else [])
        elif p.is_dir():
            found = sorted(f for f in p.iterdir() if f.name.endswith((".nii", ".nii.gz")))
        elif glob.has_magic(str(p)):
            found = sorted(Path(f) for f in glob.glob(str(p)))
        else:
            found = [p] if p.is_file() else []
        if not found:
            raise GvslInputError(
                f"{recipe}: source {source!r} names {p}, which does not exist; fix the path (relative paths "
                f"start at {base}) or pass --synth-root",
                str(p),
            )
        out.extend(found)
    return out


def _range(value: Any, what: str, where: str, lo: float = -np.inf) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise GvslInputError(f"{where}: {what} must be [low, high], got {value!r}") from None
    if not (lo <= a <= b and np.isfinite(a) and np.isfinite(b)):
        raise GvslInputError(f"{where}: {what} must be [low, high] with {lo} <= low <= high, got {value!r}")
    return a, b


def _prob(value: Any, what: str, where: str) -> float:
    try:
        p = float(value)
    except (TypeError, ValueError):
        p = float("nan")
    if not 0.0 <= p <= 1.0:
        raise GvslInputError(f"{where}: {what} must be a probability in [0, 1], got {value!r}")
    return p


def validate_recipe(recipe: dict[str, Any], where: str) -> None:
    """One clear line for anything the generator could not honour (unknown keys, kinds,
    tissue classes, probabilities or ranges out of bounds)."""
    unknown = set(recipe) - _TOP_KEYS
    if unknown:
        raise GvslInputError(f"{where}: unknown recipe keys {sorted(unknown)}; allowed: {sorted(_TOP_KEYS)}")
    for section, defaults in (("appearance", _APPEARANCE), ("artefacts", _ARTEFACTS), ("deformation", _DEFORMATION)):
        extra = set(recipe.get(section, {})) - set(defaults)
        if extra:
            raise GvslInputError(f"{where}: unknown {section} keys {sorted(extra)}; allowed: {sorted(defaults)}")
    app = {**_APPEARANCE, **recipe.get("appearance", {})}
    classes = {**CT_HU, **{k: _range(v, f"appearance.ct_hu.{k}", where) for k, v in app["ct_hu"].items()}}
    _prob(app["p_ct"], "appearance.p_ct", where)
    for key in ("ct_std_hu", "mr_mean", "mr_std", "gamma"):
        _range(app[key], f"appearance.{key}", where, lo=0.0 if key != "mr_mean" else -np.inf)
    art = {**_ARTEFACTS, **recipe.get("artefacts", {})}
    for key in ("blur_mm", "ct_noise_hu", "mr_noise", "fov_keep"):
        _range(art[key], f"artefacts.{key}", where, lo=0.0)
    _range(art["slice_mm"], "artefacts.slice_mm", where, lo=1e-3)
    for key in ("p_thick", "p_fov"):
        _prob(art[key], f"artefacts.{key}", where)
    if len(art["p_flip"]) != 3:
        raise GvslInputError(f"{where}: artefacts.p_flip must be three probabilities (one per axis)")
    for p in art["p_flip"]:
        _prob(p, "artefacts.p_flip", where)
    SynthConfig.from_dict({**_DEFORMATION, **recipe.get("deformation", {})})
    sources = recipe.get("sources")
    if not isinstance(sources, list) or not sources:
        raise GvslInputError(f'{where}: "sources" must list at least one label-map source')
    for i, src in enumerate(sources):
        name = f"{where}: source {src.get('name', i)!r}"
        kind = src.get("kind")
        if kind not in _SOURCE_KEYS:
            raise GvslInputError(f"{name}: kind must be one of {sorted(_SOURCE_KEYS)}, got {kind!r}")
        extra = set(src) - _SOURCE_KEYS[kind]
        if extra:
            raise GvslInputError(f"{name}: unknown keys {sorted(extra)} for kind {kind}; allowed: "
                                 f"{sorted(_SOURCE_KEYS[kind])}")  # fmt: skip
        if float(src.get("probability", 1.0)) < 0:
            raise GvslInputError(f"{name}: probability must be >= 0")
        if "p_ct" in src:
            _prob(src["p_ct"], "p_ct", name)
        named = [*src.get("labels", {}).values(), *(d.get("class", "") for d in src.get("derive", [])),
                 *src.get("classes", [])]  # fmt: skip
        if "default_class" in src:
            named.append(src["default_class"])
        bad = sorted({c for c in named if c not in classes})
        if bad:
            raise GvslInputError(f"{name}: unknown tissue classes {bad}; known: {sorted(classes)} "
                                 "(add more under appearance.ct_hu)")  # fmt: skip
        entries = src.get("label_maps" if kind == "label_map" else "folders")
        if kind in ("label_map", "masks") and not entries:
            raise GvslInputError(f'{name}: list its files under "{"label_maps" if kind == "label_map" else "folders"}"')
        if kind in ("label_map", "masks") and "images" in src and len(src["images"]) != len(entries):
            raise GvslInputError(f"{name}: give one image per label map ({len(entries)} label maps, "
                                 f"{len(src['images'])} images)")  # fmt: skip
        if kind == "shapes":
            _range(src.get("n_labels", [3, 10]), "n_labels", name, lo=2)
            _range(src.get("sigma_mm", [6, 20]), "sigma_mm", name, lo=1e-3)
    if sum(float(s.get("probability", 1.0)) for s in sources) <= 0:
        raise GvslInputError(f"{where}: the source probabilities sum to 0; give at least one a positive probability")


# ----------------------------------------------------------------------------- label maps
@dataclass
class LabelMap:
    """One label map on a RAS+ grid at the generator's spacing, with the tissue class of each label."""

    labels: np.ndarray
    affine: np.ndarray
    classes: dict[int, str]
    source: str
    fg_index: np.ndarray = field(repr=False, default_factory=lambda: np.zeros((0, 3), np.int32))

    def __post_init__(self) -> None:
        if not self.fg_index.size:
            fg = np.argwhere(self.labels != 0)
            self.fg_index = (fg if fg.size else np.argwhere(np.ones_like(self.labels, bool)))[::7].astype(np.int32)


def _on_grid(vol: Volume, spacing: float, order: int) -> Volume:
    return resample(to_canonical(vol), spacing, order=order)


def _labels_on_grid(labels: np.ndarray, affine: np.ndarray, spacing: float, source: str) -> Volume:
    """A label map in RAS+ at ``spacing`` mm. Where that is finer than the map (a CT's 10 mm
    slices at 2 mm) each label's indicator is resampled linearly and the largest wins, so
    boundaries are interpolated between slices instead of repeating them as stairs."""
    vol = to_canonical(Volume(labels.astype(np.float32), affine, source))
    if max(vol.spacing) <= 1.5 * spacing:  # not upsampled by much: nearest neighbour is exact enough
        out = resample(vol, spacing, order=0)
        return Volume(np.rint(out.data).astype(np.int16), out.affine, source)
    values = np.unique(vol.data).astype(np.int16)
    best = score = None
    for v in values:
        grid = resample(Volume((vol.data == v).astype(np.float32), vol.affine, source), spacing, order=1)
        if best is None:
            best, score = np.full(grid.data.shape, v, np.int16), grid.data
        else:
            win = grid.data > score
            best[win], score = v, np.maximum(score, grid.data)
    return Volume(best, grid.affine, source)


def _mni_map(template: str, spacing: float) -> LabelMap:
    """The MNI brain: 0 air, 1 CSF (inside the brain outline, neither grey nor white matter),
    2 grey and 3 white matter (the template's maps), 4 skull (dark non-brain head voxels of
    the T1) and 5 scalp (bright ones)."""
    tpl = load_template("sample" if template == "sample" else "mni", spacing=spacing)
    t1, gmwm = tpl.image, tpl.labels
    assert gmwm is not None  # both MNI sources have labels
    head = ndimage.binary_fill_holes(t1 > 0.08)
    brain = ndimage.binary_fill_holes(ndimage.binary_closing(gmwm > 0, iterations=2))
    labels = np.zeros(t1.shape, np.int16)
    labels[head & ~brain] = np.where(t1[head & ~brain] < 0.35, 4, 5)
    labels[brain] = 1
    labels[gmwm == 1] = 2
    labels[gmwm == 2] = 3
    classes = {0: "air", 1: "fluid", 2: "soft", 3: "soft", 4: "bone", 5: "fat"}
    return LabelMap(labels, tpl.affine, classes, f"mni:{template}")


def _check_same_grid(label: Volume, image: Volume, label_path: str, image_path: str) -> None:
    if label.data.shape != image.data.shape or not np.allclose(label.affine, image.affine, atol=1e-3):
        raise GvslInputError(
            f"{label_path}: label map grid {label.data.shape} does not match its image {image_path} "
            f"{image.data.shape} (shape or affine differ); resample the label map onto the image grid",
            label_path,
        )


def _mask_folder(folder: str, where: str) -> tuple[Volume, dict[str, int]]:
    """One subject's binary masks (a folder of NIfTIs, one structure each: TotalSegmentator's
    output) as one label map: mask k of the sorted files is label k + 1 (later files win
    where masks overlap); returns it and ``{file stem: label}``."""
    files = sorted(f for f in Path(folder).iterdir() if f.name.endswith((".nii", ".nii.gz")))
    if not files:
        raise GvslInputError(f"{where}: {folder} holds no .nii/.nii.gz masks; point the source at mask folders")
    first = load_volume(files[0])
    labels = np.zeros(first.data.shape, np.int16)
    stems = {}
    for k, f in enumerate(files, start=1):
        mask = first if k == 1 else load_volume(f)
        _check_same_grid(mask, first, str(f), str(files[0]))
        labels[mask.data > 0.5] = k
        stems[f.name.split(".nii")[0]] = k
    return Volume(labels.astype(np.float32), first.affine, folder), stems


def _label_file_maps(src: dict[str, Any], spacing: float, where: str) -> list[LabelMap]:
    """Label NIfTIs (kind ``label_map``) or folders of binary masks (kind ``masks``), each
    optionally refined by threshold rules on its image."""
    masks = src["kind"] == "masks"
    entries = src["folders"] if masks else src["label_maps"]
    named_raw = dict(src.get("labels", {}))
    derive = src.get("derive", [])
    images = src.get("images", [None] * len(entries))
    maps, present = [], set()
    for lab_path, img_path in zip(entries, images, strict=True):
        if masks:
            lab, stems = _mask_folder(lab_path, where)
            named = {stems[k]: v for k, v in named_raw.items() if k in stems}
            named[0] = named_raw.get("background", "air")
            present |= set(stems) & set(named_raw)
        else:
            lab = load_volume(lab_path)
            named = {int(k): v for k, v in named_raw.items()}
        data = np.rint(lab.data).astype(np.int16)
        classes = dict(named)
        if derive:
            if img_path is None:
                raise GvslInputError(f'{where}: source {src["name"]!r} has derive rules but no images; add "images"')
            img = load_volume(img_path)
            _check_same_grid(lab, img, lab_path, img_path)
            original = data.copy()
            for rule in derive:
                lo, hi = _range(rule["range"], "derive range", where)
                within = np.isin(original, rule.get("within", sorted(np.unique(original).tolist())))
                data[within & (img.data >= lo) & (img.data < hi)] = int(rule["label"])
                classes[int(rule["label"])] = rule["class"]
        values = set(np.unique(data).tolist())
        if not masks:
            present |= values
        for v in values - set(classes):
            if "default_class" not in src:
                what = f"mask {next(k for k, n in stems.items() if n == v)!r}" if masks else f"label {v}"
                raise GvslInputError(
                    f"{lab_path}: {what} has no tissue class in source {src['name']!r}; name it under "
                    '"labels" or set "default_class"',
                    lab_path,
                )
            classes[v] = src["default_class"]
        grid = _labels_on_grid(data, lab.affine, spacing, lab_path)
        maps.append(LabelMap(grid.data, grid.affine, classes, lab_path))
    if masks:
        missing = sorted(set(named_raw) - present - {"background"})
    else:
        missing = sorted({int(k) for k in named_raw} - present - {int(r["label"]) for r in derive})
    if missing:
        raise GvslInputError(
            f"{where}: source {src['name']!r} names labels {missing}, which none of its "
            f"{'mask folders' if masks else 'label maps'} contains; fix the label {'names' if masks else 'numbers'}"
        )
    return maps


def kmeans_labels(image: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Label map of a real volume: 0 outside its foreground (above 10 % of the 99th
    percentile, holes filled), 1..k the intensity clusters inside (1-D k-means,
    quantile-initialised, labels sorted by intensity) of the image smoothed by one
    voxel, so scanner noise does not speckle the regions."""
    image = ndimage.gaussian_filter(np.asarray(image, np.float32), 1.0)
    hi = float(np.percentile(image, 99))
    fg = ndimage.binary_fill_holes(image > 0.1 * hi)
    values = image[fg].astype(np.float64)
    sample = values if values.size < 200_000 else rng.choice(values, 200_000, replace=False)
    centres = np.quantile(sample, (np.arange(k) + 0.5) / k)
    for _ in range(30):
        assign = np.argmin(np.abs(sample[:, None] - centres[None]), axis=1)
        new = np.array([sample[assign == c].mean() if np.any(assign == c) else centres[c] for c in range(k)])
        if np.allclose(new, centres):
            break
        centres = new
    order = np.sort(centres)
    cuts = (order[1:] + order[:-1]) / 2
    labels = np.zeros(image.shape, np.int16)
    labels[fg] = (np.searchsorted(cuts, image[fg]) + 1).astype(np.int16)
    return labels


def _cluster_maps(src: dict[str, Any], spacing: float) -> list[LabelMap]:
    k = int(src.get("k", 5))
    cls = list(src.get("classes", ["soft"] * k))
    classes = {0: "air", **{i + 1: cls[i % len(cls)] for i in range(k)}}
    maps = []
    for path in src["images"]:
        vol = _on_grid(load_volume(path), spacing, order=1)
        labels = kmeans_labels(vol.data, k, np.random.default_rng(0))
        maps.append(LabelMap(labels, vol.affine, classes, f"{path} (k-means {k})"))
    return maps


def random_shapes(
    shape: tuple[int, int, int], spacing: float, rng: np.random.Generator, n_labels: tuple[float, float],
    sigma_mm: tuple[float, float], class_names: list[str],
) -> LabelMap:  # fmt: skip
    """A random-shape label map: argmax of K smoothed noise fields (K and the smoothness drawn
    from the ranges), each label given a random tissue class; the grid is centred at 0."""
    k = int(rng.integers(int(n_labels[0]), int(n_labels[1]) + 1))
    sigma = float(rng.uniform(*sigma_mm)) / spacing
    fields = _smooth_noise(shape, sigma, rng, k)
    labels = np.argmax(fields, axis=0).astype(np.int16)
    classes = {i: class_names[int(rng.integers(len(class_names)))] for i in range(k)}
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = -spacing * (np.asarray(shape) - 1) / 2
    centre = np.array([[n // 2 for n in shape]], np.int32)  # the grid is the patch plus a margin: draw at its centre
    return LabelMap(labels, affine, classes, "shapes", fg_index=centre)


# ----------------------------------------------------------------------------- drawing
@dataclass
class Draw:
    """One synthetic subject: ``image`` in HU (CT) or arbitrary MR units, ``labels`` the
    warped label map, on the grid ``affine``; ``params`` the draws that made it."""

    image: np.ndarray
    labels: np.ndarray
    affine: np.ndarray
    modality: str
    params: dict[str, Any]


class SynthGenerator:
    """Draws subjects and pairs from a recipe (see the module docstring) at ``spacing`` mm.

    Label maps of files, clusters and the MNI template are built once here; random
    shapes are made afresh for every pair. All randomness comes from the generator
    passed to :meth:`draw` / :meth:`draw_pair`, so a seed reproduces every draw.
    """

    def __init__(self, recipe: dict[str, Any], spacing: float | None = None) -> None:
        where = recipe.get("recipe_file", "recipe")
        validate_recipe(recipe, where)
        self.recipe = recipe
        self.spacing = float(spacing if spacing is not None else recipe.get("spacing", 2.0))
        self.appearance = {**_APPEARANCE, **recipe.get("appearance", {})}
        self.ct_hu = {**CT_HU, **{k: tuple(v) for k, v in self.appearance["ct_hu"].items()}}
        self.artefacts = {**_ARTEFACTS, **recipe.get("artefacts", {})}
        self.deformation = SynthConfig.from_dict({**_DEFORMATION, **recipe.get("deformation", {})})
        self.shape = tuple(int(s) for s in recipe.get("shape", [96, 96, 96]))
        self.sources = recipe["sources"]
        weights = np.array([float(s.get("probability", 1.0)) for s in self.sources])
        self.weights = weights / weights.sum()
        self.maps: list[list[LabelMap]] = []
        for src in self.sources:
            kind = src["kind"]
            if kind == "mni":
                self.maps.append([_mni_map(src.get("template", "sample"), self.spacing)])
            elif kind in ("label_map", "masks"):
                self.maps.append(_label_file_maps(src, self.spacing, where))
            elif kind == "clusters":
                self.maps.append(_cluster_maps(src, self.spacing))
            else:
                self.maps.append([])

    def _label_map(self, rng: np.random.Generator, shape: tuple[int, int, int]) -> tuple[int, LabelMap]:
        s = int(rng.choice(len(self.sources), p=self.weights))
        src = self.sources[s]
        if src["kind"] == "shapes":
            margin = int(np.ceil(2 * self.deformation.translation_mm / self.spacing)) + 8
            grid = tuple(n + margin for n in shape)
            lm = random_shapes(grid, self.spacing, rng, src.get("n_labels", [3, 10]), src.get("sigma_mm", [6, 20]),
                               sorted(self.ct_hu))  # fmt: skip
            return s, lm
        maps = self.maps[s]
        return s, maps[int(rng.integers(len(maps)))]

    def _appearance(self, lm: LabelMap, rng: np.random.Generator, p_ct: float) -> dict[str, Any]:
        """Modality and per-label mean/std (shared by both draws of a pair)."""
        modality = "ct" if rng.random() < p_ct else "mr"
        n = int(lm.labels.max()) + 1
        mean = np.zeros(n, np.float32)
        std = np.zeros(n, np.float32)
        app = self.appearance
        for v in range(n):
            cls = lm.classes.get(v, "soft")
            if modality == "ct":
                mean[v] = rng.uniform(*self.ct_hu[cls])
                std[v] = rng.uniform(*app["ct_std_hu"])
            else:
                mean[v] = rng.uniform(*(MR_MEAN_DARK if cls in ("air", "lung") else app["mr_mean"]))
                std[v] = rng.uniform(*app["mr_std"])
        gamma = float(rng.uniform(*app["gamma"])) if modality == "mr" else 1.0
        flips = [bool(rng.random() < p) for p in self.artefacts["p_flip"]]
        return {"modality": modality, "mean": mean, "std": std, "gamma": gamma, "flips": flips}

    def draw_pair(self, rng: np.random.Generator, shape: tuple[int, int, int] | None = None) -> tuple[Draw, Draw]:
        """Two draws of one label map around one centre: different deformations and
        artefacts, the same appearance model."""
        return self._pair(rng, shape, cross_modal=False)

    def draw_cross_modal_pair(
        self, rng: np.random.Generator, shape: tuple[int, int, int] | None = None
    ) -> tuple[Draw, Draw]:
        """An MR-like and a CT-like draw of one label map around one centre (different
        deformations, artefacts and intensities; the same flips): pairs on which
        intensity similarity has to fail and a registration must match anatomy, for
        evaluating CT <-> MR registration."""
        return self._pair(rng, shape, cross_modal=True)

    def _pair(
        self, rng: np.random.Generator, shape: tuple[int, int, int] | None, cross_modal: bool
    ) -> tuple[Draw, Draw]:
        shape = tuple(int(s) for s in (shape or self.shape))
        s, lm = self._label_map(rng, shape)
        if cross_modal:
            first = self._appearance(lm, rng, 0.0)
            second = {**self._appearance(lm, rng, 1.0), "flips": first["flips"]}
        else:
            first = second = self._appearance(lm, rng, float(self.sources[s].get("p_ct", self.appearance["p_ct"])))
        centre = lm.affine[:3, :3] @ lm.fg_index[int(rng.integers(len(lm.fg_index)))] + lm.affine[:3, 3]
        a = self._draw(lm, first, centre, shape, rng)
        b = self._draw(lm, second, centre, shape, rng)
        for d in (a, b):
            d.params["source"] = self.sources[s].get("name", self.sources[s]["kind"])
        return a, b

    def draw(self, rng: np.random.Generator, shape: tuple[int, int, int] | None = None) -> Draw:
        """One subject (its own appearance)."""
        return self.draw_pair(rng, shape)[0]

    def _draw(
        self, lm: LabelMap, look: dict[str, Any], centre: np.ndarray, shape: tuple[int, int, int],
        rng: np.random.Generator,
    ) -> Draw:  # fmt: skip
        sp, art = self.spacing, self.artefacts
        affine = np.diag([sp, sp, sp, 1.0])
        affine[:3, 3] = centre - sp * (np.asarray(shape) - 1) / 2
        disp, params = random_displacement(shape, affine, rng, self.deformation)
        labels = warp_by_displacement(lm.labels, lm.affine, affine, disp, order=0, cval=0)
        mean, std = look["mean"], look["std"]
        image = mean[labels] + std[labels] * rng.standard_normal(shape, dtype=np.float32)
        blur = float(rng.uniform(*art["blur_mm"]))
        if blur > 0.05:
            image = ndimage.gaussian_filter(image, blur / sp, mode="nearest")
        ct = look["modality"] == "ct"
        if ct:
            noise = float(rng.uniform(*art["ct_noise_hu"]))
            image += np.float32(noise) * rng.standard_normal(shape, dtype=np.float32)
            bias_amp = 0.0
        else:
            bias_amp = float(rng.uniform(0.0, art["bias"]))
            image *= np.exp(np.float32(bias_amp) * _smooth_noise(shape, max(shape) / 3.0, rng, 1)[0])
            image = np.power(np.clip(image, 0.0, None), np.float32(look["gamma"]))
            noise = float(rng.uniform(*art["mr_noise"]))
            image = np.abs(image + np.float32(noise) * rng.standard_normal(shape, dtype=np.float32))
        thick_axis, thickness = -1, sp
        if rng.random() < art["p_thick"]:
            thick_axis = int(rng.integers(3))
            thickness = float(rng.uniform(*art["slice_mm"]))
            image = thick_slices(image, thick_axis, thickness, sp)
        for ax, flip in enumerate(look["flips"]):
            if flip:
                image, labels = np.flip(image, ax), np.flip(labels, ax)
        kept = [[0, n] for n in shape]
        if rng.random() < art["p_fov"]:
            ax = int(rng.integers(3))
            keep = int(round(float(rng.uniform(*art["fov_keep"])) * shape[ax]))
            start = int(rng.integers(shape[ax] - keep + 1))
            kept[ax] = [start, start + keep]
            outside = np.ones(shape[ax], bool)
            outside[start : start + keep] = False
            view = [slice(None)] * 3
            view[ax] = outside
            image = np.array(image)
            image[tuple(view)] = -1000.0 if ct else 0.0
        params.update(
            {
                "modality": look["modality"],
                "gamma": round(look["gamma"], 4),
                "flips": look["flips"],
                "blur_mm": round(blur, 3),
                "noise": round(noise, 4),
                "bias": round(bias_amp, 4),
                "slice_axis": thick_axis,
                "slice_mm": round(thickness, 3),
                "fov_kept": kept,
                "label_source": lm.source,
            }
        )
        return Draw(np.ascontiguousarray(image, np.float32), np.ascontiguousarray(labels), affine,
                    look["modality"], params)  # fmt: skip

    @staticmethod
    def normalised(draw: Draw, pre: PreprocessConfig) -> np.ndarray:
        """The draw as network input: the runtime's own normalisation for its modality
        (``pre``'s CT window / MR percentiles), so synthetic and real inputs agree."""
        cfg = PreprocessConfig(
            spacing=None, modality=draw.modality, ct_window=pre.ct_window, mr_percentiles=pre.mr_percentiles
        )
        return normalize_intensity(draw.image, cfg)


def thick_slices(image: np.ndarray, axis: int, thickness_mm: float, spacing_mm: float) -> np.ndarray:
    """``image`` as a scan with ``thickness_mm`` slices along ``axis`` would show it on this grid:
    slice profile (Gaussian of FWHM = thickness), sampled every ``thickness_mm``, then linearly
    interpolated back (what resampling a thick-slice scan to fine voxels does)."""
    n = image.shape[axis]
    step = thickness_mm / spacing_mm  # in voxels
    if step <= 1.0:
        return image
    blurred = ndimage.gaussian_filter1d(image, step / 2.355, axis=axis, mode="nearest")
    offset = (n - 1 - step * np.floor((n - 1) / step)) / 2
    positions = offset + step * np.arange(int(np.floor((n - 1) / step)) + 1)
    samples = np.take(blurred, np.rint(positions).astype(int), axis=axis)
    # linear interpolation between the slice centres, edges held
    x = np.arange(n, dtype=np.float64)
    idx = np.clip(np.searchsorted(positions, x) - 1, 0, max(len(positions) - 2, 0))
    if len(positions) == 1:
        return np.repeat(samples, n, axis=axis).astype(np.float32)
    w = np.clip((x - positions[idx]) / step, 0.0, 1.0).astype(np.float32)
    lo = np.take(samples, idx, axis=axis)
    hi = np.take(samples, idx + 1, axis=axis)
    shape = [1, 1, 1]
    shape[axis] = n
    w = w.reshape(shape)
    return (lo * (1 - w) + hi * w).astype(np.float32)


def write_draws(
    out_dir: str | os.PathLike[str],
    recipe: dict[str, Any],
    n: int,
    seed: int = 0,
    shape: tuple[int, int, int] | None = None,
    spacing: float | None = None,
    pairs: bool = False,
    prefix: str = "synth",
) -> list[dict[str, Any]]:
    """Write ``n`` draws as ``PREFIX_K.nii.gz`` + ``PREFIX_K_labels.nii.gz`` (with ``pairs``:
    ``PREFIX_K_a`` / ``PREFIX_K_b``, two draws sharing one appearance) and ``PREFIX_synth.json``
    (the recipe, the seed and every draw's parameters). Draw k uses
    ``SeedSequence(seed, spawn_key=(k,))``, so any one can be remade alone."""
    if n < 1:
        raise GvslInputError(f"--n {n}: make at least one subject")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gen = SynthGenerator(recipe, spacing=spacing)
    records = []
    for k in range(n):
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(k,)))
        drawn = gen.draw_pair(rng, shape)
        names = [f"{prefix}_{k:03d}_a", f"{prefix}_{k:03d}_b"] if pairs else [f"{prefix}_{k:03d}"]
        for name, d in zip(names, drawn, strict=False):
            records.append(
                {
                    "index": k,
                    "image": str(save_nifti(out / f"{name}.nii.gz", d.image, d.affine)),
                    "labels": str(save_nifti(out / f"{name}_labels.nii.gz", d.labels.astype(np.int16), d.affine)),
                    "params": d.params,
                }
            )
    meta = {"seed": seed, "n": n, "pairs": pairs, "spacing": gen.spacing, "recipe": recipe, "subjects": records}
    text = json.dumps(meta, indent=2) + "\n"
    atomic_write(out / f"{prefix}_synth.json", lambda p: Path(p).write_text(text, encoding="utf-8"))
    return records
