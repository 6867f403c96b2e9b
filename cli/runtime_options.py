"""What ``gvsl embed`` and ``gvsl register`` share: option help, the model choice, error lines.

Both commands run the torch-free runtime on a local model (an export folder,
or a trained model folder through the torch backend) or on a running
``gvsl serve``; the checks of that choice and of ``--modality`` are written
once here. Nothing heavier than typer is imported at module level, so every
``gvsl`` command keeps starting fast.
"""

from __future__ import annotations

from pathlib import Path

import typer

BACKEND_HELP = "auto (ONNX Runtime for exports, torch for trained models), onnxruntime, tensorrt or torch."
SERVER_HELP = (
    "Use a running `gvsl serve` instead of --model: http://HOST:8000 or grpc://HOST:8001 "
    "(the server's backend and settings apply)."
)
DEVICE_HELP = "auto, cpu, cuda or cuda:N (ONNX Runtime tries TensorRT EP, then CUDA EP; cuda fails if neither loads)."
THREADS_HELP = "CPU threads for inference and preprocessing, 1 or more (default: every core, up to 16)."
FALLBACK_HELP = "With --device cuda: warn and run on the CPU when ONNX Runtime cannot use the GPU (default: fail)."
MAX_VOXELS_HELP = "Refuse inputs with more voxels than this."
#: default of ``--max-voxels``: a 512 x 512 x 2048 CT
MAX_VOXELS = 512 * 512 * 2048


def choose_model(model: Path | None, server: str | None, backend: str, device: str) -> Path | None:
    """The local model to run: ``--model``, or the small model shipped with gvsl when neither
    ``--model`` nor ``--server`` is given; None with a server. At most one of the two may be
    given, and the local backend options mean nothing with a server."""
    if model is not None and server is not None:
        raise typer.BadParameter("give --model DIR (run locally) or --server URL (a running `gvsl serve`), not both")
    if server and (backend != "auto" or device != "auto"):
        raise typer.BadParameter("--backend/--device are set on `gvsl serve`, not with --server; drop them")
    if model is None and server is None:
        from gvsl.runtime.default_model import default_model_dir

        return default_model_dir()
    return model


def modality_option(text: str) -> str | None:
    """``--modality``: auto, ct, mr, none, or ``model`` (None: the model's own setting)."""
    from gvsl.runtime.preprocess import MODALITIES

    if text == "model":
        return None
    if text not in MODALITIES:
        raise typer.BadParameter(f"--modality must be one of {', '.join(MODALITIES)} or model, got {text!r}")
    return text


def register_modality_option(text: str) -> str | tuple[str | None, str | None] | None:
    """``gvsl register --modality``: one setting for both images, or ``FIXED,MOVING``
    (``mr,ct``) for a cross-modal pair whose modalities ``auto`` cannot decide."""
    parts = text.split(",")
    if len(parts) == 1:
        return modality_option(text)
    if len(parts) != 2:
        raise typer.BadParameter(f"--modality takes one setting or FIXED,MOVING (e.g. mr,ct), got {text!r}")
    fixed, moving = (modality_option(part.strip()) for part in parts)
    return fixed, moving


def failure_line(e: BaseException) -> str:
    """Why one input of a batch failed, in one line of at most 300 characters: the message
    alone for the project's input errors (they say what to do), prefixed by the exception
    type for anything else."""
    from gvsl.runtime.errors import GvslInputError

    msg = " ".join(str(e).split()) or type(e).__name__
    msg = msg if len(msg) <= 300 else msg[:297] + "..."
    return msg if isinstance(e, GvslInputError) else f"{type(e).__name__}: {msg}"
