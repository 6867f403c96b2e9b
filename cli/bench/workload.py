"""The model under test, its ONNX exports and the network inputs every backend shares.

:class:`BenchSetup` turns whatever model the user gives (a trained model, an
official ``.pth``, an export folder, or nothing: random weights, since speed
does not depend on weights) into what each backend runner needs, once.
:func:`smooth_ct_cube` and :func:`random_model_export` are the inputs and the
model of the runtime and serving benchmarks in ``benchmarks/``.
"""

from __future__ import annotations

import importlib.util
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gvsl.cli.bench.machine import Unavailable

__all__ = ["BenchSetup", "random_model_export", "smooth_ct_cube"]


def _real_volumes() -> dict[str, Path]:
    """nilearn's MNI templates (real anatomy, shipped with the package) when installed."""
    spec = importlib.util.find_spec("nilearn")  # located, not imported: nilearn pulls in sklearn
    if spec is None or not spec.submodule_search_locations:
        return {}
    base = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    out = {}
    for kind in ("t1", "gm", "wm"):
        p = base / f"mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz"
        if p.is_file():
            out[kind] = p
    return out


def _synthetic_volume(shape: Sequence[int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Smooth random 'anatomy' on a 1 mm grid when no real volume is at hand."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    x = ndimage.gaussian_filter(rng.normal(size=tuple(shape)).astype(np.float32), 3)
    return (x - x.min()) / (np.ptp(x) + 1e-6) * 200.0, np.eye(4)


def _windows(vol: np.ndarray, size: int, count: int, seed: int) -> list[np.ndarray]:
    """``count`` crops of ``size``^3 (zero-padded where the volume is smaller)."""
    rng = np.random.default_rng(seed)
    pad = [(0, max(0, size - s)) for s in vol.shape]
    v = np.pad(vol, pad) if any(p[1] for p in pad) else vol
    out = []
    for _ in range(count):
        o = [int(rng.integers(0, s - size + 1)) for s in v.shape]
        out.append(np.ascontiguousarray(v[o[0] : o[0] + size, o[1] : o[1] + size, o[2] : o[2] + size]))
    return out


@dataclass
class BenchSetup:
    """The model under test, its exports and the inputs, shared by every backend.

    ``model`` is a trained model folder / ``.safetensors`` / official ``.pth``
    (torch; ONNX exported into ``workdir`` on demand) or an export folder (ONNX
    only: no torch backends, so no torch ratio). Without ``model`` a randomly
    initialised GVSL of ``widths`` is used: speed does not depend on weights.
    """

    model: str | None = None
    widths: str = "default"
    device: str = "cpu"
    patch: int = 128
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="gvsl-bench-")))
    calibration: tuple[str, ...] = ()
    eval_volumes: tuple[str, ...] = ()
    threads: int = 0
    log: Callable[[str], None] = print
    _torch_model: Any = None
    _model_dir: Path | None = None
    _export_dir: Path | None = None
    _export_fp16: bool = False
    _info: dict[str, Any] | None = None

    # -- the model -------------------------------------------------------------
    def model_dir(self) -> Path:
        """A torch model (folder or file); made from random weights when none is given."""
        if self._model_dir is None:
            if self.model and self.is_export(Path(self.model)):
                raise Unavailable("the model is an ONNX export: torch backends need the trained model")
            if self.model:
                self._model_dir = Path(self.model)
            else:
                import torch

                from gvsl.config import ModelConfig
                from gvsl.io import save_model
                from gvsl.model import GVSL
                from gvsl.runtime.preprocess import PreprocessConfig

                torch.manual_seed(0)
                cfg = ModelConfig.from_preset(self.widths)
                # MR normalisation: the bundled real volumes are MR templates
                pre = PreprocessConfig(spacing=(1.0, 1.0, 1.0), modality="mr")
                self._model_dir = save_model(
                    GVSL(cfg), self.workdir / "model", preprocess=pre.to_dict(), extra={"patch_size": [self.patch] * 3}
                )
        return self._model_dir

    @staticmethod
    def is_export(p: Path) -> bool:
        """Whether ``p`` is an ONNX export (a graph or a folder of them) rather than a torch model."""
        return p.suffix == ".onnx" or (p.is_dir() and (p / "encoder.onnx").is_file())

    def export_dir(self, fp16: bool = False) -> Path:
        """ONNX graphs of the model (``gvsl export``, fp32 + fp16 when asked)."""
        if self.model and self.is_export(Path(self.model)):
            p = Path(self.model)
            return p if p.is_dir() else p.parent
        if self._export_dir is None or (fp16 and not self._export_fp16):
            from gvsl.export.pipeline import ExportOptions, run_export

            out = self.workdir / ("export_fp16" if fp16 else "export")
            precisions = ("fp32", "fp16") if fp16 else ("fp32",)
            self.log(f"exporting ONNX ({', '.join(precisions)}) to {out}")
            run_export(self.model_dir(), out, ExportOptions(precisions=precisions, verify=False, force=True))
            self._export_dir, self._export_fp16 = out, fp16
        return self._export_dir

    def info(self) -> dict[str, Any]:
        """ModelConfig dict, preprocessing and patch, from whichever form the model has."""
        if self._info is None:
            if self._export_dir is not None or (self.model and self.is_export(Path(self.model))):
                from gvsl.runtime.backends import load_backend  # ONNX metadata: no torch import

                b = load_backend(self.export_dir(), "encoder", "onnxruntime", "cpu")
                self._info = {"model": b.info.model, "preprocess": b.info.preprocess, "patch": b.info.patch_size}
                b.close()
            else:
                model, meta = self._cpu_model()
                from gvsl.runtime.preprocess import PreprocessConfig

                patch = tuple(meta.get("patch_size") or (self.patch,) * 3)
                pre = PreprocessConfig.from_dict(meta.get("preprocess") or {})
                self._info = {"model": model.config.to_dict(), "preprocess": pre, "patch": patch}
        return self._info

    def _cpu_model(self) -> tuple[Any, dict[str, Any]]:
        if self._torch_model is None:
            import torch

            from gvsl.io import load_model

            model, self._meta = load_model(self.model_dir(), map_location="cpu")
            self._torch_model = model.eval()
            if self.threads:
                torch.set_num_threads(self.threads)
        return self._torch_model, self._meta

    def torch_model(self) -> Any:
        """The fp32 eval model on the bench device (loaded once)."""
        model, _ = self._cpu_model()
        dev = self.torch_device()
        if next(model.parameters()).device != dev:
            self._torch_model = model.to(dev)
        return self._torch_model

    def torch_device(self) -> Any:
        import torch

        dev = "cuda" if self.device.startswith("cuda") else "cpu"
        if dev == "cuda" and not torch.cuda.is_available():
            raise Unavailable("torch sees no CUDA GPU")
        return torch.device(self.device if dev == "cuda" else "cpu")

    # -- inputs ----------------------------------------------------------------
    def _preprocessed(self, paths: Sequence[str | Path]) -> list[np.ndarray]:
        from gvsl.runtime.preprocess import load_volume, preprocess

        pre = self.info()["preprocess"]
        return [preprocess(load_volume(p), pre).data for p in paths]

    def inputs(self, kind: str, batch: int, size: int) -> list[np.ndarray]:
        """Network inputs: crops of real volumes (held out from int8 calibration), or of
        synthetic ones when none is available. Registration: (fixed, shifted moving)."""
        vols = self._preprocessed(self.eval_volumes or [v for k, v in _real_volumes().items() if k != "t1"])
        if not vols:
            vols = [_synthetic_volume((size + 32,) * 3, 0)[0] / 200.0]
        crops = []
        for i in range(batch):
            crops += _windows(vols[i % len(vols)], size, 1, seed=1000 * size + i)
        x = np.stack(crops)[:, None].astype(np.float32)
        if kind == "encoder":
            return [x]
        return [x, np.ascontiguousarray(np.roll(x, (3, -2, 2), axis=(2, 3, 4)))]

    def calibration_volumes(self) -> list[Any]:
        """Volumes for int8 calibration: ``calibration`` or nilearn's MNI T1 template."""
        if self.calibration:
            return list(self.calibration)
        t1 = _real_volumes().get("t1")
        if t1 is None:
            raise Unavailable("int8 needs calibration volumes (--int8-calibration) or nilearn's MNI template")
        return [str(t1)]


