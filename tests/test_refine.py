"""Instance refinement: the core op (gvsl.refine), its exported graph (refine.onnx) and the
runtime's use of it (coarse-to-fine, initial alignment, Dice reporting)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage
from typer.testing import CliRunner

from gvsl.cli.main import app
from gvsl.export.refine_graph import (
    REFINE_ATOL,
    check_refine_tensorrt,
    export_refine,
    verify_refine,
    verify_refine_affine,
)
from gvsl.refine import RefineSettings, axis_scale, box_window, cc_force, local_cc, refine, sample_clamped
from gvsl.runtime import GvslInputError
from gvsl.runtime.backends import load_backend
from gvsl.runtime.default_model import default_model_dir
from gvsl.runtime.metrics import dice, folding_stats, jacobian_determinant
from gvsl.runtime.preprocess import volume_from_array
from gvsl.runtime.refine import RefineOptions, plan_levels
from gvsl.runtime.register import Registrar, fov_overlap, initial_shift
from gvsl.spatial import dvf_warp, identity_grid

runner = CliRunner()


def _phantom(shape=(28, 30, 26)) -> tuple[np.ndarray, np.ndarray]:
    """A smooth two-label phantom: an ellipsoid with an inner blob, textured."""
    idx = np.indices(shape).astype(np.float64)
    centre = (np.asarray(shape) - 1) / 2
    r = np.sqrt(sum(((idx[a] - centre[a]) / (0.36 * shape[a])) ** 2 for a in range(3)))
    inner = np.sqrt(sum(((idx[a] - centre[a] - 2) / (0.17 * shape[a])) ** 2 for a in range(3)))
    labels = np.where(inner < 1, 2, np.where(r < 1, 1, 0)).astype(np.uint8)
    rng = np.random.default_rng(3)
    image = labels * 0.4 + 0.05 * ndimage.gaussian_filter(rng.standard_normal(shape), 1.0)
    return ndimage.gaussian_filter(image, 0.7).astype(np.float32), labels


def _known_field(shape, amplitude=2.5) -> torch.Tensor:
    """A smooth pull-back field [1, 3, *shape] in voxels (peak ``amplitude``)."""
    idx = np.indices(shape).astype(np.float64)
    field = np.stack(
        [
            amplitude * np.sin(idx[1] / 6.0),
            amplitude * np.cos(idx[2] / 7.0 + 0.3),
            amplitude * np.sin(idx[0] / 5.0 - 0.2),
        ]
    )
    return torch.from_numpy(field.astype(np.float32))[None]


def _det_min(field: torch.Tensor) -> float:
    grads = np.stack(np.gradient(field[0].numpy(), axis=(1, 2, 3)), 1) + np.eye(3)[:, :, None, None, None]
    return float(np.linalg.det(np.moveaxis(grads, (0, 1), (-2, -1))).min())


def test_refinement_recovers_a_known_deformation():
    image, labels = _phantom()
    fixed = torch.from_numpy(image)[None, None]
    truth = _known_field(image.shape)
    moving = dvf_warp(fixed, -truth)  # moving(p) ~ fixed(p - truth(p)): the answer is about +truth
    moving_labels = dvf_warp(torch.from_numpy(labels.astype(np.float32))[None, None], -truth, mode="nearest")
    before = np.mean([dice(labels == k, moving_labels[0, 0].numpy() == k) for k in (1, 2)])
    field = refine(fixed, moving, None, iterations=60, step=0.5, regularisation=0.3)
    warped_labels = dvf_warp(moving_labels, field, mode="nearest")[0, 0].numpy()
    after = np.mean([dice(labels == k, warped_labels == k) for k in (1, 2)])
    warped = dvf_warp(moving, field)
    assert local_cc(fixed, warped) > local_cc(fixed, moving) + 0.05
    assert after > before + 0.08, (before, after)
    assert _det_min(field) > 0.0  # invertible: no folding


def test_zero_iterations_and_identical_images():
    image, labels = _phantom((16, 18, 14))
    fixed = torch.from_numpy(image)[None, None]
    start = _known_field(image.shape, 0.7)
    assert torch.equal(refine(fixed, fixed, start, iterations=0), start)
    # identical images: the force of the first step is ~0 (the bracket of the CC gradient is exact);
    # later steps jitter by a fraction of a voxel (fixed-gain steps near the optimum), labels stay put
    first = refine(fixed, fixed, torch.zeros_like(start), iterations=1)
    assert float(first.abs().max()) < 1e-3
    moved = refine(fixed, fixed, torch.zeros_like(start), iterations=30)
    kept = dvf_warp(torch.from_numpy(labels.astype(np.float32))[None, None], moved, mode="nearest")[0, 0].numpy()
    assert min(dice(labels == k, kept == k) for k in (1, 2)) > 0.9


def test_cc_force_points_along_the_shift():
    image, _ = _phantom((24, 24, 24))
    fixed = torch.from_numpy(image)[None, None]
    moving = torch.roll(fixed, shifts=1, dims=2)  # moving(p) = fixed(p - e_d): the answer is dvf_d = +1
    force = cc_force(fixed, moving)
    assert float(force[0, 0].sum()) > 10 * abs(float(force[0, 1].sum())) > 0


@pytest.mark.gpu
def test_refinement_runs_on_a_cuda_device_like_on_the_cpu():
    """The eager refinement (benchmarks/refine_gpu.py's path) keeps every tensor on the images'
    device and gives the CPU's field."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    image, _ = _phantom((20, 22, 18))
    fixed = torch.from_numpy(image)[None, None]
    moving = torch.roll(fixed, shifts=1, dims=2)
    start = _known_field(image.shape, 0.5)
    on_cpu = refine(fixed, moving, start, 8, spacing=(1.0, 1.0, 2.0))
    on_gpu = refine(fixed.cuda(), moving.cuda(), start.cuda(), 8, spacing=(1.0, 1.0, 2.0))
    assert on_gpu.device.type == "cuda"
    assert float((on_gpu.cpu() - on_cpu).abs().max()) < 1e-3


@pytest.mark.parametrize("channels", [1, 3])  # an image (lerps) and a field (shared corner weights)
def test_clamped_sampler_matches_between_eager_and_traced_paths(channels):
    rng = np.random.default_rng(0)
    src = torch.from_numpy(rng.random((1, channels, 9, 10, 11), dtype=np.float32))
    locs = identity_grid((9, 10, 11)) + torch.from_numpy(rng.normal(0, 2.0, (1, 3, 9, 10, 11)).astype(np.float32))
    eager = sample_clamped(src, locs)
    traced = torch.jit.trace(sample_clamped, (src, locs), check_trace=False)(src, locs)
    assert traced.shape == (1, channels, 9, 10, 11)
    assert float((eager - traced).abs().max()) < 1e-5
    # whole-voxel positions read the voxels themselves; past the far edge, the edge voxel
    shifted = identity_grid((9, 10, 11))
    shifted[:, 0] += 5.0
    read = torch.jit.trace(sample_clamped, (src, shifted), check_trace=False)(src, shifted)
    expected = src[:, :, torch.arange(9).add(5).clamp(max=8)]
    assert float((read - expected).abs().max()) < 1e-6


@pytest.fixture(scope="module")
def refine_onnx(tmp_path_factory) -> Path:
    return export_refine(tmp_path_factory.mktemp("refine") / "refine.onnx", RefineSettings(radius=2, sigma_update=1.5))


def test_refine_graph_matches_torch_after_iterations(refine_onnx):
    result = verify_refine(refine_onnx, RefineSettings(radius=2, sigma_update=1.5))
    assert result["passed"] and result["max_abs"] <= REFINE_ATOL
    # a non-cubic pair, a non-zero start and other run-time inputs, through the runtime backend
    image, _ = _phantom((20, 23, 17))
    moving = np.roll(image, 2, axis=1)
    start = _known_field(image.shape, 0.5)
    backend = load_backend(refine_onnx, "refine", "onnxruntime", "cpu")
    out = backend.run(
        {
            "fixed": image[None, None],
            "moving": moving[None, None],
            "dvf": start.numpy(),
            "iterations": np.array(7, np.int64),
            "step": np.array([0.4], np.float32),
            "regularisation": np.array([0.6], np.float32),
            "spacing": np.array([2.0, 3.0, 2.5], np.float32),  # thick voxels along H: kernels in mm
        }
    )
    settings = RefineSettings(radius=2, sigma_update=1.5)
    fixed_t, moving_t = torch.from_numpy(image)[None, None], torch.from_numpy(moving)[None, None]
    ref = refine(fixed_t, moving_t, start, 7, 0.4, 0.6, settings, spacing=(2.0, 3.0, 2.5))
    assert np.abs(out["dvf_refined"] - ref.numpy()).max() <= REFINE_ATOL
    isotropic = refine(fixed_t, moving_t, start, 7, 0.4, 0.6, settings)
    assert float((isotropic - ref).abs().max()) > 100 * REFINE_ATOL  # the voxel sizes are used
    warped = sample_clamped(moving_t, identity_grid(image.shape) + ref)
    window = box_window(fixed_t, 2, axis_scale(torch.tensor([2.0, 3.0, 2.5])))
    assert abs(float(out["similarity"][0]) - float(local_cc(fixed_t, warped, window=window))) < 1e-4


def _world_phantom(shape, spacing) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The same two-label phantom (in mm) sampled on any grid: image, labels, voxel positions in mm."""
    spacing = np.asarray(spacing, dtype=np.float64)
    mm = np.indices(shape).astype(np.float64) * spacing.reshape(3, 1, 1, 1)
    extent = np.asarray(shape) * spacing
    centre = (extent - spacing) / 2
    r = np.sqrt(sum(((mm[a] - centre[a]) / (0.36 * extent[a])) ** 2 for a in range(3)))
    inner = np.sqrt(sum(((mm[a] - centre[a] - 3) / (0.17 * extent[a])) ** 2 for a in range(3)))
    labels = np.where(inner < 1, 2, np.where(r < 1, 1, 0)).astype(np.uint8)
    texture = 0.1 * np.sin(mm[0] / 3.0) * np.cos(mm[1] / 4.0) * np.sin(mm[2] / 5.0 + 0.5)
    return (labels * 0.4 + texture).astype(np.float32), labels, mm


def test_refinement_on_thick_slices_matches_the_isotropic_grid_in_mm():
    """One physical problem on a 1 mm grid and on one with 2 mm slices: with the voxel sizes given,
    the refined world fields agree (kernels, window and step are in mm); with voxel-unit
    kernels the thick grid is over-smoothed along its slices and scores lower."""
    fields, scores = {}, {}
    settings = RefineSettings(sigma_update=2.0, truncate=3.0)  # the mechanism, not the defaults, is tested
    grids = (("iso", (1, 1, 1), (1, 1, 1)), ("thick", (1, 1, 2), (1, 1, 2)), ("voxel", (1, 1, 2), None))
    for name, spacing, given in grids:
        shape = (30, 32, 28 // spacing[2])
        image, labels, mm = _world_phantom(shape, spacing)
        truth_mm = np.stack([3 * np.sin(mm[1] / 9), 3 * np.cos(mm[2] / 10 + 0.3), 3 * np.sin(mm[0] / 8 - 0.2)])
        truth = torch.from_numpy((truth_mm / np.reshape(spacing, (3, 1, 1, 1))).astype(np.float32))[None]
        fixed = torch.from_numpy(image)[None, None]
        moving = dvf_warp(fixed, -truth)
        moving_labels = dvf_warp(torch.from_numpy(labels.astype(np.float32))[None, None], -truth, mode="nearest")
        field = refine(fixed, moving, None, 40, 0.5, 0.3, settings, spacing=given)
        warped = dvf_warp(moving_labels, field, mode="nearest")[0, 0].numpy()
        scores[name] = np.mean([dice(labels == k, warped == k) for k in (1, 2)])
        fields[name] = field[0].numpy() * np.reshape(spacing, (3, 1, 1, 1))
    iso_on_thick = fields["iso"][..., ::2]  # the iso grid's voxels at the thick grid's centres
    gap = {name: float(np.abs(fields[name] - iso_on_thick).mean()) for name in ("thick", "voxel")}
    assert scores["iso"] > 0.92 and scores["thick"] > 0.92, scores  # from ~0.55 / 0.59 before
    assert scores["thick"] > scores["voxel"] + 0.015, scores
    assert gap["thick"] < 0.25 and gap["thick"] < 0.5 * gap["voxel"], gap  # mm


def test_refine_graph_passes_the_tensorrt_op_check(refine_onnx):
    assert check_refine_tensorrt(refine_onnx) == []


def test_a_refine_graph_without_voxel_sizes_still_refines_on_isotropic_levels(refine_onnx, tmp_path):
    """A refine.onnx exported before the graph took ``spacing`` keeps working: the runtime feeds it
    no voxel sizes and plans isotropic levels for it."""
    import onnx
    from onnx import helper

    from gvsl.runtime.preprocess import PreprocessConfig
    from gvsl.runtime.refine import refine_world_field

    old = onnx.load(str(refine_onnx))
    kept = [i for i in old.graph.input if i.name != "spacing"]
    del old.graph.input[:]
    old.graph.input.extend(kept)
    ones = helper.make_node("Constant", [], ["spacing"], value=helper.make_tensor("ones", 1, [3], [1.0, 1.0, 1.0]))
    old.graph.node.insert(0, ones)
    onnx.save(old, str(tmp_path / "refine.onnx"))
    image, _ = _phantom((24, 26, 10))
    affine = np.diag([2.0, 2.0, 6.0, 1.0])
    fixed = volume_from_array(image * 1000, affine, "fixed")
    moving = volume_from_array(np.roll(image, 1, axis=0) * 1000, affine, "moving")
    cfg = PreprocessConfig(spacing=None, modality="mr")
    options = RefineOptions(iterations=4, levels=(2.0,))
    grids = {}
    for name, path in (("current", refine_onnx), ("older", tmp_path / "refine.onnx")):
        backend = load_backend(path, "refine", "onnxruntime", "cpu")
        assert ("spacing" in backend.input_names) == (name == "current")
        result = refine_world_field(backend, fixed, moving, cfg, None, None, np.eye(4), options)
        grids[name] = result.levels[0]["grid_mm"]
        assert result.levels[0]["local_cc"] > 0.5
    assert grids == {"current": [2.0, 2.0, 3.0], "older": [2.0, 2.0, 2.0]}


def test_shipped_default_model_has_a_current_refine_graph():
    shipped = default_model_dir() / "refine.onnx"
    assert verify_refine(shipped)["passed"]
    assert verify_refine(default_model_dir() / "refine_mi.onnx", RefineSettings(similarity="mi"))["passed"]
    assert verify_refine_affine(default_model_dir() / "refine_affine.onnx")["passed"]
    manifest = json.loads((default_model_dir() / "manifest.json").read_text())
    recorded = [entry["kind"] for entry in manifest["artifacts"] if entry["kind"].startswith("refine")]
    assert sorted(recorded) == ["refine", "refine_affine", "refine_mi"]
    for entry in manifest["artifacts"]:
        if entry["kind"] in recorded:  # each graph's parity is on record
            assert [p["passed"] for p in entry["parity"]] == [True], entry["file"]
    meta = load_backend(shipped, "refine", "onnxruntime", "cpu").info.extra["refine"]
    assert meta == RefineSettings().to_dict()


# ----------------------------------------------------------------------------- initial alignment
def _box_volume(origin, shape=(30, 30, 30), spacing=2.0, offset_vox=(0, 0, 0)) -> object:
    data = np.zeros(shape, np.float32)
    o = np.asarray(offset_vox)
    box = (slice(8 + o[0], 20 + o[0]), slice(9 + o[1], 22 + o[1]), slice(7 + o[2], 18 + o[2]))
    data[box] = 100.0 + np.random.default_rng(0).random(data[box].shape) * 50.0
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = origin
    return volume_from_array(data, affine, f"box@{origin}")


def test_init_auto_picks_moments_far_apart_and_world_when_overlapping():
    from gvsl.runtime.preprocess import PreprocessConfig, preprocess

    cfg = PreprocessConfig(spacing=(2.0, 2.0, 2.0), modality="mr")
    fixed = _box_volume((0.0, 0.0, 0.0))
    far = _box_volume((400.0, 0.0, 0.0), offset_vox=(3, 0, 0))  # origins 400 mm apart
    near = _box_volume((6.0, -4.0, 0.0))
    assert fov_overlap(fixed, far) == 0.0 and fov_overlap(fixed, near) > 0.7
    shift, used = initial_shift("auto", fixed, far, preprocess(fixed, cfg), preprocess(far, cfg))
    assert used == "moments"
    np.testing.assert_allclose(shift, [400.0 + 6.0, 0.0, 0.0], atol=0.5)  # the blobs' centres of mass meet
    shift, used = initial_shift("auto", fixed, near, preprocess(fixed, cfg), preprocess(near, cfg))
    assert used == "world" and np.all(shift == 0)


def test_no_overlap_even_after_alignment_is_one_clear_error():
    from gvsl.runtime.preprocess import PreprocessConfig, preprocess

    cfg = PreprocessConfig(spacing=(2.0, 2.0, 2.0), modality="mr")
    fixed = _box_volume((0.0, 0.0, 0.0))
    far = _box_volume((400.0, 0.0, 0.0))
    with pytest.raises(GvslInputError, match="does not overlap"):
        initial_shift("world", fixed, far, preprocess(fixed, cfg), preprocess(far, cfg))


def test_refine_options_and_levels_are_checked():
    with pytest.raises(GvslInputError, match="--regularisation"):
        RefineOptions(regularisation=1.5)
    with pytest.raises(GvslInputError, match="--refine -1"):
        RefineOptions(iterations=-1)
    with pytest.raises(GvslInputError, match="--similarity"):
        RefineOptions(similarity="features")
    with pytest.raises(GvslInputError, match="--no-network needs --refine above 0"):
        RefineOptions(iterations=0, network=False)
    fine = _box_volume((0.0, 0.0, 0.0), spacing=3.0)
    plan = plan_levels((8.0, 4.0, 2.0, 1.0), fine)
    assert [grid for _, grid in plan] == [(8.0,) * 3, (4.0,) * 3, (3.0,) * 3]  # nothing finer than the scan
    thick = volume_from_array(np.zeros((40, 40, 12), np.float32), np.diag([1.5, 1.5, 10.0, 1.0]), "thick")
    # thick slices: half their spacing along them (never finer than the scan's finest spacing)
    assert [grid for _, grid in plan_levels((6.0, 4.0, 1.0), thick)] == [(6.0,) * 3, (4.0, 4.0, 5.0), (1.5, 1.5, 5.0)]
    # a refinement graph without voxel sizes (older export): isotropic grids
    assert [grid for _, grid in plan_levels((4.0, 1.0), thick, anisotropic=False)] == [(4.0,) * 3, (1.5,) * 3]


# ----------------------------------------------------------------------------- through the runtime
@pytest.fixture(scope="module")
def mni_pair():
    from gvsl.synth import load_template, make_subject

    template = load_template("sample", spacing=4.0)
    rng = np.random.default_rng(1000)
    a, b = make_subject(template, rng), make_subject(template, rng)
    return a, b


def test_registrar_refinement_beats_the_network_on_an_unseen_pair(mni_pair):
    a, b = mni_pair
    fixed = volume_from_array(a.image * 1000, a.affine, "fixed")
    moving = volume_from_array(b.image * 1000, b.affine, "moving")
    kwargs = dict(
        labels=volume_from_array(b.labels, b.affine, "ml"), fixed_labels=volume_from_array(a.labels, a.affine, "fl")
    )
    with Registrar(default_model_dir(), threads=2) as reg:
        network = reg.register(fixed, moving, refine=RefineOptions(iterations=0), **kwargs)
        refined = reg.register(fixed, moving, refine=RefineOptions(iterations=25, levels=(4.0,)), **kwargs)
    assert refined.dice["ml"]["mean"] > network.dice["ml"]["mean"] + 0.03
    assert refined.metrics["ncc_after"] > network.metrics["ncc_after"]
    assert refined.metrics["folding_percent"] < 0.05
    assert [lvl["spacing_mm"] for lvl in refined.refinement] == [4.0]
    assert set(refined.stages) >= {"read and preprocess", "network", "refine 4 mm", "warp", "metrics"}
    # the Dice reported is the Dice of the labels it returns
    assert refined.dice["ml"]["1"] == pytest.approx(dice(refined.labels[0] == 1, a.labels == 1))
    det = jacobian_determinant(refined.dvf_mm, refined.affine)
    assert folding_stats(det)[0] > 0


def test_registration_without_the_network_never_runs_it_and_still_aligns(mni_pair):
    """``network=False``: the registration graph is not run, the refinement starts from the
    initial alignment and still recovers the unseen pair (Dice far above the identity's)."""
    a, b = mni_pair
    fixed = volume_from_array(a.image * 1000, a.affine, "fixed")
    moving = volume_from_array(b.image * 1000, b.affine, "moving")
    kwargs = dict(
        labels=volume_from_array(b.labels, b.affine, "ml"), fixed_labels=volume_from_array(a.labels, a.affine, "fl")
    )
    with Registrar(default_model_dir(), threads=2) as reg:
        calls = []
        run = reg.backend.run
        reg.backend.run = lambda *args, **kw: calls.append(1) or run(*args, **kw)  # counts network runs
        before = reg.register(fixed, moving, refine=RefineOptions(iterations=0), **kwargs)
        assert len(calls) == 1
        alone = reg.register(fixed, moving, refine=RefineOptions(iterations=25, levels=(4.0,), network=False), **kwargs)
    assert len(calls) == 1 and alone.network is False and before.network is True
    assert "network" not in alone.stages and [lvl["start"] for lvl in alone.refinement] == ["initial alignment"]
    np.testing.assert_array_equal(alone.matrix, np.eye(3, 4))
    np.testing.assert_array_equal(alone.world_matrix, alone.initial_matrix)  # no affine head: the initial map
    identity = dice(b.labels == 1, a.labels == 1)
    assert alone.dice["ml"]["1"] > identity + 0.1 and alone.dice["ml"]["mean"] > before.dice["ml"]["mean"] + 0.03
    assert alone.metrics["folding_percent"] < 0.05


def test_missing_refine_graph_warns_and_registers_with_the_network(tmp_path, mni_pair, monkeypatch):
    import shutil

    from gvsl.runtime import register as register_module

    folder = tmp_path / "old-export"
    folder.mkdir()
    for name in ("registration.onnx", "manifest.json"):
        shutil.copy(default_model_dir() / name, folder / name)
    monkeypatch.setattr(register_module, "_refine_file", lambda model, kind="refine": None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reg = Registrar(folder, threads=2)
    assert any("no refine.onnx" in str(w.message) for w in caught)
    a, b = mni_pair
    with pytest.raises(GvslInputError, match="--refine 0"):
        reg.register(volume_from_array(a.image, a.affine), volume_from_array(b.image, b.affine))
    res = reg.register(
        volume_from_array(a.image, a.affine), volume_from_array(b.image, b.affine), refine=RefineOptions(iterations=0)
    )
    assert res.refinement == []


def test_cli_register_reports_dice_init_and_stages(tmp_path, mni_pair):
    a, b = mni_pair
    paths = {}
    for name, arr in (("f", a.image * 1000), ("m", b.image * 1000), ("fl", a.labels), ("ml", b.labels)):
        paths[name] = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(arr, a.affine), paths[name])
    metrics = tmp_path / "metrics.json"
    res = runner.invoke(
        app,
        [
            "register", str(paths["f"]), str(paths["m"]), "-o", str(tmp_path / "w.nii.gz"),
            "--labels", str(paths["ml"]), "--fixed-labels", str(paths["fl"]), "--metrics", str(metrics),
            "--refine", "10", "--refine-levels", "4", "--regularisation", "0.5", "--quiet",
        ],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    payload = json.loads(metrics.read_text())
    assert payload["init"] == "world"
    assert [lvl["spacing_mm"] for lvl in payload["refinement"]] == [4.0]
    written = np.asarray(nib.load(str(tmp_path / "ml_warped.nii.gz")).dataobj)
    scores = next(iter(payload["dice"].values()))
    assert scores["2"] == pytest.approx(dice(written == 2, a.labels == 2), abs=1e-9)
    bad = runner.invoke(app, ["register", str(paths["f"]), str(paths["m"]), "-o", str(tmp_path / "x.nii.gz"),
                              "--regularisation", "3"])  # fmt: skip
    assert bad.exit_code != 0 and "--regularisation 3" in bad.output and "Traceback" not in bad.output
    assert payload["network"] is True and len(payload["affine_network"]) == 3
    res = runner.invoke(
        app,
        [
            "register", str(paths["f"]), str(paths["m"]), "-o", str(tmp_path / "n.nii.gz"), "--metrics",
            str(metrics), "--refine", "10", "--refine-levels", "4", "--no-network", "--quiet",
        ],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    payload = json.loads(metrics.read_text())
    assert payload["network"] is False and payload["affine_network"] is None
    assert "network" not in payload["stages_seconds"]
    assert payload["refinement"][0]["start"] == "initial alignment"
    bad = runner.invoke(app, ["register", str(paths["f"]), str(paths["m"]), "-o", str(tmp_path / "y.nii.gz"),
                              "--no-network", "--refine", "0"])  # fmt: skip
    assert bad.exit_code != 0 and "--no-network needs --refine above 0" in bad.output
    assert "Traceback" not in bad.output and not (tmp_path / "y.nii.gz").exists()


# ----------------------------------------------------------------------------- affine stage
def test_affine_refinement_recovers_a_known_rigid_offset():
    import math

    from gvsl.refine import affine_locations, refine_affine

    image, _ = _phantom((26, 30, 24))
    fixed = torch.from_numpy(image)[None, None]
    angle = math.radians(7)
    rotation = [[1, 0, 0], [0, math.cos(angle), -math.sin(angle)], [0, math.sin(angle), math.cos(angle)]]
    truth = torch.tensor([[*rotation[0], 2.0], [*rotation[1], -1.5], [*rotation[2], 1.0]], dtype=torch.float32)[None]
    full = torch.cat([truth[0], torch.tensor([[0.0, 0.0, 0.0, 1.0]])])
    moving = sample_clamped(fixed, affine_locations(torch.linalg.inv(full)[:3][None], list(image.shape)))
    found = refine_affine(fixed, moving, None, iterations=50, step=1.0, settings=RefineSettings(radius=2))
    np.testing.assert_allclose(found[0, :, 3].numpy(), truth[0, :, 3].numpy(), atol=0.3)  # voxels
    np.testing.assert_allclose(found[0, :, :3].numpy(), truth[0, :, :3].numpy(), atol=0.03)


def test_affine_graph_matches_torch_and_passes_the_tensorrt_check(tmp_path):
    from gvsl.refine import refine_affine

    path = export_refine(tmp_path / "refine_affine.onnx", RefineSettings(radius=2), kind="refine_affine")
    assert check_refine_tensorrt(path) == []
    image, _ = _phantom((18, 20, 16))
    moving = np.roll(image, (1, -1), axis=(0, 2))
    backend = load_backend(path, "refine_affine", "onnxruntime", "cpu")
    out = backend.run(
        {
            "fixed": image[None, None],
            "moving": moving[None, None],
            "matrix": np.eye(3, 4, dtype=np.float32)[None],
            "iterations": np.array(12, np.int64),
            "step": np.array([0.8], np.float32),
        }
    )
    ref = refine_affine(
        torch.from_numpy(image)[None, None],
        torch.from_numpy(moving)[None, None],
        None,
        12,
        0.8,
        RefineSettings(radius=2),
    )
    assert np.abs(out["matrix_refined"] - ref.numpy()).max() < 1e-4
    np.testing.assert_allclose(out["matrix_refined"][0, :, 3], [1.0, 0.0, -1.0], atol=0.35)


def test_registrar_affine_stage_undoes_a_world_offset(mni_pair):
    from scipy.spatial.transform import Rotation

    a, _ = mni_pair
    offset = np.eye(4)
    offset[:3, :3] = Rotation.from_euler("xyz", [0, 4, 8], degrees=True).as_matrix()
    offset[:3, 3] = [10.0, -6.0, 4.0]
    moving_affine = offset @ a.affine  # the same scan, its frame moved: labels follow exactly
    fixed = volume_from_array(a.image * 1000, a.affine, "fixed")
    moving = volume_from_array(a.image * 1000, moving_affine, "moving")
    kwargs = dict(
        labels=volume_from_array(a.labels, moving_affine, "ml"),
        fixed_labels=volume_from_array(a.labels, a.affine, "fl"),
    )
    with Registrar(default_model_dir(), threads=2) as reg:
        plain = reg.register(
            fixed, moving, refine=RefineOptions(iterations=5, levels=(4.0,), affine_iterations=0), **kwargs
        )
        staged = reg.register(
            fixed, moving, refine=RefineOptions(iterations=5, levels=(4.0,), affine_iterations=40), **kwargs
        )
    assert staged.affine_refinement["kept"] is True
    assert staged.affine_refinement["grid_mm"] == [8.0, 8.0, 8.0]  # RefineOptions.affine_spacing, not the 4 mm level
    assert staged.dice["ml"]["mean"] > plain.dice["ml"]["mean"] + 0.05
    assert staged.dice["ml"]["mean"] > 0.8
    # the refined initial map is close to the true offset (mm)
    assert np.abs(staged.initial_matrix[:3, 3] - offset[:3, 3]).max() < 8.0
