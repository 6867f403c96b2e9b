"""`gvsl bench` and the fast paths it measures: tiny runs whose records must be consistent
(ratios, throughputs and TFLOP/s are the timings they come from; torch eager is the baseline of
itself), the FLOP count against PyTorch's counter, the opt-in int8 mode, the training speed
options, and the unchanged results of the faster preprocessing."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from gvsl.cli import bench as benchmark
from gvsl.cli.main import app
from gvsl.config import ModelConfig
from gvsl.model import GVSL

# the module (gvsl.runtime re-exports a function of that name)
preprocessing = importlib.import_module("gvsl.runtime.preprocess")

runner = CliRunner()


def cli(*args: str):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


# ----------------------------------------------------------------------------- FLOPs
@pytest.mark.parametrize("kind", ["encoder", "registration"])
def test_flop_count_matches_pytorch_counter(kind):
    from torch.utils.flop_counter import FlopCounterMode

    cfg = ModelConfig.from_preset("tiny")
    model = GVSL(cfg).eval()
    x = torch.rand(2, 1, 32, 32, 48)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.encode(x) if kind == "encoder" else model.register(x, x.flip(2))
    ours = benchmark.model_flops(cfg.to_dict(), kind, 2, (32, 32, 48))
    # all but the few hundred FLOPs of building the 3x3 affine matrices
    assert ours == pytest.approx(counter.get_total_flops(), rel=1e-6)


def test_flop_count_default_widths_matches_the_issue_figures():
    cfg = ModelConfig().to_dict()
    assert benchmark.model_flops(cfg, "encoder", 1, (64, 64, 64)) / 1e9 == pytest.approx(144, abs=1)
    # the issue's 2,522 GFLOP is the training forward: inference registration + the restoration head
    n = 128**3
    restore = 2 * 32 * 16 * 27 * n + 2 * 16 * n
    assert (benchmark.model_flops(cfg, "registration", 1, (128,) * 3) + restore) / 1e9 == pytest.approx(2522, abs=2)


def test_summarize():
    st = benchmark.summarize([3.0, 1.0, 2.0, 4.0])
    assert st == {"median": 2.5, "p25": 1.75, "p75": 3.25, "min": 1.0, "max": 4.0, "n": 4}
    assert benchmark.summarize([0.5]) == {"median": 0.5, "p25": 0.5, "p75": 0.5, "min": 0.5, "max": 0.5, "n": 1}


# ----------------------------------------------------------------------------- gvsl bench
def test_bench_cli_tiny_writes_table_and_json(tmp_path):
    out, md = tmp_path / "b.json", tmp_path / "b.md"
    res = cli(
        "bench", "--widths", "tiny", "--sizes", "16,32", "--batch", "1,2", "--kind", "encoder,registration",
        "--backend", "torch,onnxruntime,tensorrt", "--device", "cpu", "--repeats", "2", "--no-memory",
        "--json", out, "--markdown", md,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "inference" in res.output and "× torch eager" in res.output
    data = json.loads(out.read_text())
    assert {"machine", "command", "config", "inference"} <= set(data)
    assert data["machine"]["cores"] >= 1 and data["machine"]["numpy"]
    recs = data["inference"]
    assert len(recs) == 2 * 2 * 2 * 4  # kinds x sizes x batches x (torch, onnxruntime, tensorrt fp16/bf16)
    ok = [r for r in recs if r["status"] == "ok"]
    assert {r["backend"] for r in ok} == {"torch", "onnxruntime"}
    tiny = ModelConfig.from_preset("tiny").to_dict()
    eager = {(r["kind"], r["size"], r["batch"]): r for r in ok if r["backend"] == "torch"}
    for r in ok:
        st = r["latency_s"]
        assert st["n"] == 2 and st["min"] <= st["median"] <= st["max"]
        # every derived figure is the timing it comes from
        assert r["gflop"] == benchmark.model_flops(tiny, r["kind"], r["batch"], (r["size"],) * 3) / 1e9
        assert r["samples_per_s"] == pytest.approx(r["batch"] / st["median"])
        assert r["tflops"] == pytest.approx(r["gflop"] / 1e3 / st["median"])
        base = eager[(r["kind"], r["size"], r["batch"])]
        assert r["x_baseline"] == pytest.approx(base["latency_s"]["median"] / st["median"])
        assert r["cosine_to_fp32"] > 0.9999  # fp32 ONNX = torch fp32
    assert all(r["x_baseline"] == 1.0 and r["cosine_to_fp32"] == pytest.approx(1.0) for r in eager.values())
    assert all(r["status"].startswith("unavailable") for r in recs if r["backend"].startswith("tensorrt"))
    text = md.read_text()
    assert text.startswith("| kind | size | batch | backend |") and "onnxruntime" in text


def test_bench_memory_probe_and_int8(tmp_path, mni_t1_path):
    setup = benchmark.BenchSetup(
        widths="tiny", device="cpu", patch=32, workdir=tmp_path, calibration=(str(mni_t1_path),), log=lambda s: None
    )
    recs = benchmark.bench_inference(
        setup, ["torch", "onnxruntime", "onnxruntime-int8"], ["encoder"], [32], [1], repeats=1, memory=True
    )
    by = {r["backend"]: r for r in recs}
    assert all(r["status"] == "ok" for r in recs), recs
    for r in recs:
        assert r["peak_host_mb"] > 50 and r["peak_device_mb"] is None
    # the ONNX-only child process never imports torch, so it needs less memory
    assert by["onnxruntime"]["peak_host_mb"] < by["torch"]["peak_host_mb"]
    assert by["onnxruntime-int8"]["precision"] == "int8"
    assert by["onnxruntime-int8"]["cosine_to_fp32"] > 0.95


def test_bench_bad_options_are_one_line():
    res = cli("bench", "--widths", "tiny", "--sizes", "20", "--device", "cpu")
    assert res.exit_code == 2 and "multiples of 16" in res.output
    res = cli("bench", "--widths", "tiny", "--backend", "nonsense", "--device", "cpu")
    assert res.exit_code == 2 and "unknown nonsense" in res.output


def test_bench_train_tiny():
    recs = benchmark.bench_train(sizes=[16], widths="tiny", device="cpu", batch=2, repeats=2, warmup=1)
    by = {r["variant"]: r for r in recs}
    assert set(by) == {"official-style", "gvsl"} and all(r["status"] == "ok" for r in recs)
    assert by["gvsl"]["batch"] == 2 and by["gvsl"]["channels_last"] and by["gvsl"]["precision"] == "fp32"
    assert by["official-style"]["batch"] == 1 and not by["official-style"]["channels_last"]
    for r in recs:
        assert r["step_s"]["n"] == 2
        assert r["samples_per_s"] == pytest.approx(r["batch"] / r["step_s"]["median"])
    assert by["official-style"]["x_official"] == pytest.approx(1.0)
    official_rate = by["official-style"]["samples_per_s"]
    assert by["gvsl"]["x_official"] == pytest.approx(by["gvsl"]["samples_per_s"] / official_rate)


def test_official_style_reference_damages_and_deforms():
    """The official-style reference does the authors' work: Models Genesis damage changes the
    volume but keeps its shape and dtype; the spatial transform moves all volumes alike."""
    from gvsl.cli.bench.official import official_appearance, official_spatial

    rng = np.random.default_rng(0)
    x = np.random.default_rng(1).random((1, 32, 32, 32), dtype=np.float32)
    damaged = official_appearance(x.copy(), rng)
    assert damaged.shape == x.shape and damaged.dtype == np.float32
    assert np.abs(damaged - x).mean() > 0.05
    a, b = official_spatial([x[0], x[0]], np.random.default_rng(2))
    np.testing.assert_array_equal(a, b)  # one draw for every volume of the sample
    assert np.abs(a - x[0]).mean() > 0.05


def test_bench_preprocess_small(tmp_path):
    pytest.importorskip("SimpleITK")
    recs = benchmark.bench_preprocess(shape=(96, 80, 40), repeats=2, workdir=tmp_path)
    by = {r["case"]: r for r in recs}
    gvsl_chains = [f"gvsl read+reorient+resample+normalise (.{fmt})" for fmt in ("nii", "nii.gz")] + [
        "gvsl read+reorient+resample+normalise (.nii.gz, ISA-L, no overlap)",
        "gvsl read+reorient+resample+normalise (.nii.gz, zlib inflate)",
    ]
    assert set(gvsl_chains) <= set(by) and "SimpleITK Resample, linear (in memory)" in by
    ref = by["SimpleITK Resample, linear (in memory)"]["time_s"]["median"]
    assert by["SimpleITK Resample, linear (in memory)"]["x_sitk_resample"] == 1.0
    for r in recs:
        assert r["time_s"]["n"] == 2
        assert r["x_sitk_resample"] == pytest.approx(r["time_s"]["median"] / ref)
    for fmt in ("nii", "nii.gz"):  # each gvsl chain is also set against SimpleITK reading the same file
        peer = by[f"SimpleITK ReadImage+Resample (.{fmt})"]["time_s"]["median"]
        rec = by[f"gvsl read+reorient+resample+normalise (.{fmt})"]
        assert rec["x_sitk_read_resample"] == pytest.approx(rec["time_s"]["median"] / peer)
    assert not list(tmp_path.glob("ct.*"))  # the big files are removed


def test_the_benchmarked_read_paths_give_the_same_numbers(tmp_path):
    """The preprocessing benchmark times three ways to read a .nii.gz (overlapped ISA-L, plain
    ISA-L, nibabel's zlib): each must give the same voxels, or the table compares different work."""
    rng = np.random.default_rng(0)
    data = rng.normal(0, 400, size=(70, 64, 40)).astype(np.int16)
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([-0.7, -0.7, 1.0, 1.0])), path)
    cfg = preprocessing.PreprocessConfig(spacing=(1.0, 1.0, 1.0), modality="ct")
    isal = preprocessing.load_volume(path, keep_dtype=True)
    zlib = preprocessing.load_volume(path, keep_dtype=True, isal=False)
    np.testing.assert_array_equal(isal.data, data)
    np.testing.assert_array_equal(zlib.data, data)
    _, overlapped = preprocessing.load_preprocessed(path, cfg)
    for vol in (isal, zlib):
        np.testing.assert_array_equal(preprocessing.preprocess(vol, cfg).data, overlapped.data)


