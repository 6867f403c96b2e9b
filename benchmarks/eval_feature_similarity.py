"""CT <-> MR registration: refinement on intensities (local CC) against refinement on the
encoder's dense features, with ANTs SyN (Mattes mutual information) beside them.

The question this answers (issue #11, ``--similarity features``): when the two scans
are of different modalities, intensity local CC has nothing to match; does the same
greedy diffeomorphic ascent (:mod:`gvsl.refine`) on the default encoder's dense
features [16 channels] do better?

Pairs: the generator's cross-modal pairs (:meth:`gvsl.generator.SynthGenerator.draw_cross_modal_pair`)
of the MNI brain label map (recipe ``default``, MNI source only, 2 mm, 96^3, the
recipe's artefacts), seeds ``--seed`` + k: fixed = the MR-like draw, moving = the
CT-like draw of the same anatomy under another deformation. The default model was
trained on deformed copies of the same template in MR, so the anatomy is not new to
it, the CT appearance and these draws are. Dice of CSF, grey and white matter.

Methods, on the same files:

* ``before``: the identity;
* ``ncc`` / ``features``: the ascent on the model grid (4 mm, both inputs
  preprocessed as the runtime does, each with its own modality), from the identity,
  ``--iterations`` steps; ``features`` sums the local-CC force over the 16 feature
  channels (each channel scaled to [0, 1] over the pair);
* ``register``: ``gvsl register --modality mr,ct`` as a user runs it (network + default
  refinement; ``--similarity auto`` takes mutual information, ``refine_mi.onnx``, for two
  modalities); ``register_ncc``: the same with ``--similarity ncc`` (local CC, the default
  before mutual information existed); ``register_nonet``: the default with ``--no-network``;
* ``ants``: ANTs SyN with its defaults (Mattes MI for affine and SyN), through
  ``benchmarks/peer_register.py`` in the peers' venv.

    python benchmarks/eval_feature_similarity.py -o OUT [--pairs 3] [--peers-python PY]

Writes ``OUT/feature_similarity.json`` and prints a Markdown table (mean Dice per
method, seconds of the refinement alone or of the whole command).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from gvsl.generator import SynthGenerator, load_recipe
from gvsl.refine import (
    RefineSettings,
    advance,
    cc_force,
    refine_constants,
    sample_clamped,
)
from gvsl.runtime.default_model import default_model_dir
from gvsl.runtime.embed import Embedder
from gvsl.runtime.geometry import dvf_voxel_to_mm
from gvsl.runtime.metrics import dice
from gvsl.runtime.preprocess import save_nifti
from gvsl.runtime.warp import resample_to_grid, warp_by_displacement

ROOT = Path(__file__).resolve().parent.parent
REGIONS = {"csf": 1, "gm": 2, "wm": 3}
#: the fixed and the moving image's modality
MODALITIES = ("mr", "ct")


def make_pairs(out: Path, count: int, seed: int) -> list[dict[str, str]]:
    """``count`` MR (fixed) / CT (moving) pairs of the MNI brain label map, written as NIfTI."""
    recipe = load_recipe("default")
    recipe["sources"] = [s for s in recipe["sources"] if s["kind"] == "mni"]
    gen = SynthGenerator(recipe, spacing=2.0)
    pairs = []
    for k in range(count):
        mr, ct = gen.draw_cross_modal_pair(np.random.default_rng(seed + k))
        names = {}
        for role, draw in (("fixed", mr), ("moving", ct)):
            image = out / f"pair{k}_{role}_{draw.modality}.nii.gz"
            labels = out / f"pair{k}_{role}_seg.nii.gz"
            save_nifti(image, draw.image, draw.affine)
            save_nifti(labels, draw.labels.astype(np.int16), draw.affine)
            names[role], names[f"{role}_labels"] = str(image), str(labels)
        pairs.append(names)
    return pairs


def scores(warped_labels: np.ndarray, fixed_labels: np.ndarray) -> dict[str, float]:
    out = {name: dice(warped_labels == v, fixed_labels == v) for name, v in REGIONS.items()}
    out["mean"] = float(np.mean(list(out.values())))
    return out


def ascent(fixed: np.ndarray, moving: np.ndarray, iterations: int, step: float, regularisation: float) -> np.ndarray:
    """The greedy ascent of :mod:`gvsl.refine` on ``[C, D, H, W]`` images, the local-CC force
    summed over channels; returns the voxel field ``[3, D, H, W]``."""
    settings = RefineSettings()
    f = torch.from_numpy(np.ascontiguousarray(fixed, np.float32))[:, None]  # channels as batch
    m = torch.from_numpy(np.ascontiguousarray(moving, np.float32))[None]
    level = refine_constants(f, settings)
    level = level._replace(update_norm=level.update_norm[:1], total_norm=level.total_norm[:1])
    dvf = torch.zeros(1, 3, *f.shape[2:])
    step_t, reg_t, reference = torch.tensor([step]), torch.tensor([regularisation]), torch.ones(1)
    with torch.no_grad():
        for k in range(iterations):
            warped = sample_clamped(m, level.grid + dvf).transpose(0, 1)  # [C, 1, ...]
            force = cc_force(f, warped, moments=level.moments, window=level.window).sum(dim=0, keepdim=True)
            dvf, reference = advance(dvf, force, step_t, reg_t, torch.tensor(k), reference, level)
    return dvf[0].numpy()


def unit_channels(fixed: np.ndarray, moving: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each channel scaled to [0, 1] over both volumes (the CC force's variance floor is set for
    such images)."""
    both = np.concatenate([fixed.reshape(len(fixed), -1), moving.reshape(len(moving), -1)], axis=1)
    lo, hi = both.min(axis=1), both.max(axis=1)
    scale = np.where(hi > lo, hi - lo, 1.0)
    shape = (-1, 1, 1, 1)
    return (fixed - lo.reshape(shape)) / scale.reshape(shape), (moving - lo.reshape(shape)) / scale.reshape(shape)


