"""gvsl export: ONNX graphs, parity, metadata, TensorRT-compatibility check, Triton configs, CLI errors.

A tiny model keeps the whole file fast on CPU; the default-width (official
format) export runs once at 16^3.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from gvsl.cli.main import app
from gvsl.config import ModelConfig
from gvsl.export import ExportError, ExportOptions, check_tensorrt, describe, run_export
from gvsl.export.onnx_export import export_graph, graph_io
from gvsl.export.source import sha256_file
from gvsl.export.triton import config_text, parse_config, validate_config
from gvsl.export.trt_check import assert_tensorrt_compatible
from gvsl.export.verify import compare, reference
from gvsl.io import save_model
from gvsl.model import GVSL
from gvsl.runtime import artifact
from gvsl.runtime.geometry import model_affine_convention
from gvsl.runtime.preprocess import PreprocessConfig
from gvsl.spatial import dvf_warp, identity_grid, sample

PATCH = [32, 32, 32]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A gvsl run folder with a tiny trained-format model (native spacing, MR)."""
    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("run")
    save_model(
        GVSL(ModelConfig.from_preset("tiny")),
        run / "model",
        preprocess=PreprocessConfig(spacing=None, modality="mr").to_dict(),
        extra={"patch_size": PATCH},
    )
    return run


@pytest.fixture(scope="module")
def exported(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory, mni_small_arrays) -> dict:
    """fp32 + fp16 export of the tiny run, verified on random input and a real (MNI) volume."""
    import nibabel as nib

    base = tmp_path_factory.mktemp("export")
    vol = base / "t1.nii.gz"
    nib.save(nib.Nifti1Image(mni_small_arrays["t1"].astype(np.float32), np.diag([4.0, 4.0, 4.0, 1.0])), vol)
    opts = ExportOptions(
        precisions=("fp32", "fp16"),
        verify_shapes=((1, 16, 16, 16),),
        verify_data=(str(vol),),
        triton_repo=str(base / "triton"),
    )
    steps: list[str] = []
    manifest = run_export(tiny_run, base / "out", opts, progress=lambda s, i, n: steps.append(s))
    return {"out": base / "out", "triton": base / "triton", "manifest": manifest, "run": tiny_run, "steps": steps}


def _model(run: Path) -> GVSL:
    from gvsl.io import load_model

    return load_model(run / "model")[0].eval()


