"""gvsl.probe / `gvsl probe` / `gvsl finetune`: the probe beats a majority-class baseline on a
separable toy; a few iterations run and save a model that exports; the torch-free head gives the
torch head's segmentation and the reported Dice; bad labels and too few subjects are one clear
line; the linear-probe benchmark at tiny size reports figures consistent with its embeddings."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from gvsl.cli.main import app
from gvsl.io import load_model
from gvsl.probe import (
    Case,
    DownstreamConfig,
    apply_head,
    dice_scores,
    find_pairs,
    finetune,
    linear_probe,
    load_backbone,
    load_cases,
    save_downstream,
    split_cases,
)
from gvsl.runtime.errors import GvslInputError
from gvsl.runtime.preprocess import PreprocessConfig
from gvsl.synth import make_subjects

PRE = PreprocessConfig(spacing=(4.0, 4.0, 4.0), modality="mr")
runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("labelled")
    make_subjects(folder, 3, seed=11, source="sample", spacing=4.0)
    return folder


@pytest.fixture(scope="module")
def cases(labelled):
    return load_cases(find_pairs([labelled]), PRE, 3)


def test_pairs_by_name_and_cases_on_one_grid(labelled, cases):
    pairs = find_pairs([labelled])
    assert [p[1].name for p in pairs] == [f"subject_00{k}_labels.nii.gz" for k in range(3)]
    assert all(c.image.shape == c.labels.shape for c in cases)
    assert set(np.unique(cases[0].labels)) == {0, 1, 2}


def _banded_toy(seed: int) -> Case:
    """A separable toy: three bands along x (class 1, the majority, in the middle), each of its
    own intensity plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((32, 32, 32), np.int64)
    labels[:, :, rng.integers(7, 10) :] = 1
    labels[:, :, rng.integers(23, 26) :] = 2
    image = np.array([0.0, 1.0, 2.0], np.float32)[labels] + rng.normal(0, 0.1, labels.shape).astype(np.float32)
    return Case(f"toy{seed}", image, labels, np.eye(4))


def test_probe_beats_the_majority_class_on_a_separable_toy():
    cases = [_banded_toy(seed) for seed in range(3)]
    net, _ = load_backbone(None, widths="tiny", seed=0)
    res = linear_probe(net, cases[:2], cases[2:], DownstreamConfig(num_classes=3, iterations=40, voxels=4096))
    train_labels = np.concatenate([c.labels.ravel() for c in cases[:2]])
    majority = int(np.bincount(train_labels).argmax())
    assert majority == 1
    baseline = dice_scores(np.full_like(cases[2].labels, majority), cases[2].labels, 3)
    # measured: probe 0.71 / 0.82 (mean 0.76) against the baseline's 0.61 / 0.00 (mean 0.30)
    assert res.dice["1"] > baseline["1"] and res.dice["2"] > baseline["2"] + 0.5, (res.dice, baseline)
    assert res.dice["mean"] > baseline["mean"] + 0.3, (res.dice, baseline)


def test_probe_trains_saves_and_exports(cases, tmp_path):
    from gvsl.probe import _conv_head, _features

    net, meta = load_backbone(None, widths="tiny", seed=0)
    meta["preprocess"] = PRE.to_dict()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    train, val = split_cases(cases, 0.34, seed=0)
    res = linear_probe(net, train, val, DownstreamConfig(num_classes=3, iterations=20, voxels=4096))
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # frozen
    out = save_downstream(tmp_path / "probe", net, meta, res, (32, 32, 32))
    head = np.load(out / "head.npz")
    assert head["weight"].shape == (3, 8) and json.loads((out / "metrics.json").read_text())["mode"] == "probe"
    # the saved numpy head on dense features segments as the torch head does, and its Dice is the reported one
    feats = _features(net, val[0].image, torch.device("cpu"))
    numpy_seg = apply_head(feats.numpy(), head["weight"], head["bias"])
    with torch.no_grad():
        torch_head = _conv_head(torch.from_numpy(head["weight"]), torch.from_numpy(head["bias"]))
        torch_seg = torch_head(feats[None])[0].argmax(0).numpy()
    assert (numpy_seg == torch_seg).mean() > 0.999  # argmax ties aside, float rounding differs
    assert set(np.unique(numpy_seg)) == {0, 1, 2}
    numpy_dice = dice_scores(numpy_seg, val[0].labels, 3)
    assert res.per_case[0]["case"] == val[0].name
    for k in ("1", "2", "mean"):
        assert numpy_dice[k] == pytest.approx(res.per_case[0][k], abs=1e-3)
    # the saved model is a regular gvsl model: it reloads and exports
    model, m = load_model(out)
    assert m["patch_size"] == [32, 32, 32] and m["downstream"]["mode"] == "probe"
    from gvsl.export.pipeline import ExportOptions, run_export

    run_export(out, tmp_path / "export", ExportOptions(verify=False))
    assert (tmp_path / "export" / "encoder.onnx").is_file()


