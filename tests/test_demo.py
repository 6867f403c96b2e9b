"""`gvsl demo` end to end at tiny size, the shipped default model (loads from package files,
finite and deterministic embeddings, used by `gvsl embed` / `gvsl register` without --model,
within its size budget), and the registration benchmark at tiny size."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from gvsl.cli.main import app
from gvsl.runtime.default_model import default_model_dir
from gvsl.synth import SAMPLE_LABELS, SAMPLE_T1

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
CROP = (slice(16, 64), slice(24, 72), slice(16, 64))  # 48^3 at 2 mm: one window of the default model


@pytest.fixture(scope="module")
def small_sample(tmp_path_factory) -> tuple[Path, Path]:
    """A 48^3 crop of the bundled 2 mm sample (T1, labels), so the default model runs one window."""
    folder = tmp_path_factory.mktemp("sample")
    out = []
    for src, name in ((SAMPLE_T1, "t1.nii.gz"), (SAMPLE_LABELS, "t1_labels.nii.gz")):
        img = nib.load(src)
        aff = img.affine.copy()
        aff[:3, 3] = aff[:3, :3] @ np.array([c.start for c in CROP]) + aff[:3, 3]
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[CROP], aff), folder / name)
        out.append(folder / name)
    return out[0], out[1]


def test_default_model_is_shipped_small_and_documented():
    d = default_model_dir()
    files = {p.name: p.stat().st_size for p in d.iterdir()}
    model_bytes = sum(files[f] for f in ("model.safetensors", "encoder.onnx", "registration.onnx"))
    assert model_bytes <= 20 * 1024 * 1024, files
    prov = (d / "PROVENANCE.md").read_text()
    for must in ("benchmarks/train_default.sh", "ICBM152", "nibabel", "iterations", "final"):
        assert must in prov
    meta = json.loads((d / "model.json").read_text())
    assert meta["train"]["steps"] > 0 and meta["preprocess"]["modality"] == "mr"


def test_default_model_embeds_finite_and_deterministic(small_sample):
    from gvsl.runtime.embed import Embedder

    with Embedder(default_model_dir(), "onnxruntime", "cpu") as e:
        a = e.embed(str(small_sample[0])).embedding
        b = e.embed(str(small_sample[0])).embedding
    assert a.shape == (96,) and np.isfinite(a).all() and np.abs(a).sum() > 0
    np.testing.assert_array_equal(a, b)


def test_embed_and_register_without_model_use_the_default(small_sample, tmp_path):
    t1, labels = small_sample
    r = runner.invoke(app, ["embed", str(t1), "-o", str(tmp_path / "emb"), "-q"])
    assert r.exit_code == 0, r.output
    emb = np.load(tmp_path / "emb" / "t1.npy")
    assert emb.shape == (96,) and np.isfinite(emb).all()
    r = runner.invoke(
        app,
        [
            "register",
            str(t1),
            str(t1),
            "-o",
            str(tmp_path / "w.nii.gz"),
            "--labels",
            str(labels),
            "--metrics",
            str(tmp_path / "m.json"),
            "-q",
        ],
    )
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "m.json").read_text())
    # the command's outputs are the shipped model's: the same figures and warped image as the
    # runtime gives with default_model_dir() (registration quality on real pairs:
    # test_default_model_registration_improves_unseen_pairs)
    from gvsl.runtime.embed import Embedder
    from gvsl.runtime.register import Registrar

    with Embedder(default_model_dir(), "onnxruntime", "cpu") as embedder:
        np.testing.assert_allclose(emb, embedder.embed(str(t1)).embedding, rtol=1e-5, atol=1e-6)
    with Registrar(default_model_dir(), "onnxruntime", "cpu") as registrar:
        direct = registrar.register(str(t1), str(t1), labels=[str(labels)])
    assert m["ncc_before"] == pytest.approx(1.0)
    for key in ("ncc_after", "jacobian_min", "folding_percent"):
        assert m[key] == pytest.approx(direct.metrics[key], rel=1e-4, abs=1e-6), key
    warped = nib.load(tmp_path / "w.nii.gz")
    assert warped.shape == nib.load(t1).shape
    np.testing.assert_allclose(warped.get_fdata(), direct.warped, rtol=1e-4, atol=1e-3)


def test_default_model_registration_improves_unseen_pairs(tmp_path):
    """The shipped model really registers: on synthetic subjects it never saw (bundled 2 mm
    sample, seed 4242: new random affine + elastic deformation + intensity changes), warping
    the moving image and its labels with the model's field raises NCC and grey/white-matter
    Dice over doing nothing, with little folding (EVALUATION.md §1 has the full benchmark)."""
    from gvsl.runtime.metrics import dice
    from gvsl.runtime.register import Registrar
    from gvsl.synth import load_label_map, make_subjects

    subjects = make_subjects(tmp_path, 4, seed=4242, source="sample", spacing=2.0)
    gains = []
    with Registrar(default_model_dir(), "onnxruntime", "cpu") as reg:
        for fx, mv in ((subjects[0], subjects[1]), (subjects[2], subjects[3])):
            fixed_lab, moving_lab = load_label_map(fx["labels"]), load_label_map(mv["labels"])
            res = reg.register(fx["image"], mv["image"], labels=[mv["labels"]])
            m, warped_lab = res.metrics, res.labels[0]
            d = [dice(fixed_lab == k, warped_lab == k) - dice(fixed_lab == k, moving_lab == k) for k in (1, 2)]
            gains.append((m["ncc_after"] - m["ncc_before"], *d))
            assert m["folding_percent"] < 1.0, m  # measured 0.10 and 0.41 %
    gains = np.array(gains)
    assert (gains > 0).all(), gains  # every pair, NCC and both tissues
    # measured: NCC +0.11/+0.20, GM Dice +0.11/+0.16, WM Dice +0.09/+0.13
    assert gains[:, 0].mean() > 0.05 and gains[:, 1:].mean() > 0.05, gains


def test_embed_int8_flag_is_opt_in_cached_and_close_to_fp32(small_sample, tmp_path, monkeypatch):
    """`gvsl embed --int8`: an int8 copy of the encoder (calibrated on the bundled sample by
    default), cached once, whose embedding stays within cosine 0.99 of the fp32 one."""
    monkeypatch.setenv("GVSL_CACHE_DIR", str(tmp_path / "cache"))
    t1 = str(small_sample[0])
    assert runner.invoke(app, ["embed", t1, "-o", str(tmp_path / "fp32"), "-q"]).exit_code == 0
    r = runner.invoke(app, ["embed", t1, "-o", str(tmp_path / "int8"), "--int8", "-q"])
    assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "cache" / "int8").glob("*.onnx"))) == 1
    a, b = np.load(tmp_path / "fp32" / "t1.npy"), np.load(tmp_path / "int8" / "t1.npy")
    assert not np.array_equal(a, b)  # really a different graph
    assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) >= 0.99
    r = runner.invoke(app, ["embed", t1, "-o", str(tmp_path / "x"), "--int8-calibration", t1, "-q"])
    assert r.exit_code != 0 and "--int8" in r.output
    r = runner.invoke(app, ["embed", t1, "-o", str(tmp_path / "x"), "--int8", "--backend", "torch", "-q"])
    assert r.exit_code != 0 and "ONNX Runtime" in r.output


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    r = runner.invoke(app, ["demo", "-o", str(out), "--subjects", "3", "--iterations", "6", "-q"])
    assert r.exit_code == 0, r.output
    for f in (
        "summary.md",
        "summary.json",
        "registration.png",
        "deformation.png",
        "embedding_similarity.png",
        "registration_default_model.png",
        "deformation_default_model.png",
        "warped.nii.gz",
        "dvf.nii.gz",
    ):
        assert (out / f).is_file(), f
    s = json.loads((out / "summary.json").read_text())
    assert s["train"]["iterations"] == 6 and set(s["registration"]) == {"demo", "default"}
    # both models register: NCC and grey/white-matter Dice rise over doing nothing
    # (measured: demo NCC 0.825 -> 0.887, GM Dice 0.52 -> 0.57; default 0.825 -> 0.969, 0.52 -> 0.67)
    for name, m in s["registration"].items():
        assert m["ncc_after"] > m["ncc_before"] + 0.02, (name, m)
        assert m["dice_gm_after"] > m["dice_gm_before"] and m["dice_wm_after"] > m["dice_wm_before"], (name, m)
        # refinement (the demo's default) adds to what the network alone reaches
        for tissue in ("gm", "wm"):
            assert m[f"dice_{tissue}_after"] > m[f"dice_{tissue}_network_only"] + 0.02, (name, tissue, m)
    assert s["registration"]["default"]["ncc_after"] > s["registration"]["default"]["ncc_before"] + 0.1
    # the written outputs are the ones measured: the demo model's warped image and labels
    from gvsl.runtime.metrics import dice, ncc

    pair = s["registration_pair"]
    fixed = nib.load(out / "subjects" / f"{pair['fixed']}.nii.gz")
    warped = nib.load(out / "warped.nii.gz")
    assert warped.shape == fixed.shape and np.allclose(warped.affine, fixed.affine)
    demo = s["registration"]["demo"]
    assert ncc(fixed.get_fdata(), warped.get_fdata()) == pytest.approx(demo["ncc_after"], abs=2e-3)
    fixed_labels = np.rint(nib.load(out / "subjects" / f"{pair['fixed']}_labels.nii.gz").get_fdata())
    warped_labels = np.rint(nib.load(out / "warped_labels.nii.gz").get_fdata())
    assert dice(fixed_labels == 1, warped_labels == 1) == pytest.approx(demo["dice_gm_after"])
    assert "| demo (trained above) |" in (out / "summary.md").read_text()
    r = runner.invoke(app, ["demo", "-o", str(out)])
    assert r.exit_code == 2 and "not an empty folder" in r.output