# ----------------------------------------------------------------------------- int8 runtime mode
def test_int8_embedder_is_opt_in_cached_and_close_to_fp32(tmp_path, mni_t1_path):
    from gvsl.config import ModelConfig
    from gvsl.export.pipeline import ExportOptions, run_export
    from gvsl.io import save_model
    from gvsl.runtime import Embedder, GvslInputError
    from gvsl.runtime.backends import quantize_int8, read_onnx_metadata

    torch.manual_seed(0)
    pre = preprocessing.PreprocessConfig(spacing=(4.0, 4.0, 4.0), modality="mr")
    save_model(GVSL(ModelConfig.from_preset("tiny")), tmp_path / "m", preprocess=pre.to_dict(),
               extra={"patch_size": [32, 32, 32]})  # fmt: skip
    run_export(tmp_path / "m", tmp_path / "e", ExportOptions(verify=False))
    fp32 = Embedder(tmp_path / "e", backend="onnxruntime", device="cpu")
    int8 = Embedder(tmp_path / "e", backend="onnxruntime", device="cpu", int8_calibration=[mni_t1_path],
                    cache_dir=tmp_path / "cache")  # fmt: skip
    assert fp32.info.precision == "fp32" and int8.info.precision == "int8"
    cached = list((tmp_path / "cache" / "int8").glob("*.onnx"))
    assert len(cached) == 1
    # real anatomy held out from calibration: the GM map on the same model
    gm = str(mni_t1_path).replace("_t1_", "_gm_")
    for vol in (gm, mni_t1_path):
        a, b = fp32.embed(vol).embedding, int8.embed(vol).embedding
        assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) > 0.98
    # written file is a self-describing gvsl artifact that loads like any export
    out = quantize_int8(tmp_path / "e", tmp_path / "enc.int8.onnx", [mni_t1_path])
    assert read_onnx_metadata(out)["gvsl.precision"] == "int8"
    assert Embedder(out, device="cpu").info.precision == "int8"
    with pytest.raises(GvslInputError, match="int8"):
        Embedder(tmp_path / "m", backend="torch", device="cpu", int8_calibration=[mni_t1_path])
    with pytest.raises(GvslInputError, match="CPU"):
        Embedder(tmp_path / "e", backend="onnxruntime", device="cuda", int8_calibration=[mni_t1_path])


