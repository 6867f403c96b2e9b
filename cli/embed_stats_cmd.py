"""``gvsl embed-stats``: gather the embedding statistics of a trained model and store them in it.

The runtime standardises embeddings with them (``gvsl embed``, ``gvsl serve``);
``gvsl export`` carries them into the encoder's ONNX metadata. Needs torch
(the trained model runs in PyTorch), imported only when the command runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gvsl.cli.app import app, err, user_errors


@app.command("embed-stats")
@user_errors
def embed_stats(
    model_dir: Annotated[Path, typer.Argument(help="Trained model folder (model.json + model.safetensors).")],
    data: Annotated[
        list[str] | None,
        typer.Argument(help="Volumes like the pre-training data (NIfTI files, DICOM folders, folders, globs)."),
    ] = None,
    synth: Annotated[
        str | None,
        typer.Option(help="Also draw synthetic subjects from this generator recipe (a file or a shipped name)."),
    ] = None,
    n: Annotated[int, typer.Option("--n", help="Synthetic subjects to draw with --synth.")] = 256,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic draws.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No summary line.")] = False,
) -> None:
    """Store per-channel mean/std of the raw embedding over DATA and/or --synth draws in MODEL_DIR.

    Writes the "embedding_stats" block into model.json (and the safetensors header copy),
    atomically. Re-export the model afterwards so ONNX / TensorRT / serve apply it.
    """
    import gvsl.torch_backend  # noqa: F401 - registers the torch backend
    from gvsl.embedding_stats import gather_embedding_stats, model_files, write_embedding_stats
    from gvsl.runtime.io import list_inputs

    model_files(model_dir)  # a trained model folder, or one line before any work
    if not data and synth is None:
        raise typer.BadParameter("give DATA volumes and/or --synth RECIPE to gather the statistics over")
    volumes = []
    if data:
        items, problems = list_inputs(data)
        if problems:
            path, why = problems[0]
            raise typer.BadParameter(f"{path}: {why}")
        volumes = [it.path for it in items]
    stats = gather_embedding_stats(model_dir, volumes, synth=synth, n=n, seed=seed, device=device)
    cfg = write_embedding_stats(model_dir, stats)
    if not quiet:
        err.print(
            f"embedding statistics of {stats.mean.shape[0]} channels over {stats.n} inputs ({stats.source}) "
            f"written to {cfg}; re-export with `gvsl export {model_dir} OUT` so the runtime applies them"
        )
