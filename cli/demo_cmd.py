"""``gvsl synth``, ``gvsl demo``, ``gvsl probe`` and ``gvsl finetune``.

``synth`` makes training/evaluation subjects from a real template, ``demo``
runs the whole job end to end on the bundled sample, ``probe`` / ``finetune``
measure what pre-training is worth on the user's own labelled volumes.
Torch is imported inside the commands that need it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gvsl.cli.app import app, err, user_errors


@app.command()
@user_errors
def synth(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the subjects (NIfTI + labels + synth.json).")],
    n: Annotated[int, typer.Option(help="How many subjects.")] = 16,
    source: Annotated[
        str,
        typer.Option(
            help="mni (nilearn's MNI ICBM152 2009a T1 + GM/WM labels), sample (the bundled 2 mm copy) "
            "or a NIfTI path (no labels; 4-D: first frame)."
        ),
    ] = "mni",
    spacing: Annotated[float, typer.Option(help="Voxel size of the subjects in mm.")] = 2.0,
    seed: Annotated[int, typer.Option(help="Seed; subject k uses SeedSequence(seed, spawn_key=(k,)).")] = 0,
    prefix: Annotated[str, typer.Option(help="File name prefix.")] = "subject",
    elastic_mm: Annotated[float, typer.Option(help="Peak elastic displacement in mm.")] = 6.0,
    rotation_deg: Annotated[float, typer.Option(help="Largest rotation per axis in degrees.")] = 8.0,
    save_fields: Annotated[bool, typer.Option(help="Also write each true displacement field.")] = False,
    recipe: Annotated[
        str | None,
        typer.Option(
            help="Draw from the label-map generator instead: a recipe JSON (label maps, intensity models, "
            "artefacts; see gvsl/assets/recipes) or a shipped recipe name (default, default_v2). Writes images "
            "in HU (CT draws) or MR units with their warped label maps."
        ),
    ] = None,
    recipe_root: Annotated[
        Path | None, typer.Option(help="Folder the recipe's relative file names start from.")
    ] = None,
    shape: Annotated[str | None, typer.Option(help="With --recipe: grid size X,Y,Z or one number.")] = None,
    pairs: Annotated[
        bool, typer.Option(help="With --recipe: write pairs (_a, _b) that share one appearance model.")
    ] = False,
) -> None:
    """Make synthetic subjects: a real template under random smooth deformations and
    MR-like intensity changes, with grey/white-matter labels where the source has them;
    or, with --recipe, SynthSeg-style CT/MR subjects drawn from label maps."""
    if recipe is not None:
        from gvsl.cli.app import parse_triple
        from gvsl.generator import load_recipe, write_draws

        recs = write_draws(
            out,
            load_recipe(recipe, root=recipe_root),
            n,
            seed=seed,
            shape=None if shape is None else parse_triple(shape, "--shape"),
            spacing=spacing,
            pairs=pairs,
            prefix=prefix,
        )
        err.print(f"wrote {len(recs)} subjects to {out}", highlight=False)
        return
    from gvsl.synth import SynthConfig, make_subjects

    cfg = SynthConfig(elastic_mm=elastic_mm, rotation_deg=rotation_deg)
    recs = make_subjects(
        out, n, seed=seed, source=source, spacing=spacing, cfg=cfg, prefix=prefix, save_fields=save_fields
    )
    err.print(f"wrote {len(recs)} subjects to {out}", highlight=False)


@app.command()
@user_errors
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Report folder (new or empty).")] = Path("gvsl-demo"),
    subjects: Annotated[int, typer.Option(help="Synthetic subjects made from the bundled sample.")] = 6,
    iterations: Annotated[int, typer.Option(help="Training iterations (about a minute on 2 CPU cores).")] = 30,
    spacing: Annotated[float, typer.Option(help="Voxel size of the demo in mm.")] = 4.0,
    patch_size: Annotated[int, typer.Option(help="Training crop size (multiple of 16).")] = 32,
    widths: Annotated[str, typer.Option(help="U-Net widths: tiny, small, default or nine numbers.")] = "tiny",
    seed: Annotated[int, typer.Option(help="Seed of subjects, weights and training.")] = 0,
    default_model: Annotated[
        bool, typer.Option(help="Also register the pair with the model shipped with gvsl.")
    ] = True,
    refine: Annotated[int, typer.Option(help="Refinement iterations after the network (0 = the network alone).")] = 40,
    regularisation: Annotated[float, typer.Option(help="Refinement smoothness in [0, 1].")] = 0.3,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")] = False,
) -> None:
    """Run the whole job on the bundled real sample: synth -> train -> export -> embed -> register,
    and write figures and summary.md into --out."""
    from gvsl.cli.demo import DemoConfig, run_demo

    cfg = DemoConfig(
        subjects=subjects,
        spacing=spacing,
        iterations=iterations,
        patch_size=patch_size,
        widths=widths,
        seed=seed,
        use_default_model=default_model,
        refine=refine,
        regularisation=regularisation,
    )
    say = (lambda s: None) if quiet else (lambda s: err.print(s, soft_wrap=True, highlight=False, markup=False))
    run_demo(out, cfg, log=say)


def _downstream(
    mode: str,
    data: list[str],
    labels: list[str] | None,
    val: list[str] | None,
    model: str,
    out: Path,
    classes: int,
    iterations: int,
    lr: float | None,
    patch_size: int,
    voxels: int,
    val_fraction: float,
    widths: str,
    spacing: str,
    seed: int,
    device: str,
    quiet: bool,
) -> None:
    from gvsl.probe import (
        DownstreamConfig,
        find_pairs,
        finetune,
        linear_probe,
        load_backbone,
        load_cases,
        save_downstream,
        split_cases,
    )
    from gvsl.runtime.errors import GvslInputError
    from gvsl.runtime.preprocess import PreprocessConfig

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise GvslInputError(f"{out}: exists and is not an empty folder; choose a new --out", str(out))
    cfg = DownstreamConfig(
        num_classes=classes,
        iterations=iterations,
        lr=lr,
        voxels=voxels,
        patch_size=(patch_size,) * 3,
        val_fraction=val_fraction,
        seed=seed,
        device=device,
    )
    net, meta = load_backbone(None if model == "random" else model, widths=widths, seed=seed)
    pre_d = meta.get("preprocess") or {}
    if model == "random" or not pre_d:
        from gvsl.cli.app import parse_triple

        pre_d = {
            "spacing": None if spacing == "native" else list(parse_triple(spacing, "--spacing", float)),
            "modality": "mr",
        }
        meta["preprocess"] = pre_d
    pre = PreprocessConfig.from_dict(pre_d)
    cases = load_cases(find_pairs(data, labels), pre, classes)
    val_cases = load_cases(find_pairs(val), pre, classes) if val else None
    train_cases, val_cases = split_cases(cases, cfg.val_fraction, seed, val_cases)
    say = (lambda s: None) if quiet else (lambda s: err.print(s, soft_wrap=True, highlight=False, markup=False))
    say(f"{mode}: {len(train_cases)} training / {len(val_cases)} validation volumes, {classes} classes")
    run = linear_probe if mode == "probe" else finetune
    res = run(net, train_cases, val_cases, cfg, log=say)
    patch = meta.get("patch_size") or [patch_size] * 3
    save_downstream(out, net, meta, res, patch)
    dice = ", ".join(f"class {k}: {v:.4f}" for k, v in res.dice.items() if k != "mean")
    say(f"validation Dice mean {res.dice['mean']:.4f} ({dice}); saved to {out}")


_DATA_HELP = "Labelled images: files, folders or globs; each X.nii.gz needs X_labels.nii.gz beside it (or --labels)."

# options probe and finetune share (typer reads each command's own signature, so they are aliases)
_Data = Annotated[list[str], typer.Argument(help=_DATA_HELP)]
_Out = Annotated[Path, typer.Option("--out", "-o", help="Folder for model, head.npz and metrics.json.")]
_Classes = Annotated[int, typer.Option(help="Number of classes including background (labels 0..N-1).")]
_Model = Annotated[
    str, typer.Option("--model", "-m", help="Trained model folder / .safetensors / official .pth, or 'random'.")
]
_Labels = Annotated[list[str] | None, typer.Option(help="Label maps in the same order as the images.")]
_Val = Annotated[list[str] | None, typer.Option(help="Validation images (default: hold out --val-fraction).")]
_ValFraction = Annotated[float, typer.Option(help="Share of volumes held out for validation.")]
_Widths = Annotated[str, typer.Option(help="Widths of a 'random' backbone.")]
_Spacing = Annotated[str, typer.Option(help="Spacing for a 'random' backbone (mm or 'native').")]
_Device = Annotated[str, typer.Option(help="cpu or cuda.")]
_Quiet = Annotated[bool, typer.Option("--quiet", "-q")]


@app.command()
@user_errors
def probe(
    data: _Data,
    out: _Out,
    classes: _Classes,
    model: _Model = "random",
    labels: _Labels = None,
    val: _Val = None,
    iterations: Annotated[int, typer.Option(help="Optimiser steps of the linear head.")] = 300,
    lr: Annotated[float | None, typer.Option(help="Learning rate (default 1e-2).")] = None,
    voxels: Annotated[int, typer.Option(help="Random voxels per step.")] = 32768,
    val_fraction: _ValFraction = 0.25,
    widths: _Widths = "small",
    spacing: _Spacing = "2",
    seed: Annotated[int, typer.Option(help="Seed of the split and the head.")] = 0,
    device: _Device = "cpu",
    quiet: _Quiet = False,
) -> None:
    """Linear evaluation: frozen backbone + 1x1x1 conv on its dense features; Dice on held-out volumes."""
    _downstream(
        "probe", data, labels, val, model, out, classes, iterations, lr, 48, voxels, val_fraction, widths, spacing,
        seed, device, quiet,
    )  # fmt: skip


@app.command()
@user_errors
def finetune(
    data: _Data,
    out: _Out,
    classes: _Classes,
    model: _Model = "random",
    labels: _Labels = None,
    val: _Val = None,
    iterations: Annotated[int, typer.Option(help="Optimiser steps.")] = 300,
    lr: Annotated[float | None, typer.Option(help="Backbone learning rate (head: 10x; default 1e-4).")] = None,
    patch_size: Annotated[int, typer.Option(help="Training crop size (multiple of 16).")] = 48,
    val_fraction: _ValFraction = 0.25,
    widths: _Widths = "small",
    spacing: _Spacing = "2",
    seed: Annotated[int, typer.Option(help="Seed of the split, crops and head.")] = 0,
    device: _Device = "cpu",
    quiet: _Quiet = False,
) -> None:
    """Fine-tuning: backbone + 1x1x1 segmentation head trained on labelled volumes; Dice on held-out volumes."""
    _downstream(
        "finetune", data, labels, val, model, out, classes, iterations, lr, patch_size, 32768, val_fraction, widths,
        spacing, seed, device, quiet,
    )  # fmt: skip
