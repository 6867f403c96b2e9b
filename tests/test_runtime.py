"""gvsl.runtime: backends, Embedder (parity, geometry, sliding windows), DICOM, bad input,
threads, torch-free import and the `gvsl embed` command.

The ONNX model is a tiny GVSL exported once per session with ``gvsl.export``;
volumes are the MNI template at 4 mm (conftest), so everything runs on CPU in
seconds.
"""

from __future__ import annotations

import gzip
import locale
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from gvsl.cli.main import app
from gvsl.runtime import GvslInputError
from gvsl.runtime.backends import Backend, ModelInfo, OnnxRuntimeBackend, load_backend
from gvsl.runtime.embed import Embedder, gaussian_weight, window_starts
from gvsl.runtime.io import list_inputs, read_volume
from gvsl.runtime.preprocess import PreprocessConfig, load_volume, pad_to_multiple, preprocess
from gvsl.torch_backend import TorchBackend

PATCH = (32, 32, 32)
PRE = PreprocessConfig(spacing=(4.0, 4.0, 4.0), modality="mr")
runner = CliRunner()


# ----------------------------------------------------------------------------- fixtures
def tiny_artifacts(base: Path) -> tuple[Path, Path]:
    """(trained-format model folder, export folder) of a random tiny GVSL, made once per
    session and shared by every runtime test module."""
    import torch

    from gvsl.config import ModelConfig
    from gvsl.export.pipeline import ExportOptions, run_export
    from gvsl.io import save_model
    from gvsl.model import GVSL

    model_dir, export_dir = base / "tiny_model", base / "tiny_export"
    if not (export_dir / "manifest.json").is_file():
        torch.manual_seed(0)
        net = GVSL(ModelConfig.from_preset("tiny"))
        save_model(net, model_dir, preprocess=PRE.to_dict(), extra={"patch_size": list(PATCH)})
        run_export(model_dir, export_dir, ExportOptions(verify=False))
    return model_dir, export_dir


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    return tiny_artifacts(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def embedder(tiny) -> Embedder:
    return Embedder(tiny[1], backend="onnxruntime", device="cpu")


@pytest.fixture(scope="session")
def torch_embedder(tiny) -> Embedder:
    return Embedder(tiny[0], backend="torch", device="cpu")


def _aff(spacing=(4.0, 4.0, 4.0), origin=(-80.0, -110.0, -56.0)) -> np.ndarray:
    a = np.diag([*spacing, 1.0])
    a[:3, 3] = origin
    return a


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


@pytest.fixture(scope="session")
def t1(mni_small_arrays) -> np.ndarray:
    return mni_small_arrays["t1"].astype(np.float32)  # 40 x 48 x 40 at 4 mm


# ----------------------------------------------------------------------------- backends
def test_backends_read_the_artifact(tiny):
    model_dir, export_dir = tiny
    ort = load_backend(export_dir, "encoder", "auto", "cpu")
    assert isinstance(ort, OnnxRuntimeBackend) and ort.name == "onnxruntime[CPU]"
    assert ort.info.patch_size == PATCH and ort.info.preprocess == PRE
    assert ort.info.kind == "encoder" and ort.output_names == ("embedding", "features")
    assert ort.info.embedding_dim == 32 and ort.info.feature_dim == 8
    reg = load_backend(export_dir / "registration.onnx", "registration", "onnxruntime", "cpu")
    assert reg.output_names == ("affine", "dvf", "warped")
    tb = load_backend(model_dir, "encoder", "auto", "cpu")
    assert isinstance(tb, TorchBackend) and tb.info.patch_size == PATCH and tb.info.preprocess == PRE
    x = np.random.default_rng(0).random((2, 1, 16, 32, 16), dtype=np.float32)
    a, b = ort.run({"image": x}), tb.run({"image": x})
    assert a["embedding"].shape == (2, 32) and a["features"].shape == (2, 8, 16, 32, 16)
    np.testing.assert_allclose(a["embedding"], b["embedding"], atol=1e-4)
    np.testing.assert_allclose(a["features"], b["features"], atol=1e-3)


def test_backend_options_are_checked(tiny):
    _, export_dir = tiny
    with pytest.raises(GvslInputError, match="--backend nope"):
        load_backend(export_dir, "encoder", "nope")
    with pytest.raises(GvslInputError, match="--device tpu"):
        load_backend(export_dir, "encoder", "onnxruntime", "tpu")
    with pytest.raises(GvslInputError, match="no CUDA support|CUDA"):
        load_backend(export_dir, "encoder", "onnxruntime", "cuda")  # this machine has CPU onnxruntime only
    with pytest.raises(GvslInputError, match="needs the trained model"):
        load_backend(export_dir, "encoder", "torch")
    with pytest.raises(GvslInputError, match="needs an ONNX export"):
        load_backend(tiny[0], "encoder", "onnxruntime")


def _cuda_available() -> bool:
    import shutil

    return (
        shutil.which("nvidia-smi") is not None
        and subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0
    )


@pytest.mark.gpu
def test_tensorrt_backend_matches_onnxruntime_and_pools_contexts(tiny, tmp_path):
    """Native TensorRT (engine built from the ONNX, cached, one context per concurrent
    caller) gives ONNX Runtime's numbers, also from 4 threads at once."""
    pytest.importorskip("tensorrt")
    if not _cuda_available():
        pytest.skip("no CUDA GPU")
    _, export_dir = tiny
    rng = np.random.default_rng(0)
    xs = [rng.random((1, 1, 32, 32, s), dtype=np.float32) for s in (16, 32)]
    ort_enc = load_backend(export_dir, "encoder", "onnxruntime", "cpu")
    trt_enc = load_backend(export_dir, "encoder", "tensorrt", "cuda", cache_dir=tmp_path, max_contexts=2)
    ref = [ort_enc.run({"image": x}) for x in xs]
    for x, r in zip(xs, ref, strict=True):
        got = trt_enc.run({"image": x})
        np.testing.assert_allclose(got["embedding"], r["embedding"], atol=1e-3)
        np.testing.assert_allclose(got["features"], r["features"], atol=1e-2)
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for i in range(10):
                x = xs[(k + i) % 2]
                got = trt_enc.run({"image": x}, ["embedding"])["embedding"]
                np.testing.assert_allclose(got, ref[(k + i) % 2]["embedding"], atol=1e-3)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[0]
    assert trt_enc._made <= 2  # the pool never exceeds max_contexts
    assert list(tmp_path.glob("trt/*.engine"))  # engine cached on disk
    reg_trt = load_backend(export_dir, "registration", "tensorrt", "cuda", cache_dir=tmp_path, max_shape=(64, 64, 64))
    reg_ort = load_backend(export_dir, "registration", "onnxruntime", "cpu")
    f, m = xs[1], np.roll(xs[1], 2, axis=2)
    a, b = reg_trt.run({"fixed": f, "moving": m}), reg_ort.run({"fixed": f, "moving": m})
    np.testing.assert_allclose(a["affine"], b["affine"], atol=1e-3)
    np.testing.assert_allclose(a["dvf"], b["dvf"], atol=1e-2)
    trt_enc.close()


@pytest.mark.gpu
def test_onnxruntime_gpu_providers(tiny):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers() or not _cuda_available():
        pytest.skip("onnxruntime-gpu with a CUDA GPU needed")
    _, export_dir = tiny
    gpu = load_backend(export_dir, "encoder", "onnxruntime", "cuda", trt_ep=False)
    assert gpu.providers[0] == "CUDAExecutionProvider"
    x = np.random.default_rng(0).random((1, 1, 32, 32, 32), dtype=np.float32)
    cpu = load_backend(export_dir, "encoder", "onnxruntime", "cpu")
    np.testing.assert_allclose(gpu.run({"image": x})["embedding"], cpu.run({"image": x})["embedding"], atol=1e-3)


# ----------------------------------------------------------------------------- bad models
def _onnx_without_gvsl_metadata(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["image"], ["embedding"])], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _put(path: Path, content: bytes | str) -> Path:
    if isinstance(content, str):
        path.write_text(content)
    else:
        path.write_bytes(content)
    return path


