"""Parity of exported graphs with PyTorch, run on ONNX Runtime (CPU).

The reference is always the float32 PyTorch model with its default
``grid_sample`` warp, so a check covers everything the export changed at
once: tracing, graph simplification, the gather-based warp and the precision.

Criteria (per output, worst sample):

* fp32: ``max |onnx - torch| <= 1e-4 * max(max |torch|, floor)``; the floor
  (1 voxel for ``dvf``, 1 for ``affine``, 1e-3 otherwise) keeps outputs that
  are legitimately near zero from turning float noise into a failure;
* fp16: cosine similarity of every output with PyTorch's >= 0.999 (the
  embedding criterion, applied to all outputs) and relative error <= 2e-2.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gvsl.export.errors import ExportError
from gvsl.runtime import artifact

FP32_RTOL = 1e-4
LOW_COSINE = 0.999
LOW_RTOL = 2e-2
_FLOORS = {"dvf": 1.0, "affine": 1.0}
DEFAULT_VERIFY_SHAPES: tuple[tuple[int, int, int, int], ...] = ((2, 32, 32, 32), (1, 16, 32, 48))


@dataclass
class OutputParity:
    max_abs: float
    rel: float
    cosine: float


@dataclass
class ParityResult:
    """One comparison: a graph on one input set."""

    graph: str
    precision: str
    inputs: str  # "random" | "volume:NAME[,NAME]"
    shape: list[int]  # [N, 1, D, H, W]
    outputs: dict[str, OutputParity] = field(default_factory=dict)
    passed: bool = True
    failure: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Worst per-sample cosine similarity of the flattened outputs."""
    a64 = a.reshape(a.shape[0], -1).astype(np.float64)
    b64 = b.reshape(b.shape[0], -1).astype(np.float64)
    num = (a64 * b64).sum(1)
    den = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    cos = np.where(den > 0, num / np.maximum(den, 1e-300), np.where(np.abs(a64).max(1) == np.abs(b64).max(1), 1.0, 0.0))
    return float(cos.min())


def compare(name: str, got: np.ndarray, ref: np.ndarray, precision: str) -> tuple[OutputParity, str]:
    """Metrics of one output and, if it fails the criterion, why (else "")."""
    if got.shape != ref.shape:
        return OutputParity(float("inf"), float("inf"), 0.0), f"{name}: shape {got.shape} != PyTorch {ref.shape}"
    diff = float(np.abs(got.astype(np.float64) - ref).max()) if ref.size else 0.0
    scale = max(float(np.abs(ref).max()) if ref.size else 0.0, _FLOORS.get(name, 1e-3))
    rel = diff / scale
    cos = _cosine(got, ref)
    par = OutputParity(diff, rel, cos)
    if not np.isfinite(got).all():
        return par, f"{name}: non-finite values"
    if precision == "fp32":
        if rel > FP32_RTOL:
            return par, f"{name}: max abs error {diff:.3g} is {rel:.3g} relative (> {FP32_RTOL:g})"
    elif cos < LOW_COSINE or rel > LOW_RTOL:
        return par, f"{name}: cosine {cos:.6f} (need >= {LOW_COSINE}), relative error {rel:.3g} (need <= {LOW_RTOL:g})"
    return par, ""


def reference(model: Any, kind: str, inputs: Sequence[np.ndarray], dense: bool = True) -> list[np.ndarray]:
    """PyTorch float32 outputs of graph ``kind`` (default ``grid_sample`` warp)."""
    xs = [torch.from_numpy(np.ascontiguousarray(x)) for x in inputs]
    with torch.no_grad():
        if kind == artifact.ENCODER:
            glob, local = model.encode(xs[0])
            outs = [glob.mean(dim=(2, 3, 4))] + ([local] if dense else [])
        else:
            outs = list(model.register(xs[0], xs[1]))
    return [o.float().numpy() for o in outs]


