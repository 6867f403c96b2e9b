"""Representation benchmark: linear probe of the paper's pre-training ablation, and embedding margins.

Part 1 - linear evaluation (GVSL paper, Table 1 "linear" column and its
"w/o" ablation rows). Four backbones, all with the same architecture, the
same initial weights per seed, and the same number of pre-training
iterations on the same unlabelled synthetic subjects:

* ``random``      - no pre-training (the starting point of the others);
* ``restoration`` - self-restoration only (loss weights ncc 0, mse 1, smooth 0);
* ``zmatching``   - Z-matching only (ncc 1, mse 0, smooth 1);
* ``gvsl``        - both (ncc 1, mse 1, smooth 1), the full method.

Each backbone is frozen and a 1x1x1 conv on its dense local features is
trained to segment background / grey matter / white matter on labelled
synthetic subjects (a disjoint set, fixed train/validation split), with
``gvsl.probe.linear_probe``. Dice on the validation subjects is reported as
mean ± std over seeds.

Part 2 - embeddings: K subjects, each seen under M perturbations (small
affine + intensity changes, ``gvsl.synth`` with no elastic part). For each
model: mean cosine similarity of global embeddings between views of the same
subject, between different subjects, their difference (the margin), and the
top-1 retrieval accuracy (is a view's nearest other view from the same
subject?). Subjects all derive from one template, so "different subjects"
differ by a smooth deformation and appearance only.

    python benchmarks/eval_linear_probe.py -o runs/eval_probe --iterations 150 --seeds 0,1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

VARIANTS = {
    "random": None,
    "restoration": {"ncc": 0.0, "mse": 1.0, "smooth": 0.0},
    "zmatching": {"ncc": 1.0, "mse": 0.0, "smooth": 1.0},
    "gvsl": {"ncc": 1.0, "mse": 1.0, "smooth": 1.0},
}


def pretrain(variant: str, seed: int, data: list[str], out: Path, args: argparse.Namespace) -> tuple[Any, dict]:
    """The backbone of one variant: trained with the variant's loss weights, or the
    trainer's own initialisation (``torch.manual_seed(seed)`` then ``GVSL(config)``)."""
    import torch

    from gvsl.config import ModelConfig
    from gvsl.io import load_model
    from gvsl.model import GVSL
    from gvsl.train import TrainConfig, train

    mcfg = ModelConfig.from_preset(args.widths)
    if VARIANTS[variant] is None:
        torch.manual_seed(seed)
        return GVSL(mcfg), {"steps": 0, "final": {}, "seconds": 0.0}
    t0 = time.perf_counter()
    cfg = TrainConfig(
        data=data,
        out=str(out / f"{variant}_seed{seed}"),
        iterations=args.iterations,
        patch_size=(args.patch,) * 3,
        widths=list(mcfg.widths),
        affine_width=mcfg.affine_width,
        deform_width=mcfg.deform_width,
        restore_width=mcfg.restore_width,
        lr=args.lr,
        loss=VARIANTS[variant],
        checkpoint_every=args.iterations,
        log_every=max(1, args.iterations // 10),
        seed=seed,
        device="cpu",
        preprocess={"spacing": [args.spacing] * 3, "modality": "mr"},
        cache_dir=str(out / "cache"),
    )
    res = train(cfg, log=lambda s: None)
    net, _ = load_model(res.model_dir)
    return net, {"steps": res.step, "final": res.last_metrics, "seconds": time.perf_counter() - t0}


def _views(args: argparse.Namespace) -> tuple[list[int], list[np.ndarray], np.ndarray]:
    """(subject index of each view, view images in [0,1]-ish MR scale, grid affine)."""
    from gvsl.runtime.preprocess import PreprocessConfig, normalize_intensity
    from gvsl.synth import SynthConfig, Template, load_template, make_subject

    tpl = load_template(args.source, args.spacing)
    view_cfg = SynthConfig(rotation_deg=6.0, scale=0.05, translation_mm=5.0, elastic_mm=0.0)
    mr = PreprocessConfig(spacing=None, modality="mr")
    owner, images = [], []
    for k in range(args.embed_subjects):
        subj = make_subject(tpl, np.random.default_rng(np.random.SeedSequence(args.embed_seed, spawn_key=(k,))))
        base = Template(normalize_intensity(subj.image, mr), None, subj.affine, f"subject{k}")
        for v in range(args.views):
            rng = np.random.default_rng(np.random.SeedSequence(args.embed_seed + 1, spawn_key=(k, v)))
            view = make_subject(base, rng, view_cfg)
            owner.append(k)
            images.append(normalize_intensity(view.image, mr))
    return owner, images, tpl.affine


def embedding_stats(emb: np.ndarray, owner: list[int]) -> dict[str, float]:
    e = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    sim = e @ e.T
    o = np.asarray(owner)
    same = (o[:, None] == o[None, :]) & ~np.eye(len(o), dtype=bool)
    diff = o[:, None] != o[None, :]
    masked = np.where(np.eye(len(o), dtype=bool), -np.inf, sim)
    nn = masked.argmax(1)
    return {
        "cos_same": float(sim[same].mean()),
        "cos_diff": float(sim[diff].mean()),
        "margin": float(sim[same].mean() - sim[diff].mean()),
        "top1_retrieval": float((o[nn] == o).mean()),
    }


def _torch_embed(net: Any, images: list[np.ndarray]) -> np.ndarray:
    import torch

    from gvsl.runtime.preprocess import pad_to_multiple

    out = []
    with torch.no_grad():
        for img in images:
            x, _ = pad_to_multiple(img, 16)
            out.append(net.eval().embed(torch.from_numpy(np.ascontiguousarray(x))[None, None]).numpy()[0])
    return np.stack(out)


def _mean_std(a: list[float]) -> str:
    x = np.asarray(a, dtype=np.float64)
    return f"{x.mean():.4f} ± {x.std():.4f}" if x.size > 1 else f"{x.mean():.4f}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--out", required=True, type=Path)
    ap.add_argument("--iterations", type=int, default=150, help="pre-training iterations of every variant")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--widths", default="tiny")
    ap.add_argument("--patch", type=int, default=32)
    ap.add_argument("--spacing", type=float, default=4.0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--source", default="mni", help="mni (nilearn) or sample (bundled 2 mm copy)")
    ap.add_argument("--pretrain-subjects", type=int, default=12)
    ap.add_argument("--probe-subjects", type=int, default=8, help="labelled subjects, half train / half validation")
    ap.add_argument("--probe-iterations", type=int, default=300)
    ap.add_argument("--embed-subjects", type=int, default=6)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--embed-seed", type=int, default=3000)
    ap.add_argument(
        "--default-model",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also report the shipped default model's embedding margins",
    )
    args = ap.parse_args(argv)
    import torch

    from gvsl.probe import DownstreamConfig, find_pairs, linear_probe, load_cases
    from gvsl.runtime.preprocess import PreprocessConfig
    from gvsl.synth import make_subjects

    seeds = [int(s) for s in args.seeds.split(",")]
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            ap.error(f"--variants: unknown {v!r}; choose from {', '.join(VARIANTS)}")
    if args.probe_subjects < 2:
        ap.error("--probe-subjects must be >= 2 (one to train the probe, one to validate)")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    pre_recs = make_subjects(
        out / "pretrain", args.pretrain_subjects, seed=0, source=args.source, spacing=args.spacing, prefix="pre"
    )
    probe_recs = make_subjects(
        out / "probe", args.probe_subjects, seed=500, source=args.source, spacing=args.spacing, prefix="lab"
    )
    data = [r["image"] for r in pre_recs]
    pre = PreprocessConfig(spacing=(args.spacing,) * 3, modality="mr")
    cases = load_cases(find_pairs([r["image"] for r in probe_recs]), pre, 3)
    n_train = max(1, len(cases) // 2)
    train_cases, val_cases = cases[:n_train], cases[n_train:]
    owner, views, _ = _views(args)

    rows = []
    for seed in seeds:
        for v in variants:
            torch.manual_seed(seed)
            net, info = pretrain(v, seed, data, out / "runs", args)
            pr = linear_probe(
                net,
                train_cases,
                val_cases,
                DownstreamConfig(num_classes=3, iterations=args.probe_iterations, seed=seed),
            )
            emb = embedding_stats(_torch_embed(net, views), owner)
            row = {
                "variant": v,
                "seed": seed,
                "dice_gm": pr.dice["1"],
                "dice_wm": pr.dice["2"],
                "dice_mean": pr.dice["mean"],
                "pretrain": info,
                "probe_seconds": pr.seconds,
                **emb,
            }
            rows.append(row)
            print(json.dumps({k: row[k] for k in row if k != "pretrain"}), file=sys.stderr)

    default_row = None
    if args.default_model:
        from gvsl.runtime.default_model import default_model_dir
        from gvsl.runtime.embed import Embedder
        from gvsl.runtime.errors import GvslInputError

        try:
            with Embedder(default_model_dir(), "onnxruntime", "cpu") as e:
                # views are already on the default grid's scale at args.spacing: the runtime resamples them to 2 mm
                from gvsl.synth import load_template

                aff = load_template(args.source, args.spacing).affine
                emb = np.stack([e.embed((img, aff)).embedding for img in views])
            default_row = embedding_stats(emb, owner)
        except GvslInputError as err:
            print(f"default model: skipped ({err})", file=sys.stderr)

    lines = [
        "| variant | seeds | GM Dice | WM Dice | mean Dice | pre-training s | final pre-training loss |",
        "|---|---|---|---|---|---|---|",
    ]
    emb_lines = [
        "| model | cos same subject | cos different subjects | margin | top-1 retrieval |",
        "|---|---|---|---|---|",
    ]
    for v in variants:
        rs = [r for r in rows if r["variant"] == v]
        finals = [r["pretrain"]["final"].get("total") for r in rs if r["pretrain"]["final"]]
        lines.append(
            f"| {v} | {len(rs)} | {_mean_std([r['dice_gm'] for r in rs])} | {_mean_std([r['dice_wm'] for r in rs])} "
            f"| {_mean_std([r['dice_mean'] for r in rs])} | {_mean_std([r['pretrain']['seconds'] for r in rs])} "
            f"| {_mean_std(finals) if finals else 'n/a'} |"
        )
        emb_lines.append(
            f"| {v} ({args.widths}) | {_mean_std([r['cos_same'] for r in rs])} "
            f"| {_mean_std([r['cos_diff'] for r in rs])} "
            f"| {_mean_std([r['margin'] for r in rs])} | {_mean_std([r['top1_retrieval'] for r in rs])} |"
        )
    if default_row:
        emb_lines.append(
            f"| shipped default model | {default_row['cos_same']:.4f} | {default_row['cos_diff']:.4f} | "
            f"{default_row['margin']:.4f} | {default_row['top1_retrieval']:.4f} |"
        )
    result = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "probe_train": [c.name for c in train_cases],
        "probe_val": [c.name for c in val_cases],
        "rows": rows,
        "default_model_embeddings": default_row,
        "probe_table": lines,
        "embedding_table": emb_lines,
        "seconds_total": time.perf_counter() - t_start,
    }
    (out / "linear_probe.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (out / "linear_probe.md").write_text("\n".join(lines) + "\n\n" + "\n".join(emb_lines) + "\n", encoding="utf-8")
    print("\n".join(lines) + "\n\n" + "\n".join(emb_lines))
    return result


if __name__ == "__main__":
    main()