# ----------------------------------------------------------------------------- training speed options
def test_train_channels_last_option(tmp_path, mni_t1_path):
    from gvsl.train import TrainConfig, train

    img = nib.load(mni_t1_path)
    data = np.asarray(img.dataobj, dtype=np.float32)[::4, ::4, ::4]
    aff = img.affine.copy()
    aff[:3, :3] *= 4
    for k in range(2):
        nib.save(nib.Nifti1Image(np.roll(data, k, axis=0), aff), tmp_path / f"v{k}.nii.gz")
    cfg = TrainConfig(
        data=[str(tmp_path)], out=str(tmp_path / "run"), iterations=2, patch_size=(16, 16, 16), batch_size=2,
        widths=[8, 16, 16, 32, 32, 32, 16, 16, 8], affine_width=32, deform_width=8, restore_width=8,
        preprocess={"spacing": None, "modality": "mr"}, device="cpu", channels_last=True,
    )  # fmt: skip
    res = train(cfg, log=lambda s: None)
    assert res.step == 2 and np.isfinite(res.last_metrics["total"])
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["channels_last"] is True and saved["compile"] is False
    # configs written before these options existed still load
    old = {k: v for k, v in saved.items() if k not in ("channels_last", "compile")}
    assert TrainConfig.from_dict(old).channels_last is False


