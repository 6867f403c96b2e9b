"""Refinement on mutual information (``similarity="mi"``, ``refine_mi.onnx``): the force
registers a pair whose intensities are related but not alike, its graph matches PyTorch and
passes the TensorRT op check, and the runtime runs it when asked."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from gvsl.export.refine_graph import REFINE_ATOL, check_refine_tensorrt, export_refine, verify_refine
from gvsl.mutual_information import mi_force, mutual_information
from gvsl.refine import RefineSettings, refine
from gvsl.runtime import GvslInputError
from gvsl.runtime.backends import load_backend
from gvsl.runtime.default_model import default_model_dir
from gvsl.runtime.metrics import dice
from gvsl.runtime.preprocess import volume_from_array
from gvsl.runtime.refine import RefineOptions
from gvsl.runtime.register import Registrar
from gvsl.spatial import dvf_warp


def _contrast(image: np.ndarray) -> np.ndarray:
    """A non-monotonic intensity map (0 -> 0.18, 0.4 -> 0.82, 0.8 -> 0.34): what a second
    modality does to the tissues, which local CC cannot follow."""
    return np.clip(0.9 - 1.6 * np.abs(image - 0.45), 0.02, 0.98).astype(np.float32)


def _phantom(shape=(28, 30, 26)) -> tuple[np.ndarray, np.ndarray]:
    """Background, an ellipsoid and an inner blob (0 / 0.4 / 0.8), textured and smoothed."""
    idx = np.indices(shape).astype(np.float64)
    centre = (np.asarray(shape) - 1) / 2
    r = np.sqrt(sum(((idx[a] - centre[a]) / (0.36 * shape[a])) ** 2 for a in range(3)))
    inner = np.sqrt(sum(((idx[a] - centre[a] - 2) / (0.17 * shape[a])) ** 2 for a in range(3)))
    labels = np.where(inner < 1, 2, np.where(r < 1, 1, 0)).astype(np.uint8)
    rng = np.random.default_rng(3)
    image = labels * 0.4 + 0.05 * ndimage.gaussian_filter(rng.standard_normal(shape), 1.0)
    return np.clip(ndimage.gaussian_filter(image, 0.7), 0.0, 1.0).astype(np.float32), labels


def _field(shape, amplitude=2.0) -> torch.Tensor:
    idx = np.indices(shape).astype(np.float64)
    field = np.stack([amplitude * np.sin(idx[1] / 6.0), amplitude * np.cos(idx[2] / 7.0 + 0.3),
                      amplitude * np.sin(idx[0] / 5.0 - 0.2)])  # fmt: skip
    return torch.from_numpy(field.astype(np.float32))[None]


def _mean_dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([dice(a == k, b == k) for k in (1, 2)]))


def test_mutual_information_registers_a_pair_of_two_contrasts():
    image, labels = _phantom()
    fixed = torch.from_numpy(image)[None, None]
    truth = _field(image.shape)
    other = torch.from_numpy(_contrast(image))[None, None]
    moving = dvf_warp(other, -truth)  # the second "modality", deformed: the answer is about +truth
    moving_labels = dvf_warp(torch.from_numpy(labels.astype(np.float32))[None, None], -truth, mode="nearest")
    before = _mean_dice(labels, moving_labels[0, 0].numpy())
    scores = {}
    for similarity in ("ncc", "mi"):
        field = refine(fixed, moving, None, 60, 0.25, 0.3, RefineSettings(similarity=similarity))
        warped_labels = dvf_warp(moving_labels, field, mode="nearest")[0, 0].numpy()
        scores[similarity] = (_mean_dice(labels, warped_labels), mutual_information(fixed, dvf_warp(moving, field)))
        grads = np.stack(np.gradient(field[0].numpy(), axis=(1, 2, 3)), 1) + np.eye(3)[:, :, None, None, None]
        assert np.linalg.det(np.moveaxis(grads, (0, 1), (-2, -1))).min() > 0  # no folding
    dice_mi, mi_after = scores["mi"]
    assert dice_mi > before + 0.1, (before, scores)
    assert float(mi_after) > float(mutual_information(fixed, moving)) + 0.05
    assert dice_mi > scores["ncc"][0] + 0.02, scores  # 0.91 against 0.88 when written


def test_mi_force_is_zero_where_the_warped_image_is_clamped_and_points_along_a_shift():
    image, _ = _phantom((24, 24, 24))
    fixed = torch.from_numpy(image)[None, None]
    moving = torch.roll(torch.from_numpy(_contrast(image))[None, None], shifts=1, dims=2)
    force = mi_force(fixed, moving)
    assert float(force[0, 0].sum()) > 5 * abs(float(force[0, 1].sum())) > 0  # moving(p) = g(fixed(p - e_d))
    flat = torch.zeros_like(moving)  # clamped everywhere: no force at all
    assert float(mi_force(fixed, flat).abs().max()) == 0.0


@pytest.fixture(scope="module")
def refine_mi_onnx(tmp_path_factory):
    return export_refine(tmp_path_factory.mktemp("refine_mi") / "refine_mi.onnx", kind="refine_mi")


def test_refine_mi_graph_matches_torch_and_passes_the_tensorrt_op_check(refine_mi_onnx):
    result = verify_refine(refine_mi_onnx, RefineSettings(similarity="mi"))
    assert result["passed"] and result["max_abs"] <= REFINE_ATOL
    assert check_refine_tensorrt(refine_mi_onnx) == []
    backend = load_backend(refine_mi_onnx, "refine_mi", "onnxruntime", "cpu")
    assert backend.info.extra["refine"]["similarity"] == "mi"
    image, _ = _phantom((18, 21, 16))
    moving = np.roll(_contrast(image), 2, axis=1)
    out = backend.run(
        {
            "fixed": image[None, None],
            "moving": moving[None, None],
            "dvf": np.zeros((1, 3, *image.shape), np.float32),
            "iterations": np.array(0, np.int64),
            "step": np.array([0.1], np.float32),
            "regularisation": np.array([0.3], np.float32),
            "spacing": np.array([2.0, 2.0, 3.0], np.float32),
        }
    )  # the similarity output is the mutual information of the pair
    expected = mutual_information(torch.from_numpy(image)[None, None], torch.from_numpy(moving)[None, None])
    assert abs(float(out["similarity"][0]) - float(expected)) < 1e-4
    with pytest.raises(GvslInputError, match="refine_mi graph, but this needs the refine graph"):
        load_backend(refine_mi_onnx, "refine", "onnxruntime", "cpu")


def test_similarity_settings_and_their_steps():
    assert RefineOptions().step_size == 0.5 and RefineOptions(similarity="mi").step_size == 0.1
    assert RefineOptions(similarity="mi", step=0.3).step_size == 0.3
    with pytest.raises(GvslInputError, match="--similarity features: use one of auto, ncc, mi"):
        RefineOptions(similarity="features")
    # auto: mutual information for two modalities, local CC for one (or where one is not known)
    auto = RefineOptions()
    assert auto.similarity == "auto" and auto.step_size == 0.5
    assert auto.for_modalities("mr", "ct").similarity == "mi" and auto.for_modalities("mr", "ct").step_size == 0.1
    assert auto.for_modalities("ct", "ct").similarity == "ncc" and auto.for_modalities("ct", None).similarity == "ncc"
    assert RefineOptions(similarity="ncc").for_modalities("mr", "ct").similarity == "ncc"  # asked for: kept
    with pytest.raises(ValueError, match="similarity 'x'"):
        RefineSettings(similarity="x")
    assert RefineSettings.from_dict({"radius": 2}).similarity == "ncc"  # graphs exported before MI


def test_registrar_refines_a_two_contrast_pair_on_mutual_information():
    """``RefineOptions(similarity="mi")`` runs the shipped ``refine_mi.onnx`` (its figure in the
    report) and registers a pair whose moving image has another contrast, as far as local CC
    does on this pair (CT <-> MR, where it does better, is in EVALUATION.md §1.1i)."""
    from gvsl.synth import load_template, make_subject

    template = load_template("sample", spacing=4.0)
    rng = np.random.default_rng(1000)
    a, b = make_subject(template, rng), make_subject(template, rng)
    unit = (b.image - b.image.min()) / (b.image.max() - b.image.min())
    fixed = volume_from_array(a.image * 1000, a.affine, "fixed")
    moving = volume_from_array(_contrast(unit) * 1000, b.affine, "moving")
    kwargs = dict(
        labels=volume_from_array(b.labels, b.affine, "ml"), fixed_labels=volume_from_array(a.labels, a.affine, "fl")
    )
    with Registrar(default_model_dir(), threads=2) as reg:
        found = {
            sim: reg.register(
                fixed, moving, refine=RefineOptions(iterations=20, levels=(4.0,), similarity=sim), **kwargs
            )
            for sim in ("ncc", "mi")
        }
        network = reg.register(fixed, moving, refine=RefineOptions(iterations=0), **kwargs)
    mi, ncc = found["mi"], found["ncc"]
    assert set(mi.refinement[0]) >= {"mutual_information", "iterations", "shape"}
    assert "local_cc" in ncc.refinement[0]
    assert mi.dice["ml"]["mean"] > network.dice["ml"]["mean"] + 0.05, (mi.dice, network.dice)
    assert mi.dice["ml"]["mean"] > ncc.dice["ml"]["mean"] - 0.01, (mi.dice, ncc.dice)
    assert mi.metrics["folding_percent"] < 0.05


def test_cli_register_with_mutual_information_reports_it(tmp_path):
    import json

    import nibabel as nib
    from typer.testing import CliRunner

    from gvsl.cli.main import app

    image, labels = _phantom((24, 26, 22))
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    paths = {}
    for name, arr in (("f", image * 1000), ("m", np.roll(_contrast(image), 1, axis=0) * 1000)):
        paths[name] = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(arr.astype(np.float32), affine), paths[name])
    metrics = tmp_path / "m.json"
    runner = CliRunner()
    args = ["register", str(paths["f"]), str(paths["m"]), "-o", str(tmp_path / "w.nii.gz"), "--metrics", str(metrics),
            "--refine", "6", "--refine-levels", "4", "--similarity", "mi", "--modality", "mr"]  # fmt: skip
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    level = json.loads(metrics.read_text())["refinement"][0]
    assert level["similarity"] == "mi" and level["mutual_information"] > 0.1
    assert "MI " in res.output  # the report names the figure
    bad = runner.invoke(app, [*args[:3], "-o", str(tmp_path / "x.nii.gz"), "--similarity", "nmi"])
    assert bad.exit_code != 0 and "--similarity nmi: use one of auto, ncc, mi" in bad.output
    assert "Traceback" not in bad.output and not (tmp_path / "x.nii.gz").exists()