BAD_MODELS = {
    "missing": (lambda d: d / "nope", "not found"),
    "text_named_onnx": (lambda d: _put(d / "m.onnx", "hello"), "not a readable ONNX"),
    "empty_onnx": (lambda d: _put(d / "e.onnx", b""), "empty"),
    "foreign_onnx": (lambda d: _onnx_without_gvsl_metadata(d / "other.onnx"), "not a gvsl artifact"),
    "nifti_as_model": (lambda d: _save(d / "x.nii.gz", np.ones((4, 4, 4), np.float32), np.eye(4)), "not a gvsl model"),
    "empty_folder": (lambda d: (d / "f").mkdir() or d / "f", "not a gvsl model folder"),
    "corrupt_safetensors": (lambda d: _put(d / "m.safetensors", b"\x00" * 64), "safetensors"),
}


@pytest.mark.parametrize("case", sorted(BAD_MODELS))
def test_bad_model_is_one_clear_line(tmp_path, case):
    make, what = BAD_MODELS[case]
    path = make(tmp_path)
    backend = "torch" if case == "corrupt_safetensors" else "auto"
    with pytest.raises(GvslInputError) as info:
        Embedder(path, backend=backend, device="cpu")
    msg = str(info.value)
    assert path.name in msg and what in msg and "\n" not in msg


