"""TensorRT engines: build, run, parity (needs TensorRT 10+ and a CUDA GPU; skipped otherwise)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gvsl.config import ModelConfig
from gvsl.export import ExportOptions, run_export
from gvsl.export.verify import compare, reference
from gvsl.io import load_model, save_model
from gvsl.model import GVSL
from gvsl.runtime import artifact
from gvsl.runtime.preprocess import PreprocessConfig

pytestmark = pytest.mark.gpu
trt = pytest.importorskip("tensorrt")
if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU", allow_module_level=True)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict:
    torch.manual_seed(0)
    base = tmp_path_factory.mktemp("trt")
    save_model(
        GVSL(ModelConfig.from_preset("tiny")),
        base / "run" / "model",
        preprocess=PreprocessConfig().to_dict(),
        extra={"patch_size": [32, 32, 32]},
    )
    opts = ExportOptions(
        format="all",
        precisions=("fp32", "fp16"),
        min_shapes=("1,16,16,16",),
        opt_shapes=("1,32,32,32",),
        max_shapes=("2,48,48,48",),
        verify_shapes=((2, 32, 32, 32), (1, 16, 32, 48)),
        timing_cache=str(base / "timing.cache"),
        triton_repo=str(base / "triton"),
        workspace_gib=2.0,
    )
    manifest = run_export(base / "run", base / "out", opts)
    return {"base": base, "out": base / "out", "manifest": manifest, "model": load_model(base / "run" / "model")[0]}


def _engines(built: dict) -> dict[tuple[str, str], Path]:
    return {
        (a["kind"], a["precision"]): built["out"] / a["file"]
        for a in built["manifest"]["artifacts"]
        if a["format"] == "engine"
    }


def test_engine_files_record_gpu_and_tensorrt_version(built):
    major, minor = torch.cuda.get_device_capability()
    engines = [a for a in built["manifest"]["artifacts"] if a["format"] == "engine"]
    assert len(engines) == 4
    for a in engines:
        assert f".sm{major}{minor}." in a["file"] and f".trt{trt.__version__}." in a["file"]
        assert a["compute_capability"] == f"{major}.{minor}" and a["tensorrt_version"] == trt.__version__
        assert all(p["passed"] for p in a["parity"])
    assert (built["base"] / "timing.cache").stat().st_size > 0


@pytest.mark.parametrize("kind", [artifact.ENCODER, artifact.REGISTRATION])
def test_engines_run_at_two_sizes_with_parity(built, kind):
    from gvsl.export.tensorrt_build import run_engine

    rng = np.random.default_rng(0)
    for n, spatial in ((1, (32, 32, 32)), (2, (16, 48, 32))):
        inputs = [rng.random((n, 1, *spatial), dtype=np.float32) for _ in range(1 if kind == artifact.ENCODER else 2)]
        ref = reference(built["model"], kind, inputs)
        names = artifact.ENCODER_OUTPUTS if kind == artifact.ENCODER else artifact.REGISTRATION_OUTPUTS
        for prec in ("fp32", "fp16"):
            got = run_engine(_engines(built)[(kind, prec)], inputs)
            for name, r in zip(names, ref, strict=True):
                par, why = compare(name, got[name], r, prec)
                assert not why, (prec, why)
                if name == "embedding" and prec == "fp16":
                    assert par.cosine >= 0.999


def test_tensorrt_parser_rejects_5d_gridsample_like_the_static_check(built, tmp_path):
    from gvsl.export.onnx_export import build_metadata, export_graph
    from gvsl.export.source import load_source
    from gvsl.export.trt_check import check_tensorrt

    src = load_source(built["base"] / "run")
    path = export_graph(
        src.model,
        artifact.REGISTRATION,
        tmp_path / "gs.onnx",
        opset=20,
        warp="grid_sample",
        metadata=build_metadata(src, artifact.REGISTRATION, "fp32", warp="grid_sample"),
    )
    assert check_tensorrt(path)
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    parsed = parser.parse_from_file(str(path))
    if parsed:  # some parsers accept the node and fail at build time instead
        config = builder.create_builder_config()
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            profile.set_shape(network.get_input(i).name, (1, 1, 16, 16, 16), (1, 1, 16, 16, 16), (1, 1, 16, 16, 16))
        config.add_optimization_profile(profile)
        assert builder.build_serialized_network(network, config) is None


def test_triton_tensorrt_repository(built):
    from gvsl.export.triton import parse_config, validate_config

    tri = built["manifest"]["triton"]
    assert tri["backend"] == "tensorrt"
    for kind, name in ((artifact.ENCODER, "gvsl_encoder"), (artifact.REGISTRATION, "gvsl_registration")):
        msg = parse_config((built["base"] / "triton" / name / "config.pbtxt").read_text())
        validate_config(msg, kind, ModelConfig.from_preset("tiny"))
        assert (built["base"] / "triton" / name / "1" / "model.plan").is_file()
    assert json.loads((built["out"] / "manifest.json").read_text())["triton"] == tri


def test_bf16_engine_builds_and_keeps_embeddings(built, tmp_path):
    if not hasattr(trt.BuilderFlag, "BF16"):
        pytest.skip("this TensorRT has no BF16 builder flag")
    from gvsl.export.tensorrt_build import Profile, build_engine, run_engine

    onnx_path = built["out"] / "encoder.onnx"
    eng = tmp_path / "encoder.bf16.engine"
    build_engine(
        onnx_path, eng, precision="bf16", profiles=[Profile((1, 16, 16, 16), (1, 32, 32, 32), (2, 32, 32, 32))]
    )
    x = np.random.default_rng(1).random((2, 1, 32, 32, 32), dtype=np.float32)
    emb = run_engine(eng, [x])["embedding"]
    ref = reference(built["model"], artifact.ENCODER, [x])[0]
    cos = (emb * ref).sum(1) / np.linalg.norm(emb, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() >= 0.99


@pytest.mark.parametrize("kind", [artifact.ENCODER, artifact.REGISTRATION])
def test_runtime_loads_the_exported_engines(built, kind):
    """The TensorRT backend runs the `.engine` files export wrote (checked against the manifest)
    and gives the PyTorch model's numbers, like run_engine."""
    from gvsl.runtime.backends import TensorRTBackend, load_backend

    rng = np.random.default_rng(3)
    names = artifact.ENCODER_INPUTS if kind == artifact.ENCODER else artifact.REGISTRATION_INPUTS
    inputs = [rng.random((1, 1, 32, 32, 32), dtype=np.float32) for _ in names]
    ref = reference(built["model"], kind, inputs)
    outputs = artifact.ENCODER_OUTPUTS if kind == artifact.ENCODER else artifact.REGISTRATION_OUTPUTS
    backend = load_backend(_engines(built)[(kind, "fp32")], kind, "auto", "cuda")
    assert isinstance(backend, TensorRTBackend)
    got = backend.run(dict(zip(names, inputs, strict=True)))
    for name, r in zip(outputs, ref, strict=True):
        par, why = compare(name, got[name], r, "fp32")
        assert not why, why
    backend.close()