# ----------------------------------------------------------------------------- preprocessing: faster, same numbers
def _reference_load(path: Path) -> np.ndarray:
    return np.ascontiguousarray(nib.load(path).get_fdata(dtype=np.float32).reshape(nib.load(path).shape[:3]))


@pytest.mark.parametrize("dtype", ["int16", "uint8", "int32", "float32", "float64", "scaled"])
def test_fast_load_is_bit_identical_to_nibabel(tmp_path, dtype):
    rng = np.random.default_rng(0)
    shape = (130, 120, 70)  # > 1M voxels: the blocked, threaded conversion
    raw = rng.normal(0, 500, size=shape)
    arr = raw.astype("int16" if dtype == "scaled" else dtype)
    if dtype == "uint8":
        arr = np.abs(raw).astype(np.uint8)
    img = nib.Nifti1Image(arr, np.diag([-0.7, 0.8, 1.1, 1.0]))
    if dtype == "scaled":
        img.header.set_slope_inter(0.37, -12.0)
    path = tmp_path / f"v_{dtype}.nii"
    nib.save(img, path)
    vol = preprocessing.load_volume(path)
    # the file's own x-fastest layout: preprocess() resamples it without a full-size transpose
    assert vol.data.flags.f_contiguous and vol.data.dtype == np.float32
    np.testing.assert_array_equal(vol.data, _reference_load(path))


def test_fast_load_still_rejects_nan(tmp_path):
    arr = np.ones((128, 128, 80), np.float32)
    arr[5, 6, 7] = np.nan
    nib.save(nib.Nifti1Image(arr, np.eye(4)), tmp_path / "nan.nii")
    with pytest.raises(preprocessing.GvslInputError, match="NaN"):
        preprocessing.load_volume(tmp_path / "nan.nii")


@pytest.mark.parametrize(
    "cfg",
    [
        preprocessing.PreprocessConfig(),
        preprocessing.PreprocessConfig(modality="mr", spacing=(1.3, 0.9, 2.0)),
        preprocessing.PreprocessConfig(modality="none"),
        preprocessing.PreprocessConfig(spacing=None),
        preprocessing.PreprocessConfig(canonical=False, spacing=(0.8, 0.8, 0.8)),
    ],
)
def test_preprocess_equals_the_composition_of_its_steps(cfg):
    """The view-based reorientation and in-place normalisation give exactly what the
    public steps (to_canonical -> resample -> normalize_intensity) give."""
    rng = np.random.default_rng(1)
    data = rng.normal(0, 400, size=(150, 140, 60)).astype(np.float32)
    aff = np.array([[0.0, 0.0, -1.2, 30.0], [-0.7, 0.0, 0.0, 50.0], [0.0, 0.8, 0.0, -20.0], [0, 0, 0, 1]])
    vol = preprocessing.Volume(data.copy(), aff)
    ref = preprocessing.to_canonical(vol) if cfg.canonical else vol
    if cfg.spacing is not None:
        ref = preprocessing.resample(ref, cfg.spacing)
    expect = preprocessing.normalize_intensity(ref.data, cfg)
    out = preprocessing.preprocess(vol, cfg)
    np.testing.assert_array_equal(out.data, expect)
    np.testing.assert_array_equal(out.affine, ref.affine)
    assert out.data.flags.c_contiguous
    np.testing.assert_array_equal(vol.data, data)  # the input is never modified