def test_wrong_graph_kind_is_named(tiny):
    _, export_dir = tiny
    with pytest.raises(GvslInputError, match=r"registration\.onnx: is a gvsl registration graph.*encoder"):
        Embedder(export_dir / "registration.onnx", device="cpu")


# ----------------------------------------------------------------------------- embedding
def test_embedding_parity_with_pytorch_through_preprocessing(tmp_path, t1, tiny, embedder):
    """ONNX Runtime through the runtime == the PyTorch model on the same preprocessing and
    windows, on a real volume stored LAS at 2 x 3 x 4 mm (resampled to 4 mm)."""
    import torch

    from gvsl.io import load_model

    vol = t1[4:36, 4:44, 6:34]  # 32 x 40 x 28 at 4 mm
    big = np.repeat(np.repeat(vol, 2, axis=0), 4, axis=1)[:, ::3]  # 64 x 54 x 28 on a 2 x 3 x 4 mm grid
    aff = _aff((-2.0, 3.0, 4.0), (60.0, -100.0, -40.0))
    path = _save(tmp_path / "las.nii.gz", big[::-1].copy(), aff)
    res = embedder.embed(path)
    pre = preprocess(load_volume(path), PRE)
    padded, _ = pad_to_multiple(pre.data)
    _, slices = embedder.windows(padded.shape)
    assert res.windows == len(slices) == 2  # padded 32 x 48 x 32: two windows along y
    model, _ = load_model(tiny[0])
    with torch.no_grad():
        ref = np.mean([model.embed(torch.from_numpy(padded[s].copy())[None, None]).numpy()[0] for s in slices], axis=0)
    np.testing.assert_allclose(res.embedding, ref, atol=1e-5, rtol=1e-4)
    torch_res = Embedder(tiny[0], backend="torch", device="cpu").embed(path)
    np.testing.assert_allclose(res.embedding, torch_res.embedding, atol=1e-5, rtol=1e-4)
    # in-memory (array, affine) gives the same as the file
    np.testing.assert_allclose(embedder.embed((big[::-1].copy(), aff)).embedding, res.embedding, atol=1e-6)


def test_single_window_embedding_is_the_models_pooled_bottleneck(t1, tiny, embedder):
    import torch

    from gvsl.io import load_model

    vol = t1[6:34, 10:38, 6:34]  # 28^3 at 4 mm -> one 32^3 window
    res = embedder.embed((vol, _aff()))
    assert res.windows == 1 and res.embedding.shape == (32,) and res.embedding.dtype == np.float32
    padded, _ = pad_to_multiple(preprocess(read_volume((vol, _aff())), PRE).data)
    model, _ = load_model(tiny[0])
    with torch.no_grad():
        ref = model.embed(torch.from_numpy(padded)[None, None]).numpy()[0]
    np.testing.assert_allclose(res.embedding, ref, atol=1e-5, rtol=1e-4)


class EchoBackend(Backend):
    """Test double: features = the input image, embedding = window mean. Makes the
    geometry of the runtime checkable without a network in the way."""

    def __init__(self, preprocess_cfg: PreprocessConfig, patch=PATCH) -> None:
        self.info = ModelInfo(
            kind="encoder",
            path="<echo>",
            model={"widths": [8, 16, 16, 32, 8, 32, 16, 16, 1]},
            preprocess=preprocess_cfg,
            patch_size=patch,
        )
        self.name = "echo"
        self.shapes: list[tuple[int, ...]] = []
        self.lock = threading.Lock()

    @property
    def output_names(self):
        return ("embedding", "features")

    def run(self, inputs, outputs=None):
        x = inputs["image"]
        with self.lock:
            self.shapes.append(x.shape)
        emb = np.repeat(x.mean(axis=(2, 3, 4)), 8, axis=1)
        return {
            k: v
            for k, v in {"embedding": emb, "features": x.copy()}.items()
            if k in (outputs or ("embedding", "features"))
        }


