"""``gvsl train``: GVSL pre-training from the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from gvsl.cli.app import app, err, parse_triple, progress_bar, user_errors


@app.command()
@user_errors
def train(
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder: checkpoints, metrics, final model.")],
    data: Annotated[
        list[str] | None,
        typer.Argument(
            help="NIfTI volumes: folders (searched recursively), files or glob patterns (optional with --synth)."
        ),
    ] = None,
    iterations: Annotated[int, typer.Option(help="Training iterations (the paper used 200,000).")] = 1000,
    batch_size: Annotated[int, typer.Option(help="Pairs per iteration (per process under torchrun).")] = 1,
    patch_size: Annotated[str, typer.Option(help="Crop size D,H,W or one number; multiples of 16.")] = "64",
    widths: Annotated[
        str, typer.Option(help="U-Net widths: default, small, tiny or nine comma-separated numbers.")
    ] = "default",
    affine_width: Annotated[
        int | None, typer.Option(help="Width of the affine head's conv (official 256; default: the preset's).")
    ] = None,
    deform_width: Annotated[
        int | None, typer.Option(help="Width of the deformable head's conv (official 16; default: the preset's).")
    ] = None,
    restore_width: Annotated[
        int | None, typer.Option(help="Width of the restoration head (official 16; default: the preset's).")
    ] = None,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 1e-4,
    w_ncc: Annotated[float, typer.Option(help="Weight of the local NCC (Z-matching) loss.")] = 1.0,
    w_mse: Annotated[float, typer.Option(help="Weight of the restoration MSE loss.")] = 1.0,
    w_smooth: Annotated[float, typer.Option(help="Weight of the DVF smoothness loss.")] = 1.0,
    spacing: Annotated[str, typer.Option(help="Resample to this voxel size in mm (one or three), or 'native'.")] = "1",
    modality: Annotated[
        str,
        typer.Option(
            help="Intensity normalisation: auto (CT or MR decided per volume from its values), ct (HU window), "
            "mr (percentiles), none."
        ),
    ] = "auto",
    synth: Annotated[
        str | None,
        typer.Option(
            help="Also draw pairs on the fly from the label-map generator: a recipe JSON file, or the name of "
            "one shipped with gvsl (default, default_v2; see gvsl/assets/recipes)."
        ),
    ] = None,
    synth_ratio: Annotated[
        float | None,
        typer.Option(help="Share of pairs drawn from --synth, in [0, 1] (default 0.7 with DATA, 1 without)."),
    ] = None,
    synth_root: Annotated[
        Path | None,
        typer.Option(help="Folder the recipe's relative file names start from (default: the recipe's own root)."),
    ] = None,
    checkpoint_every: Annotated[int, typer.Option(help="Save a checkpoint every K iterations.")] = 500,
    log_every: Annotated[int, typer.Option(help="Write a metrics row every K iterations.")] = 10,
    seed: Annotated[int, typer.Option(help="Seed of weights, data and augmentation.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    amp: Annotated[bool, typer.Option(help="Mixed precision on CUDA (bf16 where supported).")] = True,
    channels_last: Annotated[
        bool, typer.Option(help="Channels-last 3-D memory format (faster convolutions on GPUs).")
    ] = False,
    compile: Annotated[bool, typer.Option(help="torch.compile the model (slow first steps, faster after).")] = False,
    no_augment: Annotated[bool, typer.Option("--no-augment", help="Switch spatial augmentation off.")] = False,
    augment: Annotated[
        list[str] | None,
        typer.Option(
            help="Override one augmentation setting, KEY=VALUE (repeatable; VALUE is JSON), e.g. "
            "--augment p_damage=0.5 --augment 'rotation=[-0.2,0.2]'. Keys and defaults (GVSL_SPEC §4): "
            "gvsl.augment.AugmentConfig.",
        ),
    ] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Cache of preprocessed volumes (default RUN/cache).")] = None,
    skip_bad: Annotated[bool, typer.Option(help="Train on the good files and list the bad ones.")] = False,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last checkpoint.")] = False,
    init_weights: Annotated[
        Path | None,
        typer.Option(help="Start a new run from these weights (a trained model folder, same widths): a warm start."),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar; errors only.")] = False,
) -> None:
    """Pre-train GVSL on a folder of unlabeled CT/MR volumes.

    Multi-GPU / multi-node: launch the same command with torchrun, e.g.
    `torchrun --nproc-per-node 4 -m gvsl.cli.main train DATA -o RUN`.
    """
    from gvsl.augment import AugmentConfig
    from gvsl.config import ModelConfig
    from gvsl.runtime.preprocess import PreprocessConfig
    from gvsl.train import TrainConfig
    from gvsl.train import train as run_train

    recipe = None
    if synth is not None:
        from gvsl.generator import load_recipe
        from gvsl.synth_source import check_ratio

        ratio = check_ratio((0.7 if data else 1.0) if synth_ratio is None else synth_ratio)
        recipe = load_recipe(synth, root=synth_root)
    elif synth_ratio is not None or synth_root is not None:
        err.print("[bold red]error:[/] --synth-ratio and --synth-root need --synth RECIPE", soft_wrap=True)
        raise typer.Exit(2)
    try:
        mcfg = ModelConfig.from_preset(widths)
        pcfg = PreprocessConfig(
            spacing=None if spacing == "native" else parse_triple(spacing, "--spacing", float),
            modality=modality,
        )
        acfg = AugmentConfig.from_dict(
            {**({"spatial": False} if no_augment else {}), **_key_values(augment or [], "--augment")}
        )
        cfg = TrainConfig(
            data=[str(d) for d in data or []],
            out=str(out),
            iterations=iterations,
            batch_size=batch_size,
            patch_size=parse_triple(patch_size, "--patch-size"),
            widths=list(mcfg.widths),
            affine_width=mcfg.affine_width if affine_width is None else affine_width,
            deform_width=mcfg.deform_width if deform_width is None else deform_width,
            restore_width=mcfg.restore_width if restore_width is None else restore_width,
            lr=lr,
            loss={"ncc": w_ncc, "mse": w_mse, "smooth": w_smooth},
            checkpoint_every=checkpoint_every,
            log_every=log_every,
            seed=seed,
            device=device,
            amp=amp,
            channels_last=channels_last,
            compile=compile,
            preprocess=pcfg.to_dict(),
            augment=acfg.to_dict(),
            skip_bad=skip_bad,
            cache_dir=str(cache_dir) if cache_dir else None,
            synth=recipe,
            synth_ratio=ratio if recipe is not None else 1.0,
            init_weights=str(init_weights) if init_weights else None,
        )
    except (ValueError, TypeError) as e:
        err.print(f"[bold red]error:[/] {e}", soft_wrap=True)
        raise typer.Exit(2) from None

    progress = progress_bar(quiet)
    with progress:
        scan = progress.add_task("preprocess", total=None, info="")
        task = progress.add_task("train", total=iterations, info="", visible=False)

        def on_scan(i: int, n: int, path: str) -> None:
            progress.update(scan, total=n, completed=i, info=Path(path).name)

        def on_step(step: int, total: int, m: dict[str, float]) -> None:
            info = (
                f"loss {m['total']:.4f} ncc {m['ncc']:.4f} mse {m['mse']:.4f} "
                f"smooth {m['smooth']:.4f} {m.get('it_per_s', 0.0):.2f} it/s"
            )
            progress.update(task, total=total, completed=step, info=info, visible=True)

        result = run_train(
            cfg,
            resume=resume,
            progress=on_step,
            scan_progress=on_scan,
            log=(lambda s: None) if quiet else (lambda s: err.print(s, soft_wrap=True, highlight=False)),
        )
    if result.interrupted:
        err.print(
            f"interrupted at step {result.step}: checkpoint saved in {out}/checkpoints; "
            f"continue with `gvsl train ... -o {out} --resume`"
        )
        raise typer.Exit(130)
    if result.bad_files:
        err.print(f"[yellow]{len(result.bad_files)} file(s) skipped:[/]")
        for path, why in result.bad_files:
            err.print(f"  {path}: {why}", soft_wrap=True)
    if not quiet:
        m = result.last_metrics
        err.print(
            f"done: {result.step} iterations, final loss {m.get('total', float('nan')):.4f}; "
            f"model in {result.model_dir}"
        )


def _key_values(items: list[str], what: str) -> dict[str, Any]:
    """``["p_shuffle=0", "rotation=[-0.2,0.2]"]`` -> ``{"p_shuffle": 0, "rotation": [-0.2, 0.2]}``
    (values are JSON; a bare word stays a string)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{what} takes KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out
