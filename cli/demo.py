"""``gvsl demo``: the whole job, end to end, on the real sample volume bundled with gvsl.

One command on a fresh install: make a few synthetic subjects from the bundled
2 mm MNI ICBM152 2009a brain (``gvsl.synth``), pre-train a tiny GVSL on them
for about a minute (``gvsl.train``), export it to ONNX (``gvsl.export``), embed
every subject and register one onto another with the torch-free runtime
(``gvsl.runtime``), then write a report folder: figures and ``summary.md``.
The shipped default model registers the same pair, so the report shows what
a minute of training gives beside a longer-trained model. Everything the
numbers come from is in the folder (subjects, run, export, outputs).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gvsl.runtime.errors import GvslInputError

__all__ = ["DemoConfig", "run_demo", "save_embedding_matrix_png", "save_field_png"]

Log = Callable[[str], None]


@dataclass
class DemoConfig:
    """Sizes of the demo. The defaults take about a minute of training on 2 CPU cores
    (this project's measured ~2 s per tiny 32^3 iteration); the test uses less."""

    subjects: int = 6
    spacing: float = 4.0
    iterations: int = 30
    patch_size: int = 32
    widths: str = "tiny"
    seed: int = 0
    lr: float = 1e-3
    use_default_model: bool = True
    #: instance refinement after each network (iterations per level; 0 = the network alone)
    refine: int = 40
    regularisation: float = 0.3


def _cosine_matrix(emb: np.ndarray) -> np.ndarray:
    e = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    return e @ e.T


def _figure() -> tuple[Any, Any]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise GvslInputError("gvsl demo writes figures with matplotlib: pip install 'gvsl[viz]'") from None
    return Figure, FigureCanvasAgg


def save_embedding_matrix_png(path: Path, names: list[str], sim: np.ndarray, title: str) -> Path:
    """A similarity matrix in [-1, 1] (e.g. cosines of embeddings), values printed in the cells."""
    from gvsl.runtime.io import atomic_write

    Figure, Canvas = _figure()
    fig = Figure(figsize=(1.2 + 0.8 * len(names), 1.0 + 0.7 * len(names)))
    Canvas(fig)
    ax = fig.subplots()
    im = ax.imshow(sim, cmap="RdBu_r", vmin=-1.0, vmax=1.0)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{sim[i, j]:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))


def save_field_png(path: Path, dvf_mm: np.ndarray, affine: np.ndarray, title: str, step: int = 3) -> Path:
    """Deformation grid (in-plane displacement of a regular grid) and Jacobian
    determinant map, on the central axial, coronal and sagittal slices (RAS data)."""
    from gvsl.runtime.io import atomic_write
    from gvsl.runtime.metrics import jacobian_determinant
    from gvsl.runtime.volume import voxel_sizes

    Figure, Canvas = _figure()
    det = jacobian_determinant(dvf_mm, affine)
    sp = voxel_sizes(affine)
    d_vox = dvf_mm / sp.reshape(3, 1, 1, 1)  # displacement in voxels (axis-aligned grids)
    cx, cy, cz = (s // 2 for s in det.shape)
    planes = [
        ("axial", (0, 1), (slice(None), slice(None), cz)),
        ("coronal", (0, 2), (slice(None), cy, slice(None))),
        ("sagittal", (1, 2), (cx, slice(None), slice(None))),
    ]
    fig = Figure(figsize=(12, 7.5))
    Canvas(fig)
    axes = fig.subplots(2, 3)
    lim = max(0.5, float(np.percentile(np.abs(det - 1), 99.5)))
    for k, (name, (a, b), sl) in enumerate(planes):
        u, v = d_vox[a][sl], d_vox[b][sl]
        ii, jj = np.meshgrid(np.arange(u.shape[0]), np.arange(u.shape[1]), indexing="ij")
        gx, gy = ii + u, jj + v
        ax = axes[0, k]
        for r in range(0, u.shape[0], step):
            ax.plot(gx[r, :], gy[r, :], color="k", lw=0.5)
        for c in range(0, u.shape[1], step):
            ax.plot(gx[:, c], gy[:, c], color="k", lw=0.5)
        ax.set_aspect(sp[b] / sp[a])
        ax.set_title(f"deformation grid, {name}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax2 = axes[1, k]
        im = ax2.imshow(det[sl].T[::-1], cmap="RdBu_r", vmin=1 - lim, vmax=1 + lim, aspect=sp[b] / sp[a])
        ax2.set_title(f"Jacobian determinant, {name}", fontsize=9)
        ax2.set_xticks([])
        ax2.set_yticks([])
        fig.colorbar(im, ax=ax2, fraction=0.046)
    fig.suptitle(
        f"{title}   min det J {float(det.min()):.3f}, folding {100 * float((det <= 0).mean()):.3f} %", fontsize=10
    )
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))


