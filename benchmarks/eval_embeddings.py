"""Do embeddings tell scans apart? Same-subject retrieval and cosine margin, raw vs standardised.

Subjects: the bundled MNI T1 sample (gvsl/assets/sample), the real volumes under
``--data`` (default /work/shared/data: pyradiomics_brain1/2 MR, slicerio_ctchest4 CT) and
``--synthetic`` held-out draws of the training generator (seed ``--seed + 1000``, so none is
a draw the statistics saw). Each subject is seen as ``--views`` views: the scan itself and
perturbations of it -- gain/offset, Gaussian noise, a small rotation, a field-of-view shift
(cropping one side) -- each applied to the voxels the runtime reads (the input's own grid).

For every view, the nearest other view by cosine is retrieved; top-1 is right when it is a
view of the same subject. The margin is the mean cosine of same-subject pairs minus the mean
of different-subject pairs. Read-outs compared:

* ``raw``: the pooled bottleneck (the embedding before this change);
* ``standardised``: ``(raw - mean) / std`` with statistics over ``--stats-n`` synthetic draws
  of ``--recipe`` (:func:`gvsl.embedding_stats.gather_embedding_stats`), or the model's own
  block with ``--model-stats``;
* ``multiscale``: the standardised bottleneck concatenated with the standardised mean of the
  dense (full-resolution) features, both scales' statistics from the same draws.

Usage (the numbers in EVALUATION.md, "Embeddings")::

    python benchmarks/eval_embeddings.py --model gvsl/assets/default --stats-n 128 --synthetic 4
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

import gvsl.torch_backend  # noqa: F401 - registers the torch backend for model folders
from gvsl.embedding_stats import gather_embedding_stats, synthetic_volumes
from gvsl.runtime.embed import Embedder, EmbeddingStats, embedding_stats_of
from gvsl.runtime.io import read_volume

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "gvsl" / "assets" / "sample" / "mni152_2009a_t1_2mm.nii.gz"
REAL = ("pyradiomics_brain1_image.nii.gz", "pyradiomics_brain2_image.nii.gz", "slicerio_ctchest4.nii.gz")
PERTURBATIONS = ("original", "gain_offset", "noise", "rotation", "fov_shift")


def perturb(data: np.ndarray, affine: np.ndarray, kind: str, ct: bool, rng: np.random.Generator):
    """One view of a scan: ``(array, affine)`` on the scan's own grid (fov_shift crops it)."""
    data = np.asarray(data, dtype=np.float32)
    lo, hi = np.percentile(data, [1, 99])
    if kind == "original":
        return data, affine
    if kind == "gain_offset":  # a scanner's calibration: MR any gain, CT a few % and HU
        gain = rng.uniform(1.02, 1.08) if ct else rng.uniform(0.7, 1.4)
        offset = rng.uniform(-30, 30) if ct else rng.uniform(-0.05, 0.05) * (hi - lo)
        return data * np.float32(gain) + np.float32(offset), affine
    if kind == "noise":
        sigma = 0.03 * (hi - lo)
        return data + np.float32(sigma) * rng.standard_normal(data.shape, dtype=np.float32), affine
    if kind == "rotation":  # about the volume centre, in the first two axes' plane
        angle = rng.uniform(5, 10) * rng.choice([-1, 1])
        fill = float(data.min())
        return ndimage.rotate(data, angle, axes=(0, 1), reshape=False, order=1, cval=fill), affine
    if kind == "fov_shift":  # drop 10-15 % of one axis on one side
        axis = int(rng.integers(3))
        cut = max(1, int(round(rng.uniform(0.10, 0.15) * data.shape[axis])))
        view = [slice(None)] * 3
        if rng.random() < 0.5:
            view[axis] = slice(cut, None)
            shifted = affine.copy()
            shifted[:3, 3] += affine[:3, axis] * cut
        else:
            view[axis] = slice(0, data.shape[axis] - cut)
            shifted = affine
        return np.ascontiguousarray(data[tuple(view)]), shifted
    raise ValueError(kind)


def subjects(args: argparse.Namespace, pre) -> list[tuple[str, np.ndarray, np.ndarray, bool]]:
    """(name, array, affine, is_ct) of every subject."""
    out = []
    real = [SAMPLE] + [Path(args.data) / name for name in REAL if (Path(args.data) / name).is_file()]
    for path in real:
        vol = read_volume(path)
        ct = float(np.percentile(vol.data, 1)) < -500  # HU air
        out.append((path.name.split(".")[0], vol.data.astype(np.float32), vol.affine, ct))
    if args.synthetic:
        from gvsl.generator import SynthGenerator, load_recipe

        gen = SynthGenerator(load_recipe(args.recipe), spacing=pre.spacing[0] if pre.spacing else None)
        rng = np.random.default_rng(args.seed + 1000)
        shape = tuple(int(round(1.5 * p)) for p in args.patch)
        for k in range(args.synthetic):
            draw = gen.draw(rng, shape)
            out.append((f"synth{k}_{draw.modality}", draw.image, draw.affine, draw.modality == "ct"))
    return out


