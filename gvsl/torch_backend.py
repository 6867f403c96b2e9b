"""The PyTorch backend of the runtime: the trained model itself, for development and parity checks.

It lives in gvsl core because it needs torch and :mod:`gvsl.io`; importing this
module registers it as ``torch`` with the runtime's backend registry, so
``load_backend(model, kind, "torch")`` (and ``auto`` for a trained model
folder / ``.safetensors`` / ``.pth``) works wherever it has been imported.
torch itself is imported only when a torch backend is created, so importing
this module stays cheap for the torch-free CLI.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from gvsl.runtime import artifact
from gvsl.runtime.backends import DEFAULT_PATCH, Backend, ModelInfo, register_backend
from gvsl.runtime.backends.base import GRAPH_IO, check_device
from gvsl.runtime.errors import GvslInputError
from gvsl.runtime.preprocess import PreprocessConfig


class TorchBackend(Backend):
    """The PyTorch model (development and parity). Imports torch; ``run`` is thread-safe
    because inference mode changes no module state."""

    def __init__(self, path: str | os.PathLike[str], kind: str, device: str = "auto", *, threads: int = 0, **_: Any):
        try:
            import torch
        except ImportError:
            raise GvslInputError("--backend torch needs PyTorch: pip install 'gvsl[train]'") from None
        from gvsl.io import WeightsError, load_model

        device = check_device(device)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise GvslInputError(f"--device {device}: torch sees no CUDA GPU; use --device cpu")
        if threads:
            torch.set_num_threads(int(threads))
        try:
            model, meta = load_model(path, map_location=device)
        except WeightsError as e:
            raise GvslInputError(str(e), str(path)) from None
        self.torch = torch
        self.model = model.eval()
        self.device = torch.device(device)
        pre = PreprocessConfig.from_dict(meta.get("preprocess") or {})
        patch = tuple(int(p) for p in (meta.get("patch_size") or DEFAULT_PATCH))
        self.info = ModelInfo(
            kind=kind,
            path=str(path),
            model=dict(meta["model"]),
            preprocess=pre,
            patch_size=patch,  # type: ignore[arg-type]
            dense=True,
            precision="fp32",
            warp="torch",
            # model.json's block (gvsl embed-stats); the Embedder standardises with it
            extra={"embedding_stats": meta.get("embedding_stats")},
        )
        self.name = f"torch[{self.device.type}]"

    @property
    def output_names(self) -> tuple[str, ...]:
        return GRAPH_IO[self.info.kind][1]

    def run(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        want = self._check_outputs(outputs)
        torch = self.torch
        t = {
            n: torch.from_numpy(np.ascontiguousarray(inputs[n], dtype=np.float32)).to(self.device)
            for n in self.input_names
        }
        with torch.inference_mode():
            if self.info.kind == artifact.ENCODER:
                fg, fl = self.model.encode(t["image"])
                res = {"embedding": fg.mean(dim=(2, 3, 4)), "features": fl}
            else:
                affine, dvf, warped = self.model.register(t["fixed"], t["moving"])
                res = {"affine": affine, "dvf": dvf, "warped": warped}
            return {n: res[n].float().cpu().numpy() for n in want}

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]


register_backend("torch", TorchBackend, ("torch",))

__all__ = ["TorchBackend"]
