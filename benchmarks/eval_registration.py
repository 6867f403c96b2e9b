"""Registration benchmark: a GVSL model vs ANTs SyN and elastix on pairs with known anatomy.

Pairs of synthetic subjects are made from the MNI ICBM152 2009a T1 with
``gvsl.synth`` (random affine + smooth elastic deformation + MR-like intensity
changes; seeds disjoint from the default model's training subjects), each
with grey/white-matter labels. For every pair (fixed = subject 2k, moving =
subject 2k+1) and every method we measure, on the fixed grid:

* grey- and white-matter Dice of the warped moving labels (nearest neighbour)
  against the fixed labels, before (identity: all subjects share one grid)
  and after registration;
* global NCC (Pearson r of MR-normalised intensities, the runtime's figure)
  before and after;
* folding: % of voxels whose Jacobian determinant is <= 0 (GVSL and elastix:
  of the full transform; ANTs: of the SyN warp, the affine part having a
  positive constant determinant);
* seconds per pair (wall clock, this machine, threads as set by --threads).

ANTs (``antspyx``) and elastix (``itk-elastix``) are benchmark-only peers
(``pip install 'gvsl[eval]'``); a peer that is not installed is reported as
such and skipped. Results: ``OUT/registration.json`` (per pair) and
``OUT/registration.md`` (mean ± std table).

    python benchmarks/eval_registration.py -o runs/eval_reg --pairs 4 [--model EXPORT] [--methods gvsl,ants,elastix]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from gvsl.runtime.metrics import dice, folding_stats, jacobian_determinant, ncc
from gvsl.runtime.preprocess import PreprocessConfig, normalize_intensity
from gvsl.runtime.warp import warp_by_displacement
from gvsl.synth import SynthConfig, make_subjects

METHODS = ("gvsl", "ants", "elastix")
MR = PreprocessConfig(spacing=None, modality="mr")


def _load(path: str) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(path)
    return np.asarray(img.dataobj, dtype=np.float32), img.affine


def _scores(fixed: np.ndarray, fixed_lab: np.ndarray, warped: np.ndarray, warped_lab: np.ndarray) -> dict[str, float]:
    return {
        "ncc": ncc(normalize_intensity(fixed, MR), normalize_intensity(warped, MR)),
        "dice_gm": dice(fixed_lab == 1, warped_lab == 1),
        "dice_wm": dice(fixed_lab == 2, warped_lab == 2),
    }


def run_gvsl(reg: Any, fixed: str, moving: str, moving_lab: str, tmp: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    res = reg.register(fixed, moving, labels=[moving_lab])
    seconds = time.perf_counter() - t0
    det = jacobian_determinant(res.dvf_mm, res.affine)
    return {"warped": res.warped, "labels": res.labels[0], "det": det, "seconds": seconds}


def run_ants(fixed: str, moving: str, moving_lab: str, tmp: Path) -> dict[str, Any]:
    import ants

    f, m, lab = ants.image_read(fixed), ants.image_read(moving), ants.image_read(moving_lab)
    t0 = time.perf_counter()
    tx = ants.registration(fixed=f, moving=m, type_of_transform="SyN", outprefix=str(tmp / "ants_"))
    seconds = time.perf_counter() - t0
    warped_lab = ants.apply_transforms(f, lab, tx["fwdtransforms"], interpolator="nearestNeighbor")
    ants.image_write(tx["warpedmovout"], str(tmp / "ants_warped.nii.gz"))
    ants.image_write(warped_lab, str(tmp / "ants_labels.nii.gz"))
    warp = [t for t in tx["fwdtransforms"] if t.endswith((".nii.gz", ".nii"))]
    det = None
    if warp:
        jac = ants.create_jacobian_determinant_image(f, warp[0], do_log=False)
        ants.image_write(jac, str(tmp / "ants_jac.nii.gz"))
        det = _load(str(tmp / "ants_jac.nii.gz"))[0]
    return {
        "warped": _load(str(tmp / "ants_warped.nii.gz"))[0],
        "labels": np.rint(_load(str(tmp / "ants_labels.nii.gz"))[0]).astype(np.int64),
        "det": det,
        "seconds": seconds,
    }


def run_elastix(fixed: str, moving: str, moving_lab: str, tmp: Path) -> dict[str, Any]:
    import itk

    f, m = itk.imread(fixed, itk.F), itk.imread(moving, itk.F)
    params = itk.ParameterObject.New()
    params.AddParameterMap(params.GetDefaultParameterMap("affine"))
    params.AddParameterMap(params.GetDefaultParameterMap("bspline"))
    t0 = time.perf_counter()
    warped, tp = itk.elastix_registration_method(f, m, parameter_object=params, log_to_console=False)
    seconds = time.perf_counter() - t0
    itk.imwrite(warped, str(tmp / "elastix_warped.nii.gz"))
    for i in range(tp.GetNumberOfParameterMaps()):
        tp.SetParameter(i, "FinalBSplineInterpolationOrder", "0")
        tp.SetParameter(i, "ResultImagePixelType", "float")
    lab = itk.imread(moving_lab, itk.F)
    itk.imwrite(itk.transformix_filter(lab, tp), str(tmp / "elastix_labels.nii.gz"))
    _, det_img = itk.transformix_jacobian(m, tp)
    itk.imwrite(det_img, str(tmp / "elastix_jac.nii.gz"))
    return {
        "warped": _load(str(tmp / "elastix_warped.nii.gz"))[0],
        "labels": np.rint(_load(str(tmp / "elastix_labels.nii.gz"))[0]).astype(np.int64),
        "det": _load(str(tmp / "elastix_jac.nii.gz"))[0],
        "seconds": seconds,
    }


def _available(method: str) -> str | None:
    """None when the peer can run, else why not."""
    mod = {"ants": "ants", "elastix": "itk"}.get(method)
    if mod is None:
        return None
    try:
        m = __import__(mod)
        if method == "elastix" and not hasattr(m, "elastix_registration_method"):
            return "itk is installed without itk-elastix"
    except ImportError as e:
        return f"not installed ({e}); pip install 'gvsl[eval]'"
    return None


def _mean_std(values: list[float]) -> str:
    a = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if a.size == 0:
        return "n/a"
    return f"{a.mean():.4f} ± {a.std():.4f}" if a.size > 1 else f"{a.mean():.4f}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--out", required=True, type=Path)
    ap.add_argument("--model", default=None, help="export folder (default: the model shipped with gvsl)")
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--spacing", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=1000, help="subjects' seed (the default model trained on seed 0)")
    ap.add_argument("--source", default="mni", help="mni (nilearn) or sample (bundled 2 mm copy)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", str(args.threads))
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in METHODS:
            ap.error(f"--methods: unknown method {m!r}; choose from {', '.join(METHODS)}")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    recs = make_subjects(
        out / "subjects", 2 * args.pairs, seed=args.seed, source=args.source, spacing=args.spacing, cfg=SynthConfig()
    )
    skipped = {m: why for m in methods if (why := _available(m))}
    for m, why in skipped.items():
        print(f"{m}: skipped, {why}", file=sys.stderr)
    reg = None
    model_desc = None
    if "gvsl" in methods:
        from gvsl.runtime.default_model import resolve_model
        from gvsl.runtime.register import Registrar

        model = resolve_model(args.model)
        model_desc = str(model)
        reg = Registrar(model, "onnxruntime", "cpu", threads=args.threads)
    runners = {"gvsl": lambda *a: run_gvsl(reg, *a), "ants": run_ants, "elastix": run_elastix}
    rows: list[dict[str, Any]] = []
    for k in range(args.pairs):
        fx, mv = recs[2 * k], recs[2 * k + 1]
        fixed, fixed_aff = _load(fx["image"])
        fixed_lab = np.rint(_load(fx["labels"])[0]).astype(np.int64)
        moving, moving_aff = _load(mv["image"])
        moving_lab = np.rint(_load(mv["labels"])[0]).astype(np.int64)
        before_lab = warp_by_displacement(moving_lab, moving_aff, fixed_aff, None, order=0, dst_shape=fixed.shape)
        before_img = warp_by_displacement(moving, moving_aff, fixed_aff, None, order=1, dst_shape=fixed.shape)
        before = _scores(fixed, fixed_lab, before_img, before_lab)
        for m in methods:
            if m in skipped:
                continue
            tmp = out / "work" / f"pair{k}_{m}"
            tmp.mkdir(parents=True, exist_ok=True)
            r = runners[m](fx["image"], mv["image"], mv["labels"], tmp)
            after = _scores(fixed, fixed_lab, r["warped"], r["labels"])
            fold = folding_stats(r["det"])[1] if r["det"] is not None else None
            row = {
                "pair": k,
                "method": m,
                **{f"{key}_before": v for key, v in before.items()},
                **{f"{key}_after": v for key, v in after.items()},
                "folding_percent": fold,
                "jacobian_min": float(r["det"].min()) if r["det"] is not None else None,
                "seconds": r["seconds"],
            }
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    if reg is not None:
        reg.close()
    keys = [
        "ncc_before",
        "ncc_after",
        "dice_gm_before",
        "dice_gm_after",
        "dice_wm_before",
        "dice_wm_after",
        "folding_percent",
        "seconds",
    ]
    table = ["| method | pairs | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
    for m in methods:
        rs = [r for r in rows if r["method"] == m]
        if not rs:
            table.append(f"| {m} | 0 | " + " | ".join(["skipped"] * len(keys)) + " |")
            continue
        table.append(f"| {m} | {len(rs)} | " + " | ".join(_mean_std([r[k] for r in rs]) for k in keys) + " |")
    result = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "model": model_desc,
        "pairs": args.pairs,
        "spacing": args.spacing,
        "seed": args.seed,
        "threads": args.threads,
        "skipped": skipped,
        "rows": rows,
        "table": table,
    }
    (out / "registration.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (out / "registration.md").write_text("\n".join(table) + "\n", encoding="utf-8")
    print("\n".join(table))
    return result


if __name__ == "__main__":
    main()