def feature_stats(embedder: Embedder, recipe: str, n: int, seed: int) -> EmbeddingStats:
    """Statistics of the mean-pooled dense features over the same synthetic draws."""
    rows = []
    for image, _ in synthetic_volumes(recipe, n, embedder.info.patch_size, embedder.info.preprocess, seed):
        out = embedder.backend.run({"image": image[None, None]}, ["features"])
        rows.append(out["features"][0].mean(axis=(1, 2, 3)))
    table = np.stack(rows).astype(np.float64)
    std = table.std(axis=0)
    return EmbeddingStats(table.mean(axis=0), np.maximum(std, 1e-3 * std.max() + 1e-12), n, "features")


def scores(vectors: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True).clip(1e-12)
    cos = unit @ unit.T
    same = labels[:, None] == labels[None, :]
    off = ~np.eye(len(labels), dtype=bool)
    masked = np.where(off, cos, -np.inf)
    top1 = float(np.mean(labels[masked.argmax(axis=1)] == labels))
    same_mean = float(cos[same & off].mean())
    diff_mean = float(cos[~same].mean())
    return {"top1": top1, "cos_same": same_mean, "cos_diff": diff_mean, "margin": same_mean - diff_mean}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(ROOT / "gvsl" / "assets" / "default"))
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--data", default="/work/shared/data")
    ap.add_argument("--recipe", default="default_v2")
    ap.add_argument("--stats-n", type=int, default=128)
    ap.add_argument("--model-stats", action="store_true", help="use the model's own statistics block")
    ap.add_argument("--synthetic", type=int, default=4, help="held-out synthetic subjects")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    t0 = time.perf_counter()
    embedder = Embedder(args.model, args.backend, "cpu", embedding="raw")
    args.patch = embedder.info.patch_size
    pre = embedder.info.preprocess
    if args.model_stats:
        stats = embedding_stats_of(embedder.info)
        if stats is None:
            raise SystemExit(f"{args.model}: no embedding statistics; run gvsl embed-stats or drop --model-stats")
    else:
        stats = gather_embedding_stats(embedder, synth=args.recipe, n=args.stats_n, seed=args.seed)
    fstats = feature_stats(embedder, args.recipe, args.stats_n, args.seed) if embedder.has_dense else None
    # each subject normalised as what it is (a noisy MR view can fool --modality auto); one backend
    by_modality = {m: Embedder(embedder.backend, embedding="raw", modality=m) for m in ("ct", "mr")}
    rng = np.random.default_rng(args.seed + 7)
    raws, feats, labels, names = [], [], [], []
    for s, (name, data, affine, ct) in enumerate(subjects(args, pre)):
        for kind in PERTURBATIONS:
            x, aff = perturb(data, affine, kind, ct, rng)
            res = by_modality["ct" if ct else "mr"].embed((x, aff), dense=fstats is not None, grid="model")
            raws.append(res.embedding_raw)
            if fstats is not None:
                feats.append(res.features.mean(axis=(1, 2, 3)))
            labels.append(s)
        names.append(name)
    raw = np.stack(raws)
    labels_a = np.asarray(labels)
    table = {"raw": scores(raw, labels_a), "standardised": scores(stats.standardise(raw), labels_a)}
    if fstats is not None:
        multi = np.concatenate([stats.standardise(raw), fstats.standardise(np.stack(feats))], axis=1)
        table["multiscale"] = scores(multi, labels_a)
    print(f"model {args.model}; stats: {stats.source} (n={stats.n}); subjects: {', '.join(names)}")
    print(f"{len(names)} subjects x {len(PERTURBATIONS)} views ({', '.join(PERTURBATIONS)})")
    print(f"{'read-out':<14}{'top-1':>7}{'cos same':>10}{'cos diff':>10}{'margin':>8}")
    for key, r in table.items():
        print(f"{key:<14}{r['top1']:>7.3f}{r['cos_same']:>10.3f}{r['cos_diff']:>10.3f}{r['margin']:>8.3f}")
    print(f"({time.perf_counter() - t0:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps({"subjects": names, "results": table}, indent=2) + "\n")


if __name__ == "__main__":
    main()