def warp_labels(field: np.ndarray, model_affine: np.ndarray, labels_path: str) -> np.ndarray:
    """The moving labels pulled onto their own (= the fixed) 2 mm grid through a voxel field of
    the model grid."""
    img = nib.load(labels_path)
    labels = np.asarray(img.dataobj)
    disp_mm = dvf_voxel_to_mm(field, model_affine)
    on_grid = resample_to_grid(disp_mm, model_affine, img.affine, labels.shape, order=1, mode="nearest")
    return warp_by_displacement(labels, img.affine, img.affine, on_grid, order=0)


def run_refinements(
    pair: dict[str, str], iterations: int, step: float, regularisation: float
) -> dict[str, dict[str, Any]]:
    prepared = {}
    for role, modality in zip(("fixed", "moving"), MODALITIES, strict=True):
        # the synthetic head CT has no bone, so auto cannot call it CT: each role's own is named
        embedder = Embedder(default_model_dir(), "onnxruntime", "cpu", modality=modality)
        vol, pre = embedder.prepare(pair[role])
        emb = embedder.embed_prepared(vol, pre, dense=True, grid="model")
        prepared[role] = (pre, emb.features)
        embedder.close()
    (pre_f, feat_f), (pre_m, feat_m) = prepared["fixed"], prepared["moving"]
    if pre_f.data.shape != pre_m.data.shape or not np.allclose(pre_f.affine, pre_m.affine):
        raise SystemExit(f"{pair['moving']}: its model grid is not the fixed one's; the pairs share a grid")
    fixed_labels = np.asarray(nib.load(pair["fixed_labels"]).dataobj)
    rows: dict[str, dict[str, Any]] = {}
    inputs = {
        "ncc": (pre_f.data[None], pre_m.data[None]),
        "features": unit_channels(feat_f, feat_m),
    }
    for method, (fixed, moving) in inputs.items():
        t0 = time.perf_counter()
        field = ascent(fixed, moving, iterations, step, regularisation)
        seconds = time.perf_counter() - t0
        rows[method] = {**scores(warp_labels(field, pre_f.affine, pair["moving_labels"]), fixed_labels),
                        "seconds": seconds}  # fmt: skip
    return rows


