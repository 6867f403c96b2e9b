"""Registration benchmark: gvsl (network alone, network + refinement) vs ANTs SyN, elastix and FireANTs.

Same run, same machine, same files: every method registers the same pairs
and writes a warped image, warped labels (nearest neighbour) and its whole
transform as one ITK displacement field on the fixed grid; this script
scores all of them the same way. Four pair sets:

* ``mni``: synthetic subjects of the MNI ICBM152 2009a T1 made by
  ``gvsl.synth`` (random affine + smooth elastic field + MR-like intensity
  changes, seed 1000, disjoint from the default model's training seed 0),
  fixed = subject 2k, moving = subject 2k+1; grey/white-matter labels;
* ``ct_deform``: the real chest CT ``slicerio_ctchest4`` (fixed, as stored)
  and a copy of it pulled through a known smooth random field (moving),
  its 7-segment label map pulled the same way;
* ``ct_affine``: the same, with an affine offset (10-20 mm shift in a random
  direction, 2-5 degrees about each axis) composed with the smooth field;
* ``brain``: the two real brain MRs ``pyradiomics_brain{1,2}`` registered
  onto each other (both directions), labels = threshold-derived head and
  intracranial masks (:func:`head_and_brain_masks` says how).

Methods: ``gvsl`` (``gvsl register ... --refine 0`` when the CLI has the
option, else the plain command, which is then the network alone),
``gvsl_refine`` (``gvsl register`` with its refinement defaults; skipped
with a note when the CLI has no ``--refine``), ``gvsl_fast`` (the same with
``--refine-levels 6,4``: the finest level at 4 mm, the speed / accuracy trade
for large fields of view), ``gvsl_nonet`` (``--no-network``: the refinement
from the initial and affine alignment alone, the network not run; skipped
with a note when the CLI lacks the option), and the peers ``ants``
(``ants.registration(type_of_transform="SyN")``), ``ants_quick``
(``antsRegistrationSyNQuick[s]``), ``elastix`` (default affine + B-spline
maps) and ``fireants`` (FireANTs' documented affine + greedy recipe),
each run by ``benchmarks/peer_register.py`` in the peers' own venv
(``--peers-python``; EVALUATION.md says how to make it).

Figures per pair and method, on the fixed grid: Dice per label and their
mean; global NCC of warped vs fixed; folding = % of voxels with Jacobian
determinant <= 0 of the written displacement field (whole transform);
seconds: for gvsl the whole ``gvsl register`` subprocess (start-up, reading,
inference, writing; median of ``--repeats``), for the peers the Python call
from reading the inputs to writing the outputs (median of
``--peer-repeats``), their whole subprocess (interpreter start-up and
imports included) beside it; peak RSS of each subprocess (``wait4``).

    python benchmarks/eval_registration.py -o runs/eval_reg --peers-python /work/venvs/peers/bin/python [--quick]

Results: ``OUT/registration.json`` (every pair, method and run) and
``OUT/registration.md`` (one table per set, mean over pairs).

This file runs past 600 lines because it keeps the pair builders, the
scoring and the run bookkeeping (resume, side-by-side runs joined by
``--import-rows``) together, so that one script reproduces EVALUATION.md
section 1.1; the peers' own code is in ``peer_register.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import nibabel as nib
import numpy as np
from scipy import ndimage

from gvsl.runtime.default_model import default_model_dir
from gvsl.runtime.metrics import dice, folding_stats, jacobian_determinant, ncc
from gvsl.runtime.preprocess import save_nifti
from gvsl.runtime.warp import grid_world_coordinates, resample_to_grid, warp_by_displacement
from gvsl.synth import SynthConfig, make_subjects, random_displacement

ROOT = Path(__file__).resolve().parent.parent
SETS = ("mni", "ct_deform", "ct_affine", "brain")
GVSL_METHODS = ("gvsl", "gvsl_refine", "gvsl_fast", "gvsl_nonet")
#: extra ``gvsl register`` options of each gvsl method
GVSL_OPTIONS = {
    "gvsl": ["--refine", "0"],
    "gvsl_refine": [],
    "gvsl_fast": ["--refine-levels", "6,4"],
    "gvsl_nonet": ["--no-network"],
}
PEER_METHODS = ("ants", "ants_quick", "elastix", "fireants")
METHODS = GVSL_METHODS + PEER_METHODS
METHOD_NAMES = {
    "before": "identity (before)",
    "gvsl": "gvsl network only",
    "gvsl_refine": "gvsl network + refinement",
    "gvsl_fast": "gvsl network + refinement, 6,4 mm",
    "gvsl_nonet": "gvsl refinement alone (--no-network)",
    "ants": "ANTs SyN",
    "ants_quick": "ANTs SyNQuick",
    "elastix": "elastix affine+B-spline",
    "fireants": "FireANTs affine+greedy",
}
#: chest CT segments (slicerio CTChest4 ``Segmentation.seg.nrrd``)
CT_LABELS = {
    "ribs": [1],
    "cervical_spine": [2],
    "thoracic_spine": [3],
    "lumbar_spine": [4],
    "right_lung": [5],
    "left_lung": [6],
    "tissue": [7],
}
MNI_LABELS = {"gm": [1], "wm": [2]}
BRAIN_LABELS = {"head": [1, 2], "brain": [2]}
#: known smooth field of the CT sets: peak displacement drawn in [peak/2, peak], Gaussian smoothness
CT_FIELD = {"peak_mm": 12.0, "sigma_mm": 40.0}
CT_AFFINE = {"shift_mm": (10.0, 20.0), "rotation_deg": (2.0, 5.0)}
CT_NOISE_HU = 10.0
CT_AIR_HU = -1024.0


class Pair(NamedTuple):
    """One registration problem: files on disk, the label regions to score, how it was made."""

    set: str
    name: str
    fixed: str
    moving: str
    fixed_labels: str
    moving_labels: str
    regions: dict[str, list[int]]
    made: dict[str, Any]


# ----------------------------------------------------------------------------- pair builders
def smooth_field(
    shape: tuple[int, int, int], affine: np.ndarray, rng: np.random.Generator, peak_mm: float, sigma_mm: float
) -> np.ndarray:
    """A smooth random pull-back field ``[3, *shape]`` (RAS mm) on the grid ``affine``.

    Drawn by :func:`gvsl.synth.random_displacement` (elastic part only) on a
    4 mm isotropic grid over the same field of view, then read at this grid's
    voxel centres, so the smoothness is ``sigma_mm`` in every direction even on
    anisotropic grids (the chest CT has 10 mm slices).
    """
    lin = np.asarray(affine, dtype=np.float64)[:3, :3]
    spacing = np.sqrt((lin**2).sum(axis=0))
    step = 4.0
    helper = np.eye(4)
    helper[:3, :3] = lin / spacing * step
    helper[:3, 3] = affine[:3, 3]
    helper_shape = tuple(int(np.ceil((n - 1) * s / step)) + 1 for n, s in zip(shape, spacing, strict=True))
    cfg = SynthConfig(rotation_deg=0.0, scale=0.0, translation_mm=0.0, elastic_mm=peak_mm, elastic_sigma_mm=sigma_mm)
    coarse, _ = random_displacement(helper_shape, helper, rng, cfg)
    return resample_to_grid(coarse, helper, affine, shape, order=1, mode="nearest")


def random_rigid(
    rng: np.random.Generator, shift_mm: tuple[float, float], rotation_deg: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """A rotation (each axis ``±U(rotation_deg)``) and a shift of length ``U(shift_mm)`` in a random direction."""
    ang = np.deg2rad(rng.uniform(*rotation_deg, 3) * rng.choice([-1.0, 1.0], 3))
    c, s = np.cos(ang), np.sin(ang)
    rx = np.array([[1, 0, 0], [0, c[0], -s[0]], [0, s[0], c[0]]])
    ry = np.array([[c[1], 0, s[1]], [0, 1, 0], [-s[1], 0, c[1]]])
    rz = np.array([[c[2], -s[2], 0], [s[2], c[2], 0], [0, 0, 1]])
    direction = rng.standard_normal(3)
    shift = direction / np.linalg.norm(direction) * rng.uniform(*shift_mm)
    made = {"rotation_deg": np.rad2deg(ang).round(3).tolist(), "shift_mm": shift.round(3).tolist()}
    return rz @ ry @ rx, shift, made


def compose_rigid(disp: np.ndarray, affine: np.ndarray, rotation: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """``d'(x) = R (x + d(x) - c) + c + t - x``: the rigid map about the grid centre ``c`` after the field."""
    shape = disp.shape[1:]
    x = grid_world_coordinates(affine, shape)
    centre = affine[:3, :3] @ ((np.asarray(shape, dtype=np.float64) - 1) / 2) + affine[:3, 3]
    p = x + disp - centre.reshape(3, 1, 1, 1)
    mapped = np.einsum("ij,j...->i...", rotation, p) + (centre + shift).reshape(3, 1, 1, 1)
    return (mapped - x).astype(np.float32)