def _smooth_world_image(affine: np.ndarray, shape) -> np.ndarray:
    """A smooth function of world position (mm) sampled on a grid."""
    ijk = np.indices(shape).reshape(3, -1).astype(np.float64)
    x, y, z = affine[:3, :3] @ ijk + affine[:3, 3:4]
    f = 100 + 30 * np.sin(x / 23.0) + 20 * np.cos(y / 31.0 + 0.3) + 10 * np.sin(z / 17.0 + x / 53.0)
    return f.reshape(shape).astype(np.float32)


def test_dense_features_land_on_the_input_grid_anisotropic_non_ras():
    """Echo features are the preprocessed image itself, so on the input grid they must
    reproduce the input (up to the resampling round trip): this fails for any axis,
    flip, spacing or offset mistake."""
    aff = np.array(
        [[0.0, 0.0, -5.0, 70.0], [-3.0, 0.0, 0.0, 60.0], [0.0, 2.5, 0.0, -50.0], [0, 0, 0, 1]]
    )  # array axes: (-y, +z, -x), 3 x 2.5 x 5 mm: PSL storage
    shape = (30, 40, 20)
    data = _smooth_world_image(aff, shape)
    echo = EchoBackend(PreprocessConfig(spacing=(4.0, 4.0, 4.0), modality="none"), patch=(16, 16, 16))
    res = Embedder(echo, modality=None).embed((data, aff), dense=True)
    assert res.features.shape == (1, *shape)
    np.testing.assert_array_equal(res.affine, aff)
    # voxels whose centre lies inside the 4 mm grid (the rest repeat its edge)
    pre = preprocess(read_volume((data, aff)), echo.info.preprocess)
    m = np.linalg.inv(pre.affine) @ aff
    p = m[:3, :3] @ np.indices(shape).reshape(3, -1) + m[:3, 3:4]
    inside = np.all((p >= 0) & (p <= np.array(pre.data.shape)[:, None] - 1), axis=0).reshape(shape)
    err = np.abs(res.features[0] - data)  # image is 100 +- 60; a one-voxel shift gives a mean error of ~2
    assert inside.mean() > 0.9
    assert err[inside].mean() < 0.3 and err[inside].max() < 1.5 and err.mean() < 0.3, (err[inside].max(), err.mean())
    assert res.windows == 27  # RAS 4 mm grid 25 x 22 x 25 -> padded 32^3 -> 3 x 3 x 3 windows of 16^3
    # on the model grid the blended windows give back the preprocessed image exactly
    model = Embedder(echo, modality=None).embed((data, aff), dense=True, grid="model")
    np.testing.assert_allclose(model.features[0], pre.data, atol=1e-4)
    np.testing.assert_allclose(model.affine, pre.affine)


def test_dense_features_follow_anatomy_not_storage_order(tmp_path, t1, embedder):
    """The same anatomy stored RAS and stored flipped/permuted (LPS-like, anisotropic) gives
    feature maps that agree voxel-for-voxel once the storage permutation is undone."""
    vol = t1[2:38, 4:44, 4:36]  # 36 x 40 x 32 at 4 mm
    ras = _aff((4.0, 4.0, 4.0))
    res_a = embedder.embed((vol, ras), dense=True)
    # store axes as (y, x, z) with x and y flipped: same world image, different array
    stored = vol[::-1, ::-1, :].transpose(1, 0, 2).copy()
    n0, n1 = vol.shape[0], vol.shape[1]
    aff_b = np.array(
        [
            [0.0, -4.0, 0.0, ras[0, 3] + 4.0 * (n0 - 1)],
            [-4.0, 0.0, 0.0, ras[1, 3] + 4.0 * (n1 - 1)],
            [0.0, 0.0, 4.0, ras[2, 3]],
            [0, 0, 0, 1],
        ]
    )
    path = _save(tmp_path / "lps.nii.gz", stored, aff_b)
    res_b = embedder.embed(path, dense=True)
    assert res_b.features.shape == (8, *stored.shape)
    np.testing.assert_allclose(res_b.affine, aff_b)
    back = res_b.features.transpose(0, 2, 1, 3)[:, ::-1, ::-1, :]
    np.testing.assert_allclose(back, res_a.features, atol=1e-4)
    np.testing.assert_allclose(res_b.embedding, res_a.embedding, atol=1e-5)