def smooth_ct_cube(size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A smooth random 'CT' in HU, ``size``^3 on a 1 mm grid (the spacing of
    :func:`random_model_export`'s model, so the runtime does not resample), and its affine."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    x = ndimage.gaussian_filter(rng.normal(size=(size, size, size)).astype(np.float32), 3)
    x = (x / (x.std() + 1e-6) * 300.0).astype(np.float32)
    aff = np.eye(4)
    aff[:3, 3] = -size / 2
    return x, aff


def random_model_export(widths: str, patch: int, workdir: Path) -> tuple[Path, Path]:
    """(model folder, export folder) of a randomly initialised GVSL (seed 0; speed does not
    depend on the weights) at 1 mm CT preprocessing, exported by ``gvsl export`` unverified."""
    import torch

    from gvsl.config import ModelConfig
    from gvsl.export.pipeline import ExportOptions, run_export
    from gvsl.io import save_model
    from gvsl.model import GVSL
    from gvsl.runtime.preprocess import PreprocessConfig

    torch.manual_seed(0)
    pre = PreprocessConfig(spacing=(1.0, 1.0, 1.0), modality="ct")
    model = save_model(
        GVSL(ModelConfig.from_preset(widths)), workdir / "model", preprocess=pre.to_dict(),
        extra={"patch_size": [patch] * 3},
    )  # fmt: skip
    run_export(model, workdir / "export", ExportOptions(verify=False))
    return model, workdir / "export"