#: the ``gvsl register`` runs compared, and their extra options
REGISTER_RUNS = {
    "register": [],
    "register_ncc": ["--similarity", "ncc"],
    "register_nonet": ["--no-network"],
}


def run_register(pair: dict[str, str], out: Path, name: str = "register") -> dict[str, Any]:
    gvsl = Path(sys.executable).with_name("gvsl")
    warped_labels = out / f"{name}_labels.nii.gz"
    cmd = [str(gvsl), "register", pair["fixed"], pair["moving"], "-o", str(out / f"{name}.nii.gz"),
           "--labels", pair["moving_labels"], "--labels-out", str(warped_labels), "--modality", ",".join(MODALITIES),
           "--quiet", *REGISTER_RUNS[name]]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    seconds = time.perf_counter() - t0
    fixed_labels = np.asarray(nib.load(pair["fixed_labels"]).dataobj)
    return {**scores(np.asarray(nib.load(str(warped_labels)).dataobj), fixed_labels), "seconds": seconds}


def run_ants(pair: dict[str, str], out: Path, python: str) -> dict[str, Any]:
    folder = out / "ants"
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [python, str(ROOT / "benchmarks" / "peer_register.py"), "ants", pair["fixed"], pair["moving"],
           pair["moving_labels"], str(folder)]  # fmt: skip
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    result = json.loads((folder / "result.json").read_text())
    fixed_labels = np.asarray(nib.load(pair["fixed_labels"]).dataobj)
    warped = np.asarray(nib.load(str(folder / "warped_labels.nii.gz")).dataobj)
    return {**scores(warped, fixed_labels), "seconds": result["seconds"]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--out", type=Path, required=True)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=3000, help="first pair's seed (the default model trained on seed 0)")
    ap.add_argument("--iterations", type=int, default=40)
    ap.add_argument("--step", type=float, default=0.5)
    ap.add_argument("--regularisation", type=float, default=0.3)
    ap.add_argument("--peers-python", default=os.environ.get("GVSL_PEERS_PYTHON"),
                    help="python of the peers' venv (antspyx); without it ANTs is left out")  # fmt: skip
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    pairs = make_pairs(args.out, args.pairs, args.seed)
    results: list[dict[str, Any]] = []
    for k, pair in enumerate(pairs):
        fixed_labels = np.asarray(nib.load(pair["fixed_labels"]).dataobj)
        moving_labels = np.asarray(nib.load(pair["moving_labels"]).dataobj)
        row: dict[str, Any] = {"pair": k, "before": scores(moving_labels, fixed_labels)}
        row.update(run_refinements(pair, args.iterations, args.step, args.regularisation))
        for name in REGISTER_RUNS:
            row[name] = run_register(pair, args.out / f"pair{k}", name)
        if args.peers_python:
            row["ants"] = run_ants(pair, args.out / f"pair{k}", args.peers_python)
        results.append(row)
        print(json.dumps(row), flush=True)
    payload = {"settings": vars(args) | {"out": str(args.out)}, "pairs": pairs, "results": results}
    (args.out / "feature_similarity.json").write_text(json.dumps(payload, indent=2))
    methods = [m for m in ("before", "ncc", "features", *REGISTER_RUNS, "ants") if m in results[0]]
    print("\n| method | " + " | ".join(["csf", "gm", "wm", "mean", "seconds"]) + " |")
    print("|---" * 6 + "|")
    for m in methods:
        cells = [f"{np.mean([r[m][key] for r in results]):.3f}" for key in ("csf", "gm", "wm", "mean")]
        secs = f"{np.median([r[m]['seconds'] for r in results]):.1f}" if m != "before" else "-"
        print(f"| {m} | " + " | ".join(cells) + f" | {secs} |")


if __name__ == "__main__":
    main()