def test_finetune_changes_the_backbone_and_saves(cases, tmp_path):
    net, meta = load_backbone(None, widths="tiny", seed=0)
    before = {k: v.clone() for k, v in net.unet.state_dict().items()}
    res = finetune(net, cases[:2], cases[2:], DownstreamConfig(num_classes=3, iterations=3, patch_size=(32, 32, 32)))
    assert len(res.losses) == 3 and np.isfinite(res.losses).all()
    assert any(not torch.equal(before[k], v) for k, v in net.unet.state_dict().items())
    out = save_downstream(tmp_path / "ft", net, {**meta, "preprocess": PRE.to_dict()}, res, (32, 32, 32))
    model, _ = load_model(out)
    assert torch.equal(model.unet.inc.double_conv[0].weight, net.unet.inc.double_conv[0].weight.cpu())


def test_bad_labels_are_one_clear_line(labelled, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    img = nib.load(labelled / "subject_000.nii.gz")
    lab = np.asarray(nib.load(labelled / "subject_000_labels.nii.gz").dataobj)
    nib.save(img, folder / "a.nii.gz")
    with pytest.raises(GvslInputError, match="a_labels.nii.gz"):
        find_pairs([folder])  # missing label map
    nib.save(nib.Nifti1Image((lab + 3).astype(np.uint8), img.affine), folder / "a_labels.nii.gz")
    with pytest.raises(GvslInputError, match=r"outside the declared classes 0\.\.2"):
        load_cases(find_pairs([folder]), PRE, 3)
    nib.save(nib.Nifti1Image(lab[:-2].astype(np.uint8), img.affine), folder / "a_labels.nii.gz")
    with pytest.raises(GvslInputError, match="not on the grid"):
        load_cases(find_pairs([folder]), PRE, 3)
    with pytest.raises(GvslInputError, match="2 label maps"):
        find_pairs([folder], labels=[labelled / "subject_000_labels.nii.gz", labelled / "subject_001_labels.nii.gz"])
    nib.save(nib.Nifti1Image(lab.astype(np.uint8), img.affine), folder / "a_labels.nii.gz")
    with pytest.raises(GvslInputError, match="too few"):
        split_cases(load_cases(find_pairs([folder]), PRE, 3), 0.25, 0)
    r = runner.invoke(app, ["probe", str(folder), "-o", str(tmp_path / "o"), "--classes", "2", "--spacing", "4"])
    assert r.exit_code == 2 and "outside the declared classes" in r.output


def test_probe_and_finetune_commands(labelled, tmp_path):
    for cmd, extra in (("probe", ["--iterations", "5"]), ("finetune", ["--iterations", "2", "--patch-size", "32"])):
        r = runner.invoke(
            app,
            [
                cmd,
                str(labelled),
                "-o",
                str(tmp_path / cmd),
                "--classes",
                "3",
                "--widths",
                "tiny",
                "--spacing",
                "4",
                *extra,
            ],
        )
        assert r.exit_code == 0, r.output
        assert {"model.safetensors", "model.json", "head.npz", "metrics.json"} <= {
            p.name for p in (tmp_path / cmd).iterdir()
        }


@pytest.mark.slow
def test_linear_probe_benchmark_runs_tiny(tmp_path):
    spec = importlib.util.spec_from_file_location("eval_linear_probe", ROOT / "benchmarks" / "eval_linear_probe.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.main(
        [
            "-o",
            str(tmp_path),
            "--iterations",
            "2",
            "--seeds",
            "0",
            "--variants",
            "random,gvsl",
            "--source",
            "sample",
            "--pretrain-subjects",
            "2",
            "--probe-subjects",
            "2",
            "--probe-iterations",
            "5",
            "--embed-subjects",
            "2",
            "--views",
            "2",
            "--no-default-model",
        ]
    )
    random_row, gvsl_row = res["rows"]
    assert random_row["variant"] == "random" and gvsl_row["variant"] == "gvsl"
    # the random backbone is not trained; gvsl's is, for the asked iterations, from the same start
    assert random_row["pretrain"]["steps"] == 0 and gvsl_row["pretrain"]["steps"] == 2
    assert np.isfinite(gvsl_row["pretrain"]["final"]["total"])
    for row in res["rows"]:
        assert row["dice_mean"] == pytest.approx((row["dice_gm"] + row["dice_wm"]) / 2)
        assert row["margin"] == pytest.approx(row["cos_same"] - row["cos_diff"])
        assert row["top1_retrieval"] in (0.0, 0.25, 0.5, 0.75, 1.0)  # 2 subjects x 2 views
    # the two backbones differ, so their embeddings do
    assert random_row["cos_diff"] != gvsl_row["cos_diff"]
    table = (tmp_path / "linear_probe.md").read_text()
    assert f"| {gvsl_row['margin']:.4f} |" in table


def test_embedding_stats_of_the_linear_probe_benchmark():
    """Margin and retrieval on embeddings whose answer is known: views of one subject identical
    and orthogonal to the other subject's (margin 1, retrieval 1), or the owners swapped."""
    spec = importlib.util.spec_from_file_location("eval_linear_probe", ROOT / "benchmarks" / "eval_linear_probe.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    emb = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
    assert mod.embedding_stats(emb, [0, 0, 1, 1]) == pytest.approx(
        {"cos_same": 1.0, "cos_diff": 0.0, "margin": 1.0, "top1_retrieval": 1.0}
    )
    assert mod.embedding_stats(emb, [0, 1, 0, 1]) == pytest.approx(
        {"cos_same": 0.0, "cos_diff": 0.5, "margin": -0.5, "top1_retrieval": 0.0}
    )