def deform_pair(
    image: np.ndarray, labels: np.ndarray, affine: np.ndarray, disp: np.ndarray, cval: float
) -> tuple[np.ndarray, np.ndarray]:
    """The moving image and labels: ``image`` / ``labels`` pulled through ``disp`` (linear / nearest)."""
    moving = warp_by_displacement(image, affine, affine, disp, order=1, cval=cval)
    moving_labels = warp_by_displacement(labels, affine, affine, disp, order=0, cval=0)
    return moving, moving_labels


def _load(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(path))
    return np.asarray(img.dataobj, dtype=np.float32), img.affine


def _labels(path: str | Path) -> np.ndarray:
    return np.rint(np.asarray(nib.load(str(path)).dataobj)).astype(np.int16)


def build_mni_pairs(out: Path, n: int, seed: int, source: str, spacing: float) -> list[Pair]:
    """``n`` pairs of ``gvsl.synth`` subjects (fixed 2k, moving 2k+1), all on the template's grid."""
    recs = make_subjects(out / "mni", 2 * n, seed=seed, source=source, spacing=spacing, cfg=SynthConfig())
    made = {"source": source, "spacing_mm": spacing, "seed": seed, "synth": SynthConfig().to_dict()}
    return [
        Pair("mni", f"mni{k}", f["image"], m["image"], f["labels"], m["labels"], MNI_LABELS, made)
        for k, (f, m) in enumerate(zip(recs[0::2], recs[1::2], strict=True))
    ]