def random_inputs(kind: str, shape: Sequence[int], seed: int = 0) -> list[np.ndarray]:
    """Uniform [0, 1) volumes (the range preprocessing produces) for each graph input."""
    rng = np.random.default_rng(seed)
    n_in = len(artifact.ENCODER_INPUTS if kind == artifact.ENCODER else artifact.REGISTRATION_INPUTS)
    return [rng.random((shape[0], 1, *shape[1:]), dtype=np.float32) for _ in range(n_in)]


def volume_inputs(kind: str, volumes: Sequence[np.ndarray], spatial: Sequence[int]) -> list[np.ndarray]:
    """Real preprocessed volumes, centre-cropped/padded to ``spatial``; registration pairs
    volume i with volume i+1 (a single volume is paired with itself shifted by 3 voxels)."""
    crops = [_fit(v, spatial) for v in volumes]
    if kind == artifact.ENCODER:
        return [np.stack(crops)[:, None]]
    moving = crops[1:] + crops[:1] if len(crops) > 1 else [np.roll(crops[0], (3, -2, 1), axis=(0, 1, 2))]
    return [np.stack(crops)[:, None], np.stack(moving)[:, None]]


def _fit(vol: np.ndarray, spatial: Sequence[int]) -> np.ndarray:
    out = np.zeros(tuple(spatial), dtype=np.float32)
    src, dst = [], []
    for n, t in zip(vol.shape, spatial, strict=True):
        if n >= t:
            a = (n - t) // 2
            src.append(slice(a, a + t))
            dst.append(slice(0, t))
        else:
            a = (t - n) // 2
            src.append(slice(0, n))
            dst.append(slice(a, a + n))
    out[tuple(dst)] = vol[tuple(src)]
    return out


def run_onnx(path: str | Path, inputs: Sequence[np.ndarray], session: Any = None) -> list[np.ndarray]:
    """Run an exported graph on ONNX Runtime CPU (inputs in graph input order)."""
    import onnxruntime as ort

    sess = session or ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return sess.run(None, dict(zip(names, inputs, strict=True)))


def verify_onnx(
    path: str | Path,
    model: Any,
    kind: str,
    precision: str,
    *,
    dense: bool = True,
    shapes: Sequence[Sequence[int]] = DEFAULT_VERIFY_SHAPES,
    volumes: Sequence[tuple[str, np.ndarray]] = (),
    seed: int = 0,
) -> list[ParityResult]:
    """Compare ``path`` with PyTorch on random inputs at each ``shapes`` entry
    (``[N, D, H, W]``) and on ``volumes`` (at the first shape's spatial size).
    Returns every result; :func:`raise_on_failure` turns failures into an error."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    cases: list[tuple[str, list[np.ndarray]]] = []
    for i, shp in enumerate(shapes):
        cases.append(("random", random_inputs(kind, shp, seed + i)))
    if volumes:
        names = ",".join(n for n, _ in volumes)
        cases.append((f"volume:{names}", volume_inputs(kind, [v for _, v in volumes], shapes[0][1:])))
    results = []
    for label, inputs in cases:
        got = run_onnx(path, inputs, sess)
        ref = reference(model, kind, inputs, dense)
        res = ParityResult(Path(path).name, precision, label, list(inputs[0].shape))
        out_names = [o.name for o in sess.get_outputs()]
        for name, g, r in zip(out_names, got, ref, strict=True):
            par, why = compare(name, g, r, precision)
            res.outputs[name] = par
            if why and res.passed:
                res.passed, res.failure = False, why
        results.append(res)
    return results


def raise_on_failure(results: Sequence[ParityResult]) -> None:
    """Raise :class:`ExportError` naming the first failed comparison."""
    for r in results:
        if not r.passed:
            raise ExportError(
                f"{r.graph}: parity with PyTorch failed on {r.inputs} input {tuple(r.shape)}: {r.failure}; "
                "nothing was written (report this with the command line)"
            )


__all__ = [
    "DEFAULT_VERIFY_SHAPES",
    "FP32_RTOL",
    "LOW_COSINE",
    "OutputParity",
    "ParityResult",
    "compare",
    "raise_on_failure",
    "random_inputs",
    "reference",
    "run_onnx",
    "verify_onnx",
    "volume_inputs",
]