# ----------------------------------------------------------------------------- graphs
@pytest.mark.parametrize("kind", [artifact.ENCODER, artifact.REGISTRATION])
def test_graphs_run_at_two_sizes_and_batch_sizes_with_parity(exported, kind):
    model = _model(exported["run"])
    sess = ort.InferenceSession(str(exported["out"] / f"{kind}.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    for n, spatial in ((1, (32, 32, 32)), (2, (16, 32, 48))):
        inputs = [rng.random((n, 1, *spatial), dtype=np.float32) for _ in sess.get_inputs()]
        got = sess.run(None, {i.name: x for i, x in zip(sess.get_inputs(), inputs, strict=True)})
        ref = reference(model, kind, inputs)
        for out, g, r in zip(sess.get_outputs(), got, ref, strict=True):
            assert g.shape == r.shape, (out.name, g.shape, r.shape)
            par, why = compare(out.name, g, r, "fp32")
            assert not why, why
            assert par.rel < 1e-4
    names = [o.name for o in sess.get_outputs()]
    assert tuple(names) == (artifact.ENCODER_OUTPUTS if kind == artifact.ENCODER else artifact.REGISTRATION_OUTPUTS)


def test_fp16_variant_keeps_embeddings(exported):
    model = _model(exported["run"])
    sess = ort.InferenceSession(str(exported["out"] / "encoder.fp16.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(2).random((2, 1, 32, 32, 32), dtype=np.float32)
    emb, feats = sess.run(None, {"image": x})
    ref_emb, ref_feats = reference(model, artifact.ENCODER, [x])
    assert emb.dtype == np.float32  # I/O stays float32; compute is fp16 inside
    cos = (emb * ref_emb).sum(1) / np.linalg.norm(emb, axis=1) / np.linalg.norm(ref_emb, axis=1)
    assert cos.min() >= 0.999
    proto = onnx.load(str(exported["out"] / "encoder.fp16.onnx"))
    conv_w = {n.input[1] for n in proto.graph.node if n.op_type == "Conv"}
    assert all(i.data_type == onnx.TensorProto.FLOAT16 for i in proto.graph.initializer if i.name in conv_w)
    assert (exported["out"] / "encoder.fp16.onnx").stat().st_size < 0.7 * (
        exported["out"] / "encoder.onnx"
    ).stat().st_size


def test_encoder_without_dense_output(tiny_run, tmp_path):
    from gvsl.export.onnx_export import build_metadata
    from gvsl.export.source import load_source

    src = load_source(tiny_run)
    meta = build_metadata(src, artifact.ENCODER, "fp32", dense=False)
    path = export_graph(src.model, artifact.ENCODER, tmp_path / "enc.onnx", metadata=meta, dense=False, simplify=False)
    io = graph_io(path)
    assert list(io["outputs"]) == ["embedding"] and io["outputs"]["embedding"] == ["batch", 32]
    assert ort.InferenceSession(str(path)).get_modelmeta().custom_metadata_map[artifact.META_DENSE] == "false"


# ----------------------------------------------------------------------------- the gather warp
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("align_corners", [True, False])
def test_gather_sampler_equals_grid_sample(mode, align_corners):
    gen = torch.Generator().manual_seed(3)
    src = torch.rand(2, 3, 16, 20, 24, generator=gen)
    locs = identity_grid((12, 18, 22)) + 5 * torch.randn(2, 3, 12, 18, 22, generator=gen) + 1.0  # many outside
    a = sample(src, locs, mode=mode, align_corners=align_corners)
    b = sample(src, locs, mode=mode, align_corners=align_corners, sampler="gather")
    assert (a - b).abs().max() < 1e-5
    one = sample(src, locs[:1], mode=mode, align_corners=align_corners, sampler="gather")  # batch-1 positions
    assert (
        one - sample(src, locs[:1].expand(2, -1, -1, -1, -1), mode=mode, align_corners=align_corners)
    ).abs().max() < 1e-5


def test_gather_sampler_through_onnxruntime_matches_grid_sample(tmp_path):
    class Warp(torch.nn.Module):
        def forward(self, src: torch.Tensor, dvf: torch.Tensor) -> torch.Tensor:
            return sample(src, identity_grid(dvf.shape[2:], dtype=dvf.dtype) + dvf, sampler="gather")

    path = tmp_path / "warp.onnx"
    axes = {0: "n", 1: "c", 2: "d", 3: "h", 4: "w"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer / legacy-exporter notices
        torch.onnx.export(
            Warp(),
            (torch.rand(1, 2, 16, 16, 16), torch.randn(1, 3, 16, 16, 16)),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["src", "dvf"],
            output_names=["out"],
            dynamic_axes={"src": axes, "dvf": {k: v for k, v in axes.items() if k != 1}, "out": axes},
        )
    assert not check_tensorrt(path)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(4)
    for shape in ((1, 2, 16, 16, 16), (2, 3, 24, 16, 32)):
        src = torch.rand(*shape, generator=gen)
        dvf = 4 * torch.randn(shape[0], 3, *shape[2:], generator=gen)
        got = sess.run(None, {"src": src.numpy(), "dvf": dvf.numpy()})[0]
        ref = sample(src, identity_grid(shape[2:]) + dvf)  # grid_sample
        assert np.abs(got - ref.numpy()).max() < 1e-5


# ----------------------------------------------------------------------------- metadata and manifest
def test_metadata_round_trip_through_onnxruntime(exported):
    sha = sha256_file(exported["run"] / "model" / "model.safetensors")
    for name, kind, prec in (
        ("encoder.onnx", artifact.ENCODER, "fp32"),
        ("registration.onnx", artifact.REGISTRATION, "fp32"),
        ("registration.fp16.onnx", artifact.REGISTRATION, "fp16"),
    ):
        meta = ort.InferenceSession(str(exported["out"] / name)).get_modelmeta().custom_metadata_map
        assert meta[artifact.META_FORMAT] == artifact.FORMAT and meta[artifact.META_KIND] == kind
        assert ModelConfig.from_json(meta[artifact.META_MODEL]) == ModelConfig.from_preset("tiny")
        # the runtime reads the affine convention of a gvsl-trained model from here
        assert model_affine_convention(json.loads(meta[artifact.META_MODEL])) == "centered"
        assert PreprocessConfig.from_dict(json.loads(meta[artifact.META_PREPROCESS])) == PreprocessConfig(
            spacing=None, modality="mr"
        )
        assert json.loads(meta[artifact.META_PATCH]) == PATCH
        assert meta[artifact.META_WEIGHTS_SHA] == sha
        assert meta[artifact.META_PRECISION] == prec
        assert meta[artifact.META_VERSION]
        if kind == artifact.REGISTRATION:
            assert meta[artifact.META_WARP] == "gather"
        else:
            assert meta[artifact.META_DENSE] == "true"


def test_manifest_lists_artifacts_with_hashes_and_parity(exported):
    out, man = exported["out"], exported["manifest"]
    assert json.loads((out / "manifest.json").read_text()) == man
    files = {a["file"]: a for a in man["artifacts"]}
    refine = {name: files.pop(name) for name in ("refine.onnx", "refine_mi.onnx", "refine_affine.onnx")}
    assert set(files) == {"encoder.onnx", "registration.onnx", "encoder.fp16.onnx", "registration.fp16.onnx"}
    # the refinement graphs: no weights, TensorRT-parsable, the deformable one checked against torch
    assert {name: a["kind"] for name, a in refine.items()} == {
        "refine.onnx": "refine", "refine_mi.onnx": "refine_mi", "refine_affine.onnx": "refine_affine"
    }  # fmt: skip
    assert refine["refine_mi.onnx"]["settings"]["similarity"] == "mi"
    for name, a in refine.items():
        assert a["sha256"] == sha256_file(out / name) and a["tensorrt_compatible"] is True
    assert refine["refine.onnx"]["parity"][0]["passed"] and refine["refine.onnx"]["parity"][0]["max_abs"] < 1e-4
    for name, a in files.items():
        assert a["sha256"] == sha256_file(out / name)
        assert a["tensorrt_compatible"] is True
        labels = {p["inputs"] for p in a["parity"]}
        assert labels == {"random", "volume:t1.nii.gz"}  # random and a real volume
        assert all(p["passed"] for p in a["parity"])
    assert files["registration.onnx"]["outputs"]["dvf"] == ["batch", 3, "depth", "height", "width"]
    assert man["patch_size"] == PATCH and man["patch_size_from"] == "model.json"
    assert man["model"]["affine_convention"] == "centered"
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".")) == []  # no temp leftovers
    assert exported["steps"][-1] == "done"


def test_info_describes_onnx_and_folder(exported):
    d = describe(exported["out"] / "registration.onnx")
    assert d["inputs"] == {
        "fixed": ["batch", 1, "depth", "height", "width"],
        "moving": ["batch", 1, "depth", "height", "width"],
    }
    assert d["metadata"][artifact.META_PATCH] == PATCH and d["tensorrt_compatible"]
    res = CliRunner().invoke(app, ["info", str(exported["out"] / "encoder.onnx")])
    assert res.exit_code == 0, res.output
    assert sha256_file(exported["out"] / "encoder.onnx") in res.output and "embedding" in res.output
    assert "gvsl.weights_sha256" in res.output
    res = CliRunner().invoke(app, ["info", str(exported["out"]), "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["manifest"]["artifacts"]


# ----------------------------------------------------------------------------- TensorRT static check
def test_trt_check_flags_5d_gridsample_and_passes_gather_graph(exported, tiny_run, tmp_path):
    from gvsl.export.onnx_export import build_metadata
    from gvsl.export.source import load_source

    assert check_tensorrt(exported["out"] / "registration.onnx") == []
    assert check_tensorrt(exported["out"] / "registration.fp16.onnx") == []
    src = load_source(tiny_run)
    path = export_graph(
        src.model,
        artifact.REGISTRATION,
        tmp_path / "gs.onnx",
        opset=20,
        warp="grid_sample",
        simplify=False,
        metadata=build_metadata(src, artifact.REGISTRATION, "fp32", warp="grid_sample"),
    )
    issues = check_tensorrt(path)
    assert issues and all(i.op == "GridSample" and "5-D" in i.message for i in issues)
    with pytest.raises(ExportError, match="GridSample"):
        assert_tensorrt_compatible(path, "gs.onnx")
    # it is still a valid ONNX Runtime graph
    x = np.random.default_rng(0).random((1, 1, 16, 16, 32), dtype=np.float32)
    ref = reference(src.model, artifact.REGISTRATION, [x, x[:, :, ::-1].copy()])
    got = ort.InferenceSession(str(path)).run(None, {"fixed": x, "moving": x[:, :, ::-1].copy()})
    assert not compare("warped", got[2], ref[2], "fp32")[1]


def test_trt_check_rules_on_small_graphs():
    from onnx import TensorProto, helper

    def model(node, inputs, outputs, opset=17):
        g = helper.make_graph([node], "g", inputs, outputs)
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])

    f = lambda n, s: helper.make_tensor_value_info(n, TensorProto.FLOAT, s)  # noqa: E731
    gs4 = model(
        helper.make_node("GridSample", ["x", "g"], ["y"]),
        [f("x", [1, 1, 4, 4]), f("g", [1, 4, 4, 2])],
        [f("y", [1, 1, 4, 4])],
    )
    assert check_tensorrt(gs4) == []
    gs5 = model(
        helper.make_node("GridSample", ["x", "g"], ["y"]),
        [f("x", [1, 1, 4, 4, 4]), f("g", [1, 4, 4, 4, 3])],
        [f("y", [1, 1, 4, 4, 4])],
        opset=20,
    )
    assert [i.op for i in check_tensorrt(gs5)] == ["GridSample"]
    uniq = model(helper.make_node("Unique", ["x"], ["y"]), [f("x", [4])], [f("y", [None])])
    assert "not supported" in check_tensorrt(uniq)[0].message
    custom = model(helper.make_node("FusedConv", ["x"], ["y"], domain="com.microsoft"), [f("x", [4])], [f("y", [4])])
    custom.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    assert "plugin" in check_tensorrt(custom)[0].message
    cubic = model(
        helper.make_node("Resize", ["x", "", "s"], ["y"], mode="cubic"),
        [f("x", [1, 1, 4, 4]), f("s", [4])],
        [f("y", [1, 1, 8, 8])],
    )
    assert any("mode 'cubic'" in i.message for i in check_tensorrt(cubic))
    conv1d = model(
        helper.make_node("Conv", ["x", "w"], ["y"]), [f("x", [1, 1, 8]), f("w", [1, 1, 3])], [f("y", [1, 1, 6])]
    )
    assert "2-D or 3-D" in check_tensorrt(conv1d)[0].message


# ----------------------------------------------------------------------------- Triton
def test_triton_repository_configs_parse(exported):
    cfg = ModelConfig.from_preset("tiny")
    for kind, name in ((artifact.ENCODER, "gvsl_encoder"), (artifact.REGISTRATION, "gvsl_registration")):
        text = (exported["triton"] / name / "config.pbtxt").read_text()
        msg = parse_config(text)
        validate_config(msg, kind, cfg)
        assert msg.name == name and msg.backend == "onnxruntime" and msg.max_batch_size == 4
        assert msg.HasField("dynamic_batching")
        model_file = exported["triton"] / name / "1" / "model.onnx"
        assert sha256_file(model_file) == sha256_file(exported["out"] / f"{kind}.onnx")
        trt_msg = parse_config(config_text(kind, "tensorrt", cfg))
        assert trt_msg.backend == "tensorrt" and trt_msg.default_model_filename == "model.plan"
        assert [list(o.dims) for o in trt_msg.output][0] == ([32] if kind == artifact.ENCODER else [3, 4])
    with pytest.raises(ExportError, match="not a valid Triton"):
        parse_config('name: "x"\nmax_batch_size: "four"\n')
    bad = parse_config(config_text(artifact.ENCODER, "onnxruntime", cfg).replace('"embedding"', '"emb"'))
    with pytest.raises(ExportError, match="do not match"):
        validate_config(bad, artifact.ENCODER, cfg)


# ----------------------------------------------------------------------------- official checkpoint
def test_official_plain_state_dict_exports(tmp_path):
    torch.manual_seed(5)
    pth = tmp_path / "GVSL_epoch_1000.pth"
    torch.save(GVSL().state_dict(), pth)  # default widths, plain state_dict
    man = run_export(pth, tmp_path / "out", ExportOptions(verify_shapes=((1, 16, 16, 16),)))
    assert man["source"]["kind"] == "official-pth" and man["patch_size_from"] == "default"
    meta = ort.InferenceSession(str(tmp_path / "out" / "encoder.onnx")).get_modelmeta().custom_metadata_map
    assert json.loads(meta[artifact.META_PATCH]) == [128, 128, 128]
    assert meta[artifact.META_WEIGHTS_SHA] == sha256_file(pth)
    assert model_affine_convention(json.loads(meta[artifact.META_MODEL])) == "official"  # the authors' quirk
    emb = man["artifacts"][0]["outputs"]["embedding"]
    assert emb == ["batch", 512]
    assert all(p["passed"] for a in man["artifacts"] for p in a["parity"])
    # the authors' pipeline: stored order (no reorientation), native spacing, [0, 2048] / 2048 of HU + 1024
    assert man["preprocess"] == {"spacing": None, "modality": "ct", "ct_window": [-1024.0, 1024.0],
                                 "mr_percentiles": [0.5, 99.5], "canonical": False}  # fmt: skip
    assert man["model"]["affine_head"] == "identity"
    from gvsl.io import load_model

    model, meta = load_model(pth)  # what the torch backend reads
    assert meta["preprocess"] == man["preprocess"] and model.config.affine_head == "identity"


@pytest.fixture(scope="module")
def official_tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny-width official-format ``.pth`` (random heads: its affine is far from the identity),
    exported as an official import and with ``--official-affine``."""
    base = tmp_path_factory.mktemp("official")
    torch.manual_seed(3)
    pth = base / "GVSL_epoch_1.pth"
    torch.save(GVSL(ModelConfig.from_preset("tiny")).state_dict(), pth)
    res = CliRunner().invoke(app, ["export", str(pth), "-o", str(base / "identity"), "--widths", "tiny",
                                   "--verify-shape", "1,16,16,16"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "registration uses the identity affine" in res.output
    res = CliRunner().invoke(app, ["export", str(pth), "-o", str(base / "trained"), "--widths", "tiny",
                                   "--verify-shape", "1,16,16,16", "--official-affine", "--quiet"])  # fmt: skip
    assert res.exit_code == 0, res.output
    return {"pth": pth, "identity": base / "identity", "trained": base / "trained"}


def test_official_import_registers_with_the_identity_affine(official_tiny):
    from gvsl.io import load_official

    model = load_official(official_tiny["pth"], ModelConfig.from_preset("tiny"), affine_head="trained").eval()
    torch.manual_seed(4)
    fixed, moving = torch.rand(2, 1, 1, 16, 32, 16)
    with torch.no_grad():
        fixed_feats, moving_feats = model.encode(fixed), model.encode(moving)
        head_affine, _ = model.match(fixed_feats, moving_feats)
        deform_only = model.deform_head(moving_feats[1], fixed_feats[1], None)
    assert (head_affine - torch.eye(3, 4)).abs().max() > 1e-2  # the released head is not the identity
    feeds = {"fixed": fixed.numpy(), "moving": moving.numpy()}
    ident = ort.InferenceSession(str(official_tiny["identity"] / "registration.onnx")).run(None, feeds)
    trained = ort.InferenceSession(str(official_tiny["trained"] / "registration.onnx")).run(None, feeds)
    assert np.array_equal(ident[0], np.eye(3, 4, dtype=np.float32)[None])
    assert np.abs(ident[1] - deform_only.numpy()).max() < 1e-5  # the fused field is the deformable head's
    assert np.abs(trained[0] - head_affine.numpy()).max() < 1e-5
    assert np.abs(trained[1] - ident[1]).max() > 1e-3
    identity_manifest = json.loads((official_tiny["identity"] / "manifest.json").read_text())
    trained_manifest = json.loads((official_tiny["trained"] / "manifest.json").read_text())
    assert identity_manifest["model"]["affine_head"] == "identity"
    assert trained_manifest["model"]["affine_head"] == "trained"
    assert identity_manifest["preprocess"]["spacing"] is None and identity_manifest["preprocess"]["canonical"] is False


def test_info_says_which_affine_registration_applies(official_tiny, tiny_run, tmp_path):
    folder = CliRunner().invoke(app, ["info", str(official_tiny["identity"])])
    graph = CliRunner().invoke(app, ["info", str(official_tiny["identity"] / "registration.onnx")])
    trained = CliRunner().invoke(app, ["info", str(official_tiny["trained"])])
    for res in (folder, graph, trained):
        assert res.exit_code == 0, res.output
    assert "registration affine: registration uses the identity affine" in folder.output
    assert "registration affine: registration uses the identity affine" in graph.output
    assert "registration affine: the affine head's output (trained)" in trained.output
    assert '"canonical": false' in folder.output
    res = _cli(str(tiny_run), "-o", str(tmp_path / "out"), "--official-affine")
    assert res.exit_code == 2 and "--official-affine is for official .pth checkpoints" in res.output
    assert not (tmp_path / "out").exists()


def test_register_of_an_official_import_is_the_deformable_head_alone(official_tiny):
    """What the torch backend runs (``GVSL.register``); training's forward still runs the affine head."""
    from gvsl.io import load_official

    tiny = ModelConfig.from_preset("tiny")
    imported = load_official(official_tiny["pth"], tiny).eval()
    released = load_official(official_tiny["pth"], tiny, affine_head="trained").eval()
    torch.manual_seed(6)
    fixed, moving = torch.rand(2, 2, 1, 16, 16, 32)
    with torch.no_grad():
        affine, dvf, warped = imported.register(fixed, moving)
        local = imported.deform_head(imported.encode(moving)[1], imported.encode(fixed)[1], None)
        assert torch.equal(affine, torch.eye(3, 4).expand(2, 3, 4)) and torch.equal(dvf, local)
        assert torch.allclose(warped, dvf_warp(moving, local), atol=1e-6)
        trained_affine = released.register(fixed, moving)[0]
        assert torch.equal(imported(fixed, moving).affine, released(fixed, moving).affine)
    assert (trained_affine - affine).abs().max() > 1e-2


# ----------------------------------------------------------------------------- bad input
def _cli(*args: str):
    return CliRunner().invoke(app, ["export", *args, "--quiet"])


def _clean(parent: Path) -> bool:
    return not any(p.name.startswith(".") for p in parent.iterdir())


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--opset", "10"], "opset 10 is too old"),
        (["--opset", "17", "--warp", "grid_sample"], "opset >= 20"),
        (["--verify-shape", "1,16,20,16"], "multiples of 16"),
        (
            [
                "--format",
                "engine",
                "--min-shape",
                "1,32,32,32",
                "--opt-shape",
                "1,16,16,16",
                "--max-shape",
                "1,64,64,64",
            ],
            "min <= opt <= max",
        ),
        (
            [
                "--format",
                "engine",
                "--min-shape",
                "1,24,32,32",
                "--opt-shape",
                "1,32,32,32",
                "--max-shape",
                "1,64,64,64",
            ],
            "multiples of 16",
        ),
        (["--precision", "bf16"], "bf16 is for TensorRT engines"),
        (["--precision", "int8"], "choose from"),
        (["--widths", "small"], "do not match"),
    ],
)
def test_bad_options_fail_in_one_line_and_write_nothing(tiny_run, tmp_path, extra, message):
    res = _cli(str(tiny_run), "-o", str(tmp_path / "out"), *extra)
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and _clean(tmp_path)


def test_bad_sources_fail_in_one_line(tmp_path):
    missing = _cli(str(tmp_path / "nope.pth"), "-o", str(tmp_path / "o1"))
    assert missing.exit_code == 2 and "no such file" in missing.output
    corrupt = tmp_path / "bad.pth"
    corrupt.write_bytes(b"not a checkpoint at all")
    res = _cli(str(corrupt), "-o", str(tmp_path / "o2"))
    assert res.exit_code == 2 and "bad.pth" in res.output and "not a loadable" in res.output
    torch.save(GVSL(ModelConfig.from_preset("tiny")).state_dict(), tmp_path / "tiny.pth")
    res = _cli(str(tmp_path / "tiny.pth"), "-o", str(tmp_path / "o3"))  # default widths assumed
    assert res.exit_code == 2 and "do not fit widths" in res.output
    empty = tmp_path / "run"
    (empty / "checkpoints").mkdir(parents=True)
    res = _cli(str(empty), "-o", str(tmp_path / "o4"))
    assert res.exit_code == 2 and "no final model" in res.output
    assert all(not (tmp_path / f"o{i}").exists() for i in range(1, 5)) and _clean(tmp_path)


def test_tensorrt_absent_is_a_clear_error(tiny_run, tmp_path):
    pytest.importorskip("onnx")
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    res = _cli(str(tiny_run), "-o", str(tmp_path / "out"), "--format", "engine")
    assert res.exit_code == 2 and "TensorRT is not installed" in res.output and "pip install tensorrt" in res.output
    assert not (tmp_path / "out").exists() and _clean(tmp_path)


def test_existing_output_needs_force_and_parity_failure_writes_nothing(tiny_run, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    res = _cli(str(tiny_run), "-o", str(out))
    assert res.exit_code == 2 and "--force" in res.output and (out / "keep.txt").exists()

    import gvsl.export.verify as verify_module

    real = verify_module.reference

    def broken(model, kind, inputs, dense=True):
        return [r + 0.01 for r in real(model, kind, inputs, dense)]

    monkeypatch.setattr(verify_module, "reference", broken)
    res = _cli(str(tiny_run), "-o", str(out), "--force", "--verify-shape", "1,16,16,16")
    assert res.exit_code == 2 and "parity with PyTorch failed" in res.output
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and _clean(tmp_path)
    monkeypatch.setattr(verify_module, "reference", real)
    res = _cli(str(tiny_run), "-o", str(out), "--force", "--verify-shape", "1,16,16,16")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == [
        "encoder.onnx",
        "manifest.json",
        "refine.onnx",
        "refine_affine.onnx",
        "refine_mi.onnx",
        "registration.onnx",
    ]
    assert _clean(tmp_path)
