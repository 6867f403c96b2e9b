"""int8 copies of the encoder for ONNX Runtime on the CPU (static QDQ quantisation, no torch).

Calibration runs the model's own preprocessing and the Embedder's sliding
windows on real volumes, so the activation ranges are those inference sees.
Quantised graphs are cached by the fp32 file's and the calibration windows'
sha256.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import artifact
from ..errors import GvslInputError
from ..io import atomic_write, read_volume
from ..padding import pad_to_multiple
from ..preprocess import preprocess
from ..windows import SIZE_MULTIPLE, window_slices
from .base import ModelInfo, cache_folder, file_sha256
from .model_files import info_from_metadata, read_onnx_metadata, resolve_model_file


def calibration_windows(info: ModelInfo, volumes: Sequence[Any], max_windows: int = 8) -> list[np.ndarray]:
    """Network inputs ``[1, 1, D, H, W]`` for int8 calibration: each volume (path,
    DICOM folder, ``(array, affine)``, Volume, or an already preprocessed 5-D
    array) preprocessed with the model's own settings and cut into the same
    sliding windows the Embedder runs, at most ``max_windows`` in all."""

    out: list[np.ndarray] = []
    for v in volumes:
        if isinstance(v, np.ndarray) and v.ndim == 5:
            out += [np.ascontiguousarray(b[None], dtype=np.float32) for b in v]
            continue
        data, _ = pad_to_multiple(preprocess(read_volume(v), info.preprocess).data, SIZE_MULTIPLE)
        _, slices = window_slices(data.shape, info.patch_size, 0.5)
        out += [np.ascontiguousarray(data[s], dtype=np.float32)[None, None] for s in slices]
    if not out:
        raise GvslInputError("int8 calibration needs at least one volume")
    if len(out) > max_windows:  # spread the kept windows over all volumes
        out = [out[i] for i in np.linspace(0, len(out) - 1, max_windows).round().astype(int)]
    return out


def quantize_int8(
    model: str | os.PathLike[str],
    out: str | os.PathLike[str],
    calibration: Sequence[Any],
    kind: str = artifact.ENCODER,
) -> Path:
    """Write an int8 copy of a gvsl fp32 graph for ONNX Runtime on CPU; returns ``out``.

    Static QDQ quantisation (onnxruntime.quantization, no torch): convolution
    weights int8 per output channel, activations uint8 per tensor with ranges
    from ``calibration`` (volumes as for :func:`calibration_windows`: real
    scans preprocessed like training, not random noise). Only convolutions are
    quantised; GroupNorm, pooling, resizing and the pooled embedding stay fp32.
    On x86 CPUs with VNNI, ORT's int8 convolutions run at several times the fp32
    rate. Lossy: check the embedding cosine to fp32 on your data
    (``gvsl bench`` reports it). The gvsl metadata is kept, precision ``int8``.
    """

    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    src, fmt = resolve_model_file(model, kind)
    if fmt != "onnx":
        raise GvslInputError(f"{src}: int8 needs the fp32 ONNX export (gvsl export), not a torch model", str(src))
    info = info_from_metadata(read_onnx_metadata(src), src, kind)
    if info.precision != "fp32":
        raise GvslInputError(f"{src}: int8 is made from the fp32 graph, this one is {info.precision}", str(src))
    if kind != artifact.ENCODER:
        raise GvslInputError("int8 is offered for the encoder (embeddings) only; registration stays fp32")
    windows = calibration_windows(info, calibration)

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(windows)

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self._it, None)
            return None if x is None else {"image": x}

    import logging

    def write(tmp: str) -> None:
        quantize_static(
            str(src),
            tmp,
            _Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["Conv"],
            calibrate_method=CalibrationMethod.MinMax,
        )
        proto = onnx.load(tmp)
        meta = read_onnx_metadata(src)
        meta[artifact.META_PRECISION] = "int8"
        del proto.metadata_props[:]
        for k, v in meta.items():
            proto.metadata_props.add(key=k, value=v)
        onnx.save(proto, tmp)

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantiser's "consider pre-processing" warnings on the root logger
    try:
        return atomic_write(Path(out), write)
    finally:
        root.setLevel(level)


def int8_model(path: Path, kind: str, calibration: Sequence[Any], cache_dir: Any) -> Path:
    """The int8 graph for ``path`` and this calibration set, quantised once and cached
    (key: the fp32 file's and the calibration windows' sha256)."""
    src, _ = resolve_model_file(path, kind)
    info = info_from_metadata(read_onnx_metadata(src), src, kind)
    if info.precision == "int8":
        return src
    windows = calibration_windows(info, calibration)
    h = hashlib.sha256(file_sha256(src).encode())
    for w in windows:
        h.update(w.tobytes())
    out = cache_folder(cache_dir) / "int8" / f"{src.stem}-{h.hexdigest()[:24]}.onnx"
    if not out.is_file():
        quantize_int8(src, out, windows, kind)
    return out


__all__ = ["calibration_windows", "int8_model", "quantize_int8"]
