"""The default model shipped inside gvsl (``gvsl/assets/default``).

``gvsl embed`` / ``gvsl register`` without ``--model`` use it, so a new user
gets a result from one command. It is a small GVSL trained by the project
itself on synthetic subjects made from the MNI ICBM152 2009a brain template
(provenance: ``gvsl/assets/default/PROVENANCE.md``); it is a starting point
for brain MR (it works at 4 mm), not a substitute for the official checkpoint
(``--model GVSL_epoch_1000.pth`` after ``gvsl export``) or a model trained on
the user's own scans. Resolving it reads package files only: nothing is ever
downloaded.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from .errors import GvslInputError

__all__ = ["default_model_dir", "resolve_model", "sample_volume"]

_FILES = ("encoder.onnx", "registration.onnx", "manifest.json")


def default_model_dir() -> Path:
    """Folder of the shipped export (encoder.onnx, registration.onnx, model.safetensors ...)."""
    root = Path(str(resources.files("gvsl"))) / "assets" / "default"
    missing = [f for f in _FILES if not (root / f).is_file()]
    if missing:
        raise GvslInputError(
            f"{root}: the default model is not installed ({', '.join(missing)} missing); reinstall gvsl or pass "
            "--model with an export folder",
            str(root),
        )
    return root


def resolve_model(model: str | Path | None) -> Path:
    """``model`` as given, or the shipped default when it is None."""
    return Path(model) if model is not None else default_model_dir()


def sample_volume() -> Path:
    """The bundled real sample (MNI ICBM152 2009a T1 at 2 mm; licence in ``assets/sample/NOTICE.md``):
    the demo's input and the default int8 calibration volume."""
    path = Path(str(resources.files("gvsl"))) / "assets" / "sample" / "mni152_2009a_t1_2mm.nii.gz"
    if not path.is_file():
        raise GvslInputError(f"{path}: the bundled sample volume is not installed; reinstall gvsl", str(path))
    return path