def test_sliding_window_on_a_volume_larger_than_the_patch(t1, embedder):
    """A 40 x 48 x 40 volume (padded 48^3) runs as 8 windows of 32^3; the embedding is the
    documented mean of the window embeddings, and only windows reach the backend."""
    res = embedder.embed((t1, _aff()), dense=True)
    padded, _ = pad_to_multiple(preprocess(read_volume((t1, _aff())), PRE).data)
    assert padded.shape == (48, 48, 48) and res.windows == 8
    starts = [0, 16]
    wins = [padded[a : a + 32, b : b + 32, c : c + 32] for a in starts for b in starts for c in starts]
    per = embedder.backend.run({"image": np.stack(wins)[:, None]}, ["embedding"])["embedding"]
    np.testing.assert_allclose(res.embedding, per.mean(axis=0), atol=1e-5)
    assert res.features.shape == (8, 40, 48, 40) and np.isfinite(res.features).all()
    # window batching changes nothing but speed; the backend never sees more than a batch of windows
    echo = EchoBackend(PRE)
    Embedder(echo, window_batch=3).embed((t1, _aff()), dense=True)
    assert [s[0] for s in echo.shapes] == [3, 3, 2] and all(s[2:] == PATCH for s in echo.shapes)
    batched = Embedder(embedder.backend, window_batch=4).embed((t1, _aff()), dense=True)
    np.testing.assert_allclose(batched.embedding, res.embedding, atol=1e-5)
    np.testing.assert_allclose(batched.features, res.features, atol=1e-4)


def test_window_helpers():
    assert window_starts(32, 32, 0.5) == [0]
    assert window_starts(48, 32, 0.5) == [0, 16]
    assert window_starts(80, 32, 0.5) == [0, 16, 32, 48]
    assert window_starts(50, 32, 0.0) == [0, 18]  # last window flush with the end
    w = gaussian_weight((8, 16, 4))
    assert w.shape == (8, 16, 4) and w.max() == pytest.approx(1.0) and w.min() >= 1e-3


def test_dense_needs_the_features_output(tmp_path, tiny):
    from gvsl.export.pipeline import ExportOptions, run_export

    out = tmp_path / "nodense"
    run_export(tiny[0], out, ExportOptions(verify=False, dense=False))
    e = Embedder(out, device="cpu", modality=None)
    assert not e.has_dense
    assert e.embed((np.ones((20, 20, 20), np.float32), _aff())).embedding.shape == (32,)
    with pytest.raises(GvslInputError, match="without dense features"):
        e.embed((np.ones((20, 20, 20), np.float32), _aff()), dense=True)


# ----------------------------------------------------------------------------- bad inputs
def _write(path: Path, data: np.ndarray, affine=None) -> Path:
    return _save(path, data, np.eye(4) if affine is None else affine)


def _singular(d: Path) -> Path:
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((8, 8, 8))
    hdr.set_data_dtype(np.float32)
    hdr.set_sform(np.diag([0.0, 0.0, 0.0, 1.0]), code=1)
    p = d / "singular.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), None, header=hdr), p)
    return p


def _truncated(d: Path) -> Path:
    p = _write(d / "trunc.nii.gz", np.random.default_rng(0).random((16, 16, 16), dtype=np.float32))
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return p