def build_ct_pairs(out: Path, n: int, seed: int, data: Path, with_affine: bool) -> list[Pair]:
    """``n`` pairs of the chest CT (fixed, as stored) and a known deformation of it (moving).

    The moving CT is the fixed one pulled through a smooth random field
    (:data:`CT_FIELD`), with a random rigid offset (:data:`CT_AFFINE`) after it
    when ``with_affine``, plus Gaussian noise of :data:`CT_NOISE_HU` HU; voxels
    read from outside the scan are air (-1024 HU). Labels follow by nearest neighbour.
    """
    name = "ct_affine" if with_affine else "ct_deform"
    image, affine = _load(data / "slicerio_ctchest4.nii.gz")
    labels = _labels(data / "slicerio_ctchest4_seg.nii.gz")
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    fixed = str(save_nifti(folder / "fixed.nii.gz", image, affine))
    fixed_labels = str(save_nifti(folder / "fixed_labels.nii.gz", labels, affine))
    pairs = []
    for k in range(n):
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(int(with_affine), k)))
        disp = smooth_field(image.shape, affine, rng, **CT_FIELD)
        made: dict[str, Any] = {"field": CT_FIELD, "noise_hu": CT_NOISE_HU, "seed": seed}
        if with_affine:
            rotation, shift, rigid = random_rigid(rng, **CT_AFFINE)
            disp = compose_rigid(disp, affine, rotation, shift)
            made["rigid"] = rigid
        moving, moving_labels = deform_pair(image, labels, affine, disp, cval=CT_AIR_HU)
        moving += rng.normal(0.0, CT_NOISE_HU, moving.shape).astype(np.float32)
        det = jacobian_determinant(disp, affine)
        made["true_field"] = {"max_mm": float(np.sqrt((disp**2).sum(0)).max()), "jacobian_min": float(det.min())}
        pairs.append(
            Pair(
                name, f"{name}{k}", fixed,
                str(save_nifti(folder / f"moving{k}.nii.gz", moving, affine)), fixed_labels,
                str(save_nifti(folder / f"moving{k}_labels.nii.gz", moving_labels, affine)), CT_LABELS, made,
            )
        )  # fmt: skip
    return pairs