def _dice_labels(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    from gvsl.runtime.metrics import dice

    return {"gm": dice(a == 1, b == 1), "wm": dice(a == 2, b == 2)}


def _register(
    model: Path, fixed: str, moving: str, labels: str, fixed_labels: np.ndarray, cfg: DemoConfig
) -> tuple[Any, dict]:
    """Register through the runtime with the demo's refinement and add Dice of the warped labels
    (before = initial alignment only), and the Dice of the network alone beside it."""
    import nibabel as nib

    from gvsl.runtime.register import RefineOptions, Registrar
    from gvsl.runtime.warp import warp_by_displacement

    options = RefineOptions(iterations=cfg.refine, levels=(cfg.spacing,), regularisation=cfg.regularisation)
    with Registrar(model, "onnxruntime", "cpu", refine=options) as reg:
        network = reg.register(fixed, moving, labels=[labels], refine=RefineOptions(iterations=0))
        t0 = time.perf_counter()
        res = reg.register(fixed, moving, labels=[labels])
        seconds = time.perf_counter() - t0
    lab_img = nib.load(labels)
    moving_labels = np.rint(np.asarray(lab_img.dataobj)).astype(np.int64)
    before = warp_by_displacement(
        moving_labels, lab_img.affine, res.affine, None, order=0, dst_shape=fixed_labels.shape
    )
    m = dict(res.metrics)
    m["seconds"] = seconds
    m.update({f"dice_{k}_before": v for k, v in _dice_labels(before, fixed_labels).items()})
    m.update({f"dice_{k}_after": v for k, v in _dice_labels(res.labels[0], fixed_labels).items()})
    m.update({f"dice_{k}_network_only": v for k, v in _dice_labels(network.labels[0], fixed_labels).items()})
    m["refine_iterations"] = cfg.refine
    return res, m


def run_demo(out: str | Path, cfg: DemoConfig | None = None, log: Log | None = None) -> dict[str, Any]:
    """Run the demo into ``out`` (created; must be empty or absent) and return the summary."""
    import nibabel as nib

    from gvsl.config import ModelConfig
    from gvsl.export.pipeline import ExportOptions, run_export
    from gvsl.runtime.embed import Embedder
    from gvsl.runtime.io import save_npy, save_text
    from gvsl.synth import SynthConfig, make_subjects
    from gvsl.train import TrainConfig, train

    cfg = cfg or DemoConfig()
    say = log or (lambda s: None)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise GvslInputError(f"{out}: exists and is not an empty folder; choose a new --out", str(out))
    if cfg.subjects < 3:
        raise GvslInputError(f"--subjects {cfg.subjects}: the demo needs at least 3 (a pair to register + others)")
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    say(f"1/5 synth: {cfg.subjects} subjects from the bundled MNI ICBM152 2009a sample at {cfg.spacing} mm")
    recs = make_subjects(
        out / "subjects", cfg.subjects, seed=cfg.seed, source="sample", spacing=cfg.spacing, cfg=SynthConfig()
    )
    timings["synth"] = time.perf_counter() - t

    t = time.perf_counter()
    say(f"2/5 train: {cfg.iterations} iterations, widths {cfg.widths}, patch {cfg.patch_size}^3")
    mcfg = ModelConfig.from_preset(cfg.widths)
    tcfg = TrainConfig(
        data=[r["image"] for r in recs],
        out=str(out / "run"),
        iterations=cfg.iterations,
        patch_size=(cfg.patch_size,) * 3,
        widths=list(mcfg.widths),
        affine_width=mcfg.affine_width,
        deform_width=mcfg.deform_width,
        restore_width=mcfg.restore_width,
        lr=cfg.lr,
        checkpoint_every=max(cfg.iterations, 1),
        log_every=max(1, cfg.iterations // 20),
        seed=cfg.seed,
        device="cpu",
        preprocess={"spacing": [cfg.spacing] * 3, "modality": "mr"},
    )
    result = train(tcfg, log=say)
    if result.interrupted or result.model_dir is None:
        raise GvslInputError("demo training was interrupted; run gvsl demo again")
    timings["train"] = time.perf_counter() - t

    t = time.perf_counter()
    say("3/5 export: encoder.onnx + registration.onnx (verified against PyTorch)")
    export_dir = out / "export"
    run_export(result.model_dir, export_dir, ExportOptions(verify_shapes=((1, 32, 32, 32),)))
    timings["export"] = time.perf_counter() - t

    t = time.perf_counter()
    say("4/5 embed every subject (ONNX Runtime)")
    names = [Path(r["image"]).name.split(".")[0] for r in recs]
    with Embedder(export_dir, "onnxruntime", "cpu") as emb:
        embs = np.stack([emb.embed(r["image"]).embedding for r in recs])
    save_npy(out / "embeddings.npy", embs)
    sim = _cosine_matrix(embs.astype(np.float64))
    # raw cosines of one brain's subjects all round to 1.000; the matrix of the centred
    # embeddings (mean over subjects removed) shows which subjects the model sets apart
    centred = _cosine_matrix(embs.astype(np.float64) - embs.astype(np.float64).mean(0, keepdims=True))
    figs = [
        save_embedding_matrix_png(
            out / "embedding_similarity.png",
            names,
            centred,
            f"cosine of centred global embeddings (demo model); raw cosine {sim.min():.6f}..1",
        )
    ]
    timings["embed"] = time.perf_counter() - t

    t = time.perf_counter()
    say(f"5/5 register {names[1]} onto {names[0]} (with its grey/white-matter labels)")
    fixed, moving, labels = recs[0]["image"], recs[1]["image"], recs[1]["labels"]
    fixed_labels = np.rint(np.asarray(nib.load(recs[0]["labels"]).dataobj)).astype(np.int64)
    res, metrics = _register(export_dir, fixed, moving, labels, fixed_labels, cfg)
    res.save_warped(out / "warped.nii.gz")
    res.save_labels([out / "warped_labels.nii.gz"])
    res.save_dvf(out / "dvf.nii.gz")
    figs.append(res.save_png(out / "registration.png", title=f"demo model: {names[1]} -> {names[0]}"))
    figs.append(save_field_png(out / "deformation.png", res.dvf_mm, res.affine, "demo model"))
    registrations = {"demo": metrics}
    if cfg.use_default_model:
        from gvsl.runtime.default_model import default_model_dir

        try:
            default_dir = default_model_dir()
        except GvslInputError as e:
            say(f"note: {e}")
        else:
            # the default model works at its own spacing (model.json); the runtime resamples, outputs stay here
            dres, dm = _register(default_dir, fixed, moving, labels, fixed_labels, cfg)
            registrations["default"] = dm
            figs.append(
                dres.save_png(out / "registration_default_model.png", title=f"default model: {names[1]} -> {names[0]}")
            )
            figs.append(
                save_field_png(out / "deformation_default_model.png", dres.dvf_mm, dres.affine, "default model")
            )
    timings["register"] = time.perf_counter() - t

    off = sim[~np.eye(len(names), dtype=bool)]
    summary = {
        "config": asdict(cfg),
        "subjects": names,
        "train": {"iterations": result.step, "final": result.last_metrics},
        "registration_pair": {"fixed": names[0], "moving": names[1]},
        "registration": registrations,
        "embedding": {
            "dim": int(embs.shape[1]),
            "cosine_offdiag_mean": float(off.mean()),
            "cosine_offdiag_min": float(off.min()),
        },
        "seconds": timings,
        "figures": [str(Path(f).name) for f in figs],
    }
    save_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    save_text(out / "summary.md", _markdown(summary))
    say(f"report: {out / 'summary.md'}")
    return summary


def _markdown(s: dict[str, Any]) -> str:
    c = s["config"]
    f = s["train"]["final"]
    lines = [
        "# gvsl demo",
        "",
        f"Subjects: {len(s['subjects'])} synthetic subjects made by `gvsl.synth` from the bundled MNI ICBM152 2009a "
        f"T1 (2 mm sample) at {c['spacing']} mm: random affine + smooth elastic deformations, bias field, gamma, "
        "noise. Labels: 1 grey matter, 2 white matter.",
        "",
        f"Training: {s['train']['iterations']} iterations, widths `{c['widths']}`, patch {c['patch_size']}^3, "
        f"lr {c['lr']}, seed {c['seed']}. Final loss {f.get('total', float('nan')):.4f} "
        f"(NCC {f.get('ncc', float('nan')):.4f}, MSE {f.get('mse', float('nan')):.4f}, "
        f"smooth {f.get('smooth', float('nan')):.5f}).",
        "",
        f"## Registration: {s['registration_pair']['moving']} -> {s['registration_pair']['fixed']}",
        "",
        "| model | NCC before | NCC after | GM Dice before | GM Dice network only | GM Dice after | WM Dice before "
        "| WM Dice network only | WM Dice after | min det J | folding % | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in s["registration"].items():
        label = "demo (trained above)" if name == "demo" else "shipped default model"
        lines.append(
            f"| {label} | {m['ncc_before']:.4f} | {m['ncc_after']:.4f} | {m['dice_gm_before']:.4f} | "
            f"{m['dice_gm_network_only']:.4f} | {m['dice_gm_after']:.4f} | {m['dice_wm_before']:.4f} | "
            f"{m['dice_wm_network_only']:.4f} | {m['dice_wm_after']:.4f} | "
            f"{m['jacobian_min']:.3f} | {m['folding_percent']:.3f} | {m['seconds']:.2f} |"
        )
    e = s["embedding"]
    lines += [
        "",
        f'"after" is the network followed by {s["config"]["refine"]} iterations of instance refinement '
        '(refine.onnx, greedy diffeomorphic local-CC ascent); "network only" is the network alone. A minute of CPU '
        "training is far too short for a good registration network; the refinement is what makes the result good. "
        "See EVALUATION.md for the measured comparison with ANTs, elastix and FireANTs.",
        "",
        "## Embeddings",
        "",
        f"{e['dim']}-d global embeddings; mean off-diagonal cosine similarity {e['cosine_offdiag_mean']:.6f} "
        f"(min {e['cosine_offdiag_min']:.6f}) — every subject is the same brain, so they are expected to be close. "
        "`embedding_similarity.png` shows the cosines after removing the mean embedding of the subjects.",
        "",
        "## Time (s)",
        "",
        " | ".join(f"{k} {v:.1f}" for k, v in s["seconds"].items()),
        "",
        "## Figures",
        "",
    ]
    lines += [f"- `{fig}`" for fig in s["figures"]]
    return "\n".join(lines) + "\n"