BAD_INPUTS = {
    "missing": (lambda d: d / "missing.nii.gz", "not found"),
    "empty": (lambda d: _put(d / "empty.nii.gz", b""), "empty"),
    "truncated": (_truncated, "corrupt or truncated"),
    "not_nifti": (lambda d: _put(d / "notes.txt", "x"), "not a NIfTI"),
    "garbage_gz": (
        lambda d: _put(d / "g.nii.gz", gzip.compress(b"nope" * 100)),
        "cannot read",
    ),
    "2d": (lambda d: _write(d / "slice.nii.gz", np.ones((16, 16), np.float32)), "2-D"),
    "4d": (lambda d: _write(d / "fmri.nii.gz", np.ones((8, 8, 8, 3), np.float32)), "4-D"),
    "nan": (lambda d: _write(d / "nan.nii.gz", np.where(np.indices((8, 8, 8))[0] == 3, np.nan, 1.0)), "NaN"),
    "inf": (lambda d: _write(d / "inf.nii.gz", np.full((8, 8, 8), np.inf, np.float32)), "NaN or Inf"),
    "singular_affine": (_singular, "not invertible"),
    "too_big": (lambda d: _write(d / "big.nii.gz", np.ones((20, 20, 20), np.float32)), "limit of 7000"),
    "folder_without_dicom": (lambda d: (d / "nodicom").mkdir() or d / "nodicom", "no DICOM"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_naming_it(tmp_path, case, embedder):
    make, what = BAD_INPUTS[case]
    path = make(tmp_path)
    e = Embedder(embedder.backend, max_voxels=7000)
    with pytest.raises(GvslInputError) as info:
        e.embed(path)
    msg = str(info.value)
    assert path.name in msg and what in msg and "\n" not in msg, msg


@pytest.mark.parametrize(
    ("x", "what"),
    [
        ((np.ones((16, 16)), np.eye(4)), "2-D"),
        ((np.ones((8, 8, 8, 2)), np.eye(4)), "4-D"),
        ((np.full((8, 8, 8), np.nan), np.eye(4)), "NaN"),
        ((np.ones((8, 8, 8)), np.zeros((4, 4))), "not invertible"),
        ((np.ones((30, 30, 30)), np.eye(4)), "limit of 7000"),
        (12, "give a file path"),
    ],
)
def test_bad_in_memory_input(x, what, embedder):
    with pytest.raises(GvslInputError, match=what):
        Embedder(embedder.backend, max_voxels=7000).embed(x)


# ----------------------------------------------------------------------------- DICOM
def _write_dicom_series(nifti: Path, folder: Path, series_uid: str = "1.2.826.0.1.3680043.2.1125.1") -> Path:
    """A DICOM series from a NIfTI with SimpleITK (the SimpleITK DicomSeriesFromArray recipe);
    the process locale, which GDCM changes, is put back afterwards."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        return _write_dicom_series_files(nifti, folder, series_uid)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _write_dicom_series_files(nifti: Path, folder: Path, series_uid: str) -> Path:
    sitk = pytest.importorskip("SimpleITK")
    img = sitk.Cast(sitk.ReadImage(str(nifti)), sitk.sitkInt16)
    folder.mkdir(parents=True, exist_ok=True)
    d = img.GetDirection()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    tags = {
        "0008|0060": "MR",
        "0008|0008": "DERIVED\\SECONDARY",
        "0020|000d": "1.2.826.0.1.3680043.2.1125.9",
        "0020|000e": series_uid,
        "0020|0037": "\\".join(f"{v:.8f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
        "0008|103e": "gvsl test series",
    }
    for k in range(img.GetDepth()):
        sl = img[:, :, k]
        for tag, value in tags.items():
            sl.SetMetaData(tag, value)
        sl.SetMetaData("0020|0032", "\\".join(f"{v:.6f}" for v in img.TransformIndexToPhysicalPoint((0, 0, k))))
        sl.SetMetaData("0020|0013", str(k + 1))
        sl.SetMetaData("0008|0018", f"{series_uid}.{k + 1}")
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(sl)
    return folder


def test_dicom_series_keeps_orientation_and_spacing(tmp_path, t1, embedder):
    aff = np.array([[0.0, -3.0, 0.0, 50.0], [4.0, 0.0, 0.0, -90.0], [0.0, 0.0, 2.5, -40.0], [0, 0, 0, 1]])
    data = t1[:, :, 8:24].astype(np.int16)  # 40 x 48 x 16
    nii = _save(tmp_path / "vol.nii.gz", data, aff)
    folder = _write_dicom_series(nii, tmp_path / "series")
    vol = read_volume(folder)
    ref = load_volume(nii)
    # same voxels in the same order, same voxel->RAS mapping (orientation + spacing + origin)
    np.testing.assert_array_equal(vol.data, ref.data)
    np.testing.assert_allclose(vol.affine, ref.affine, atol=1e-4)
    assert vol.spacing == pytest.approx((4.0, 3.0, 2.5), abs=1e-5)
    # wherever a volume is accepted, the series folder is too
    np.testing.assert_allclose(embedder.embed(folder).embedding, embedder.embed(nii).embedding, atol=1e-5)
    items, problems = list_inputs([tmp_path])
    assert {i.key for i in items} == {"series", "vol"} and not problems


def test_dicom_folder_with_two_series_is_refused(tmp_path, t1):
    nii = _save(tmp_path / "v.nii.gz", t1[:, :, :6].astype(np.int16), _aff())
    _write_dicom_series(nii, tmp_path / "mixed", "1.2.826.0.1.3680043.2.1125.1")
    _write_dicom_series(nii, tmp_path / "other", "1.2.826.0.1.3680043.2.1125.2")
    for f in (tmp_path / "other").iterdir():
        f.rename(tmp_path / "mixed" / f"b_{f.name}")
    with pytest.raises(GvslInputError, match=r"mixed: holds 2 DICOM series"):
        read_volume(tmp_path / "mixed")


# ----------------------------------------------------------------------------- threads
def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def test_one_embedder_shared_by_8_threads(t1, embedder):
    """8 threads x 40 calls on one Embedder = the serial results, no crash, no growth."""
    rng = np.random.default_rng(0)
    vols = [
        (t1[a : a + 14, b : b + 15, 10:26] * rng.uniform(0.5, 1.5), _aff()) for a, b in rng.integers(0, 24, (16, 2))
    ]
    serial = [embedder.embed(v).embedding for v in vols]
    for k in range(24):  # warm-up, so the allocator's high-water mark is reached before measuring
        embedder.embed(vols[k % len(vols)])
    rss0 = _rss_mb()
    results: dict[tuple[int, int], np.ndarray] = {}
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            for k in range(40):
                i = (t * 7 + k) % len(vols)
                results[(t, k)] = embedder.embed(vols[i]).embedding
        except BaseException as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[0]
    assert len(results) == 320
    for (t, k), emb in results.items():
        np.testing.assert_allclose(emb, serial[(t * 7 + k) % len(vols)], rtol=1e-5, atol=1e-6)
    assert _rss_mb() - rss0 < 60.0  # MB over 320 calls


# ----------------------------------------------------------------------------- torch-free
def test_runtime_and_cli_work_without_torch(tmp_path, tiny, t1):
    """In a process where `import torch` fails: import the runtime, embed, register, and run
    `gvsl embed` / `gvsl register` on ONNX Runtime; torch never gets imported."""
    _, export_dir = tiny
    a = _save(tmp_path / "a.nii.gz", t1[:28, :28, :28], _aff())
    b = _save(tmp_path / "b.nii.gz", np.roll(t1, 2, axis=0)[:28, :28, :28], _aff())
    code = textwrap.dedent(
        f"""
        import sys

        class NoTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this test")
                return None

        sys.meta_path.insert(0, NoTorch())
        import gvsl.runtime as runtime
        e = runtime.Embedder({str(export_dir)!r}, device="cpu")
        assert e.embed({str(a)!r}, dense=True).features.shape == (8, 28, 28, 28)
        r = runtime.Registrar({str(export_dir)!r}, device="cpu").register({str(a)!r}, {str(b)!r})
        assert r.warped.shape == (28, 28, 28)
        from typer.testing import CliRunner
        from gvsl.cli.main import app
        res = CliRunner().invoke(app, ["embed", {str(a)!r}, "-m", {str(export_dir)!r},
                                       "-o", {str(tmp_path / "emb")!r}, "-q"])
        assert res.exit_code == 0, res.output
        res = CliRunner().invoke(app, ["register", {str(a)!r}, {str(b)!r}, "-m", {str(export_dir)!r},
                                       "-o", {str(tmp_path / "w.nii.gz")!r}, "-q"])
        assert res.exit_code == 0, res.output
        assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules)
        print("ok")
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, check=False
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().endswith("ok")
    assert (tmp_path / "emb" / "a.npy").is_file() and (tmp_path / "w.nii.gz").is_file()


# ----------------------------------------------------------------------------- gvsl embed
def cli(*args: object):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def batch_dir(tmp_path, t1) -> Path:
    """Two sites with a same-named scan each, one more scan, and two bad files."""
    d = tmp_path / "in"
    for site, shift in (("siteA", 0), ("siteB", 3)):
        (d / site).mkdir(parents=True)
        _save(d / site / "scan.nii.gz", np.roll(t1, shift, axis=1)[:28, :30, :26], _aff())
    _save(d / "extra.nii.gz", t1[4:30, 4:30, 4:30], _aff((4.0, 4.0, 5.0)))
    (d / "broken.nii.gz").write_bytes(b"\x1f\x8b garbage")
    _write(d / "flat.nii.gz", np.ones((16, 16), np.float32))
    return d


def test_cli_embed_batch_resumable_with_failures_listed(tmp_path, batch_dir, tiny, embedder):
    out = tmp_path / "out"
    res = cli("embed", batch_dir, "-m", tiny[1], "-o", out, "--device", "cpu")
    assert res.exit_code == 1  # two bad files
    text = " ".join(res.output.split())
    assert "broken.nii.gz" in text and "flat.nii.gz" in text and "2 input(s) failed" in text
    assert "Traceback" not in res.output
    made = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert made == ["extra.npy", "siteA/scan.npy", "siteB/scan.npy"]  # same names kept apart
    np.testing.assert_allclose(
        np.load(out / "siteB" / "scan.npy"), embedder.embed(batch_dir / "siteB" / "scan.nii.gz").embedding, atol=1e-6
    )
    stamp = (out / "extra.npy").stat().st_mtime_ns
    again = cli("embed", batch_dir, "-m", tiny[1], "-o", out, "--device", "cpu")
    assert again.exit_code == 1 and "skipped" in again.output
    assert (out / "extra.npy").stat().st_mtime_ns == stamp  # existing outputs are not recomputed
    assert not [p for p in out.rglob(".*")]  # no temp files left behind (atomic writes)


def test_cli_embed_shards_npz_dense(tmp_path, batch_dir, tiny):
    good = [batch_dir / "siteA", batch_dir / "siteB", batch_dir / "extra.nii.gz"]
    outs = []
    for i in range(2):
        out = tmp_path / f"shard{i}"
        res = cli("embed", *good, "-m", tiny[1], "-o", out, "--shard", f"{i}/2", "--format", "npz", "--dense", "-q")
        assert res.exit_code == 0, res.output
        outs.append({p.relative_to(out).as_posix() for p in out.rglob("*.npz")})
    assert outs[0].isdisjoint(outs[1])
    assert outs[0] | outs[1] == {"siteA/scan.npz", "siteB/scan.npz", "extra.npz"}
    f = next((tmp_path / "shard0").rglob("*.npz"))
    z = np.load(f)
    src = batch_dir / "extra.nii.gz" if f.name == "extra.npz" else batch_dir / f.parent.name / "scan.nii.gz"
    img = nib.load(src)
    assert z["embedding"].shape == (32,) and z["features"].shape == (8, *img.shape)
    np.testing.assert_allclose(z["affine"], img.affine)


def test_cli_embed_dense_npy_writes_feature_nifti(tmp_path, batch_dir, tiny):
    src = batch_dir / "extra.nii.gz"
    res = cli("embed", src, "-m", tiny[1], "-o", tmp_path / "o", "--dense", "-q")
    assert res.exit_code == 0, res.output
    img = nib.load(tmp_path / "o" / "extra_features.nii.gz")
    assert img.shape == (*nib.load(src).shape, 8)
    np.testing.assert_allclose(img.affine, nib.load(src).affine)


def test_cli_embed_bad_model_and_options(tmp_path, batch_dir, tiny):
    res = runner.invoke(app, ["embed", str(batch_dir), "-m", str(tmp_path / "none"), "-o", str(tmp_path / "o")])
    assert res.exit_code == 2 and "none: model not found" in " ".join(res.output.split())
    assert "Traceback" not in res.output
    res = runner.invoke(app, ["embed", str(batch_dir), "-m", str(tiny[1]), "-o", str(tmp_path / "o"), "--shard", "3/2"])
    assert res.exit_code == 2 and "--shard" in res.output
    res = runner.invoke(
        app, ["embed", str(tmp_path / "nothing*.nii.gz"), "-m", str(tiny[1]), "-o", str(tmp_path / "o")]
    )
    assert res.exit_code == 1 and "matches no NIfTI" in " ".join(res.output.split())