def head_and_brain_masks(image: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Label map of an axial head MR from thresholds: 1 = head outside the brain mask, 2 = brain mask.

    Head: voxels above 10 % of the 99th intensity percentile ``p99``, opened
    with a 3x3 in-plane square, holes filled slice by slice (the dark skull
    inside the scalp), the largest connected component. Brain (intracranial
    soft tissue): voxels between 15 % and 60 % of ``p99`` inside the head mask
    eroded by a 10 mm in-plane disc (drops scalp and skull), opened with a 5x5
    in-plane square, the largest component, holes filled slice by slice. Approximate on purpose (no skull
    stripping), but the same rule on both subjects.
    """
    p99 = float(np.percentile(image, 99))

    def largest(mask: np.ndarray) -> np.ndarray:
        lab, count = ndimage.label(mask)
        if count == 0:
            return mask
        return lab == (int(np.argmax(np.bincount(lab.ravel())[1:])) + 1)

    def fill_slices(mask: np.ndarray) -> np.ndarray:
        return np.stack([ndimage.binary_fill_holes(mask[..., z]) for z in range(mask.shape[2])], axis=-1)

    head = largest(fill_slices(ndimage.binary_opening(image > 0.1 * p99, np.ones((3, 3, 1), bool))))
    radius = max(1, int(round(10.0 / float(spacing[0]))))
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    disc = (xx**2 + yy**2 <= radius**2)[..., None]
    inner = ndimage.binary_erosion(head, disc)
    tissue = (image > 0.15 * p99) & (image < 0.6 * p99) & inner
    brain = fill_slices(largest(ndimage.binary_opening(tissue, np.ones((5, 5, 1), bool)))) & head
    out = np.zeros(image.shape, dtype=np.int16)
    out[head] = 1
    out[brain] = 2
    return out


def build_brain_pairs(out: Path, data: Path, n: int) -> list[Pair]:
    """The two real brain MRs onto each other (1 <- 2, then 2 <- 1), threshold masks as labels."""
    folder = out / "brain"
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for k in (1, 2):
        img = nib.load(str(data / f"pyradiomics_brain{k}_image.nii.gz"))
        arr = np.asarray(img.dataobj, dtype=np.float32)
        masks = head_and_brain_masks(arr, img.header.get_zooms())
        files[k] = (str(data / f"pyradiomics_brain{k}_image.nii.gz"),
                    str(save_nifti(folder / f"brain{k}_masks.nii.gz", masks, img.affine)))  # fmt: skip
    made = {"labels": "threshold masks, see head_and_brain_masks"}
    order = [(1, 2), (2, 1)][:n]
    return [
        Pair("brain", f"brain{f}<-{m}", files[f][0], files[m][0], files[f][1], files[m][1], BRAIN_LABELS, made)
        for f, m in order
    ]


# ----------------------------------------------------------------------------- scoring
def read_itk_displacement(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """An ITK displacement field NIfTI (LPS vectors, ``[X, Y, Z, 1, 3]`` or ``[X, Y, Z, 3]``)
    as RAS mm ``[3, X, Y, Z]`` and its affine."""
    img = nib.load(str(path))
    data = np.asarray(img.dataobj, dtype=np.float32)
    if data.ndim == 5:
        data = data[:, :, :, 0, :]
    if data.ndim != 4 or data.shape[-1] != 3:
        raise ValueError(f"{path}: not a 3-D displacement field (shape {data.shape})")
    ras = np.moveaxis(data, -1, 0).copy()
    ras[:2] *= -1.0
    return ras, img.affine


def _on_fixed_grid(data: np.ndarray, affine: np.ndarray, fixed_affine: np.ndarray, shape: tuple, order: int):
    if data.shape == tuple(shape) and np.allclose(affine, fixed_affine, atol=1e-3):
        return data
    return resample_to_grid(data, affine, fixed_affine, shape, order=order, mode="constant")


def score(pair: Pair, warped_path: str | Path, labels_path: str | Path, dvf_path: str | Path | None) -> dict[str, Any]:
    """Dice per region (+ mean), NCC and folding of one method's outputs on the fixed grid."""
    fixed, fixed_affine = _load(pair.fixed)
    fixed_labels = _labels(pair.fixed_labels)
    warped, warped_affine = _load(warped_path)
    warped = _on_fixed_grid(warped, warped_affine, fixed_affine, fixed.shape, 1)
    img = nib.load(str(labels_path))
    warped_labels = _on_fixed_grid(
        np.rint(np.asarray(img.dataobj)).astype(np.int16), img.affine, fixed_affine, fixed.shape, 0
    )
    out = region_dice(fixed_labels, warped_labels, pair.regions)
    out["ncc"] = ncc(fixed, warped)
    if dvf_path is not None:
        disp, disp_affine = read_itk_displacement(dvf_path)
        det = jacobian_determinant(disp, disp_affine)
        out["jacobian_min"], out["folding_percent"] = folding_stats(det)
    return out


def region_dice(fixed: np.ndarray, warped: np.ndarray, regions: dict[str, list[int]]) -> dict[str, float]:
    """``dice_<region>`` for every region (a set of label values) and ``dice_mean`` over them."""
    out = {f"dice_{name}": dice(np.isin(fixed, values), np.isin(warped, values)) for name, values in regions.items()}
    out["dice_mean"] = float(np.mean(list(out.values())))
    return out


def score_before(pair: Pair, work: Path) -> dict[str, Any]:
    """The identity: the moving image and labels read on the fixed grid through world coordinates."""
    fixed, fixed_affine = _load(pair.fixed)
    moving, moving_affine = _load(pair.moving)
    work.mkdir(parents=True, exist_ok=True)
    warped = warp_by_displacement(moving, moving_affine, fixed_affine, None, order=1, dst_shape=fixed.shape)
    labels = warp_by_displacement(_labels(pair.moving_labels), moving_affine, fixed_affine, None, order=0,
                                  dst_shape=fixed.shape)  # fmt: skip
    w = save_nifti(work / "warped.nii.gz", warped, fixed_affine)
    lab = save_nifti(work / "warped_labels.nii.gz", labels, fixed_affine)
    return {**score(pair, w, lab, None), "jacobian_min": 1.0, "folding_percent": 0.0}


# ----------------------------------------------------------------------------- running methods
def run_timed(cmd: list[str], log: Path, timeout: float | None = None) -> dict[str, Any]:
    """Run ``cmd`` in the folder of ``log`` (files a tool drops in its working directory land
    there) to completion (or kill its process group after ``timeout`` s); wall seconds,
    exit code, CPU seconds (user + system, all threads) and peak RSS (MiB) of that process alone
    (``wait4``); on a shared machine the CPU seconds move less with the load than the wall clock."""
    with open(log, "w", encoding="utf-8") as fh:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=log.parent, start_new_session=True)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if timeout is not None and time.perf_counter() - t0 > timeout:
                os.killpg(proc.pid, signal.SIGKILL)
                _, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
        seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    timed_out = timeout is not None and seconds > timeout
    return {"rc": proc.returncode, "process_seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "peak_rss_mib": usage.ru_maxrss / 1024.0, "timed_out": timed_out}  # fmt: skip


def gvsl_options(gvsl: str) -> set[str]:
    """The long options `gvsl register --help` lists (refinement flags appear when they land)."""
    text = subprocess.run([gvsl, "register", "--help"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "250", "NO_COLOR": "1"}).stdout  # fmt: skip
    return {tok.strip("│,[]") for tok in text.split() if tok.startswith("--")}


def gvsl_command(gvsl: str, pair: Pair, work: Path, method: str, model: str | None, threads: int) -> list[str]:
    cmd = [
        gvsl, "register", pair.fixed, pair.moving, "-o", str(work / "warped.nii.gz"),
        "--labels", pair.moving_labels, "--labels-out", str(work / "warped_labels.nii.gz"),
        "--dvf", str(work / "dvf.nii.gz"), "--metrics", str(work / "metrics.json"),
        "--threads", str(threads), "--quiet",
    ]  # fmt: skip
    if model:
        cmd += ["--model", model]
    if "--refine" in OPTIONS.get(gvsl, set()):
        cmd += GVSL_OPTIONS[method]
    return cmd


OPTIONS: dict[str, set[str]] = {}


def run_method(method: str, pair: Pair, work: Path, args: argparse.Namespace, repeats: int) -> dict[str, Any]:
    """Run one method on one pair ``repeats`` times; the figures of the last run, every run's timing."""
    work.mkdir(parents=True, exist_ok=True)
    runs = []
    for r in range(repeats):
        for stale in ("warped.nii.gz", "warped_labels.nii.gz", "dvf.nii.gz", "result.json", "metrics.json"):
            (work / stale).unlink(missing_ok=True)
        if method in GVSL_METHODS:
            cmd = gvsl_command(args.gvsl, pair, work, method, args.model, args.threads)
        else:
            cmd = [args.peers_python, str(ROOT / "benchmarks" / "peer_register.py"), method, pair.fixed,
                   pair.moving, pair.moving_labels, str(work), "--threads", str(args.threads)]  # fmt: skip
        run = run_timed(cmd, work / f"log{r}.txt", None if method in GVSL_METHODS else args.peer_timeout)
        if run["timed_out"]:
            return {"error": f"timed out after {args.peer_timeout:.0f} s", "command": cmd}
        if run["rc"] != 0:
            tail = (work / f"log{r}.txt").read_text(encoding="utf-8", errors="replace").strip().splitlines()[-3:]
            return {"error": f"exit {run['rc']}: " + " | ".join(tail), "command": cmd}
        if method in GVSL_METHODS:
            run["seconds"] = run["process_seconds"]
            metrics = json.loads((work / "metrics.json").read_text(encoding="utf-8"))
            run["gvsl_metrics"] = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}
        else:
            result = json.loads((work / "result.json").read_text(encoding="utf-8"))
            run["seconds"] = result.pop("seconds")
            run["peer"] = result
        runs.append(run)
    row = score(pair, work / "warped.nii.gz", work / "warped_labels.nii.gz", work / "dvf.nii.gz")
    row["seconds"] = statistics.median(r["seconds"] for r in runs)
    row["process_seconds"] = statistics.median(r["process_seconds"] for r in runs)
    row["cpu_seconds"] = statistics.median(r["cpu_seconds"] for r in runs)
    row["peak_rss_mib"] = max(r["peak_rss_mib"] for r in runs)
    row["runs"] = runs
    row["command"] = cmd
    return row


def peer_versions(python: str) -> dict[str, str | None]:
    """Versions of the peer libraries in the peers' venv."""
    names = ("antspyx", "itk-elastix", "itk", "fireants", "torch", "SimpleITK", "numpy")
    code = (
        "import json\nfrom importlib import metadata as m\nout = {}\n"
        f"for d in {names!r}:\n"
        "    try: out[d] = m.version(d)\n"
        "    except m.PackageNotFoundError: out[d] = None\n"
        "print(json.dumps(out))"
    )
    res = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120)
    return json.loads(res.stdout) if res.returncode == 0 else {}


# ----------------------------------------------------------------------------- tables
def _fmt(values: list[float | None], digits: int = 4) -> str:
    a = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if a.size == 0:
        return "n/a"
    return f"{a.mean():.{digits}f} ± {a.std():.{digits}f}" if a.size > 1 else f"{a.mean():.{digits}f}"


def set_table(
    rows: list[dict[str, Any]], set_name: str, regions: dict[str, list[int]], methods: list[str]
) -> list[str]:
    """Markdown table of one pair set: mean (± std over pairs) per method."""
    dice_keys = [f"dice_{r}" for r in regions] + ["dice_mean"]
    head = ["method", "pairs", *[k.removeprefix("dice_") + " Dice" for k in dice_keys], "NCC", "folding %",
            "s / pair", "process s", "CPU s", "peak RSS MiB"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in ["before", *methods]:
        rs = [r for r in rows if r["set"] == set_name and r["method"] == m and "error" not in r]
        errors = [r for r in rows if r["set"] == set_name and r["method"] == m and "error" in r]
        if not rs:
            why = f"failed: {errors[0]['error'].split(' | ')[-1][:100]}" if errors else "skipped"
            lines.append(f"| {METHOD_NAMES[m]} | 0 | " + " | ".join([why] + [""] * (len(head) - 3)) + " |")
            continue
        cells = [_fmt([r[k] for r in rs]) for k in dice_keys]
        cells += [_fmt([r["ncc"] for r in rs]), _fmt([r["folding_percent"] for r in rs], 3)]
        if m == "before":
            cells += ["", "", "", ""]
        else:
            cells += [
                _fmt([r["seconds"] for r in rs], 2),
                _fmt([r["process_seconds"] for r in rs], 2),
                _fmt([r.get("cpu_seconds") for r in rs], 1),
                f"{max(r['peak_rss_mib'] for r in rs):.0f}",
            ]
        lines.append(f"| {METHOD_NAMES[m]} | {len(rs)}{'' if not errors else f' ({len(errors)} failed)'} | "
                     + " | ".join(cells) + " |")  # fmt: skip
    return lines


# ----------------------------------------------------------------------------- main
def _default_gvsl() -> str:
    here = Path(sys.executable).with_name("gvsl")
    return str(here) if here.is_file() else (shutil.which("gvsl") or "gvsl")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--out", required=True, type=Path)
    ap.add_argument("--model", default=None, help="gvsl export folder (default: the model shipped with gvsl)")
    ap.add_argument("--sets", default=",".join(SETS), help=f"comma-separated subset of {', '.join(SETS)}")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {', '.join(METHODS)}")
    ap.add_argument("--pairs", type=int, default=None, help="pairs in every set (brain: at most 2)")
    ap.add_argument("--mni-pairs", type=int, default=1)
    ap.add_argument("--ct-pairs", type=int, default=1, help="pairs in each CT set")
    ap.add_argument("--brain-pairs", type=int, default=1, choices=(1, 2), help="1: brain1 <- brain2; 2: both ways")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 pair per set, 1 repeat")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each gvsl command (median seconds)")
    ap.add_argument("--peer-repeats", type=int, default=1, help="runs of each peer (median seconds)")
    ap.add_argument("--peer-timeout", type=float, default=900.0, help="seconds before a peer run is stopped")
    ap.add_argument("--resume", action="store_true",
                    help="keep the rows of OUT/registration.json that succeeded; run the missing ones")  # fmt: skip
    ap.add_argument("--import-rows", type=Path, action="append", default=[],
                    help="registration.json of another run with the same pairs (seed, counts): its successful rows "
                    "count as done (repeatable; e.g. gvsl and peers run side by side into two folders)")  # fmt: skip
    ap.add_argument("--tables-only", action="store_true",
                    help="run nothing: tables of the --resume / --import-rows rows (failures included)")  # fmt: skip
    ap.add_argument("--spacing", type=float, default=2.0, help="MNI subjects' spacing (mm)")
    ap.add_argument("--seed", type=int, default=1000, help="pairs' seed (the default model trained on seed 0)")
    ap.add_argument("--source", default="mni", help="MNI template: mni (nilearn, 1 mm) or sample (bundled 2 mm)")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data",
                    help="folder with slicerio_ctchest4*.nii.gz and pyradiomics_brain*_image.nii.gz")  # fmt: skip
    ap.add_argument("--gvsl", default=_default_gvsl(), help="the gvsl executable (default: beside this python)")
    ap.add_argument("--peers-python", default=os.environ.get("GVSL_PEERS_PYTHON"),
                    help="python of the peers' venv (antspyx, itk-elastix, fireants); $GVSL_PEERS_PYTHON")  # fmt: skip
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    sets = [s for s in args.sets.split(",") if s]
    methods = [m for m in args.methods.split(",") if m]
    for s in sets:
        if s not in SETS:
            ap.error(f"--sets: unknown set {s!r}; choose from {', '.join(SETS)}")
    for m in methods:
        if m not in METHODS:
            ap.error(f"--methods: unknown method {m!r}; choose from {', '.join(METHODS)}")
    if args.pairs is not None:
        args.mni_pairs = args.ct_pairs = args.pairs
        args.brain_pairs = min(2, args.pairs)
    if args.quick:
        args.mni_pairs = args.ct_pairs = args.brain_pairs = 1
        args.repeats = args.peer_repeats = 1
    out: Path = args.out.resolve()  # methods run in their own work folders: absolute paths
    args.data = args.data.resolve()
    # abspath, not resolve: a venv's python is a symlink whose target is not the venv
    args.model = os.path.abspath(args.model) if args.model else None
    args.peers_python = os.path.abspath(args.peers_python) if args.peers_python else None
    args.gvsl = os.path.abspath(args.gvsl) if os.sep in args.gvsl else args.gvsl
    out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    if set(methods) & set(GVSL_METHODS):
        OPTIONS[args.gvsl] = gvsl_options(args.gvsl)
        if "--refine" not in OPTIONS[args.gvsl]:
            for refining in ("gvsl_refine", "gvsl_fast"):
                if refining in methods:
                    methods.remove(refining)
                    notes.append(f"{refining} skipped: this `gvsl register` has no --refine option yet")
            notes.append("gvsl row: the plain `gvsl register` (no --refine option: the network alone)")
        if "gvsl_nonet" in methods and "--no-network" not in OPTIONS[args.gvsl]:
            methods.remove("gvsl_nonet")
            notes.append("gvsl_nonet skipped: this `gvsl register` has no --no-network option yet")
    if set(methods) & set(PEER_METHODS):
        if not args.peers_python or not Path(args.peers_python).is_file():
            notes.append(f"peers skipped: --peers-python {args.peers_python!r} is not a python (EVALUATION.md)")
            methods = [m for m in methods if m not in PEER_METHODS]
    data_sets = {"ct_deform", "ct_affine", "brain"} & set(sets)
    if data_sets and not (args.data / "slicerio_ctchest4.nii.gz").is_file():
        notes.append(f"{', '.join(sorted(data_sets))} skipped: no real volumes in --data {args.data}")
        sets = [s for s in sets if s not in data_sets]
    for n in notes:
        print(n, file=sys.stderr)
    made = out / "pairs"
    pairs: list[Pair] = []
    if "mni" in sets:
        pairs += build_mni_pairs(made, args.mni_pairs, args.seed, args.source, args.spacing)
    if "ct_deform" in sets:
        pairs += build_ct_pairs(made, args.ct_pairs, args.seed, args.data, with_affine=False)
    if "ct_affine" in sets:
        pairs += build_ct_pairs(made, args.ct_pairs, args.seed, args.data, with_affine=True)
    if "brain" in sets:
        pairs += build_brain_pairs(made, args.data, args.brain_pairs)
    rows: list[dict[str, Any]] = []
    earlier: list[dict[str, Any]] = []
    if args.resume and (out / "registration.json").is_file():
        earlier = json.loads((out / "registration.json").read_text(encoding="utf-8"))["rows"]
    for other in args.import_rows:
        earlier += [r for r in json.loads(other.read_text(encoding="utf-8"))["rows"] if r["method"] != "before"]
    done = {
        (r["pair"], r["method"]): r
        for r in earlier
        if ("error" not in r or args.tables_only) and r["method"] != "before"
    }
    started = time.time()
    result = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime(started)),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "model": args.model or str(default_model_dir()),
        "gvsl": args.gvsl,
        "gvsl_register_options": sorted(OPTIONS.get(args.gvsl, set())),
        "peer_versions": peer_versions(args.peers_python)
        if args.peers_python and Path(args.peers_python).is_file()
        else {},
        "threads": args.threads,
        "notes": notes,
        "pairs": [p._asdict() for p in pairs],
        "rows": rows,
    }
    all_methods = [m for m in METHODS if m in methods or any(r["method"] == m for r in done.values())]

    def write() -> str:
        tables = {}
        for s in sets:
            regions = next(p.regions for p in pairs if p.set == s)
            tables[s] = set_table(rows, s, regions, all_methods)
        md = []
        for s, lines in tables.items():
            md += [f"### {s}", "", *lines, ""]
        result["tables"] = tables
        result["wall_seconds"] = time.time() - started
        (out / "registration.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        (out / "registration.md").write_text("\n".join(md) + "\n", encoding="utf-8")
        return "\n".join(md)

    for pair in pairs:
        safe = pair.name.replace("<-", "_from_")
        before = score_before(pair, out / "work" / safe / "before")
        rows.append({"set": pair.set, "pair": pair.name, "method": "before", **before})
        for m in all_methods:
            if (pair.name, m) in done:
                rows.append(done[(pair.name, m)])
                continue
            if m not in methods or args.tables_only:
                continue
            repeats = args.repeats if m in GVSL_METHODS else args.peer_repeats
            stamp = {"started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
                     "load_average": [round(v, 2) for v in os.getloadavg()]}  # fmt: skip
            row = {"set": pair.set, "pair": pair.name, "method": m, **stamp,
                   **run_method(m, pair, out / "work" / safe / m, args, repeats)}  # fmt: skip
            rows.append(row)
            brief = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                     if k not in ("runs", "command")}  # fmt: skip
            print(json.dumps(brief), file=sys.stderr, flush=True)
            write()
    print(write())
    return result


if __name__ == "__main__":
    main()
