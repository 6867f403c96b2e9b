"""The registration benchmark's own parts (benchmarks/eval_registration.py), small and peer-free.

The pair builders must make pairs whose truth is what they say (a zero field
changes nothing, a known field is undone by its inverse), and the scoring
must read every method's displacement field in the ITK convention the same
way (a sign slip in the LPS conversion changes the Jacobian determinant).
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gvsl.runtime.default_model import default_model_dir
from gvsl.runtime.io import save_displacement_field
from gvsl.runtime.metrics import dice, jacobian_determinant
from gvsl.runtime.preprocess import save_nifti
from gvsl.runtime.warp import grid_world_coordinates, warp_by_displacement

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("eval_registration", ROOT / "benchmarks" / "eval_registration.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["eval_registration"] = mod
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop("eval_registration", None)


def _chest_like(shape=(32, 32, 12), spacing=(3.0, 3.0, 10.0)):
    """A CT-like volume on an anisotropic grid with 7 labelled boxes and balls (values 1..7)."""
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = (-40.0, -50.0, -60.0)
    idx = np.indices(shape).astype(np.float64)
    labels = np.zeros(shape, dtype=np.int16)
    centres = [(8, 8, 3), (24, 8, 3), (8, 24, 8), (24, 24, 8), (16, 16, 5), (10, 16, 9), (22, 16, 2)]
    radii = [5, 4, 4, 5, 6, 3, 3]
    for value, (c, r) in enumerate(zip(centres, radii, strict=True), start=1):
        dist = np.sqrt(((idx[0] - c[0]) * spacing[0]) ** 2 + ((idx[1] - c[1]) * spacing[1]) ** 2
                       + ((idx[2] - c[2]) * spacing[2]) ** 2)  # fmt: skip
        labels[(dist <= r * spacing[0]) & (labels == 0)] = value
    image = np.where(labels > 0, 40.0 * labels, -1000.0).astype(np.float32)
    return image, labels, affine


def test_zero_field_keeps_every_label(bench):
    image, labels, affine = _chest_like()
    moving, moving_labels = bench.deform_pair(image, labels, affine, np.zeros((3, *labels.shape), np.float32), -1024)
    scores = bench.region_dice(labels, moving_labels, bench.CT_LABELS)
    assert all(scores[f"dice_{name}"] == 1.0 for name in bench.CT_LABELS)
    np.testing.assert_allclose(moving, image, atol=1e-4)


def test_known_field_is_undone_by_its_inverse(bench):
    image, labels, affine = _chest_like()
    rng = np.random.default_rng(3)
    disp = bench.smooth_field(labels.shape, affine, rng, peak_mm=16.0, sigma_mm=25.0)
    assert disp.shape == (3, *labels.shape)
    assert 8.0 <= float(np.sqrt((disp**2).sum(0)).max()) <= 16.0 + 1e-3  # peak drawn in [peak/2, peak]
    assert float(jacobian_determinant(disp, affine).min()) > 0.5  # a smooth, invertible truth
    _, moving_labels = bench.deform_pair(image, labels, affine, disp, -1024)
    before = bench.region_dice(labels, moving_labels, bench.CT_LABELS)["dice_mean"]
    # the inverse of the pull-back field d: w(x) = -d(x + w(x)), by fixed-point iteration
    inverse = np.zeros_like(disp)
    for _ in range(10):
        inverse = -np.stack(
            [warp_by_displacement(disp[c], affine, affine, inverse, order=1, cval=0.0) for c in range(3)]
        )
    recovered = warp_by_displacement(moving_labels, affine, affine, inverse, order=0)
    after = bench.region_dice(labels, recovered, bench.CT_LABELS)["dice_mean"]
    assert before < 0.8 and after > 0.95


def test_rigid_offset_has_the_drawn_size_and_moves_the_centre_by_the_shift(bench):
    rng = np.random.default_rng(0)
    rotation, shift, made = bench.random_rigid(rng, (10.0, 20.0), (2.0, 5.0))
    assert 10.0 <= np.linalg.norm(shift) <= 20.0
    assert all(2.0 <= abs(a) <= 5.0 for a in made["rotation_deg"])
    np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-12)
    _, labels, affine = _chest_like(shape=(9, 9, 5))
    disp = bench.compose_rigid(np.zeros((3, 9, 9, 5), np.float32), affine, rotation, shift)
    np.testing.assert_allclose(disp[:, 4, 4, 2], shift, atol=1e-4)  # the grid centre goes by the shift alone


def test_itk_field_is_read_back_in_ras_and_folding_is_counted(bench, tmp_path):
    shape = (10, 12, 8)
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    affine[:3, 3] = (-10.0, 5.0, 20.0)
    x = grid_world_coordinates(affine, shape)
    centre = x.mean(axis=(1, 2, 3)).reshape(3, 1, 1, 1)
    scaling = (0.1 * (x - centre)).astype(np.float32)  # x -> 1.1 x about the centre: det J = 1.331
    path = save_displacement_field(tmp_path / "dvf.nii.gz", scaling, affine)
    ras, read_affine = bench.read_itk_displacement(path)
    np.testing.assert_allclose(ras, scaling, atol=1e-5)
    np.testing.assert_allclose(read_affine, affine, atol=1e-6)
    image = np.linspace(0, 1, np.prod(shape), dtype=np.float32).reshape(shape)
    labels = (image > 0.5).astype(np.int16) + (image > 0.8).astype(np.int16)
    files = {n: str(save_nifti(tmp_path / f"{n}.nii.gz", a, affine)) for n, a in
             (("fixed", image), ("labels", labels))}  # fmt: skip
    pair = bench.Pair("t", "t0", files["fixed"], files["fixed"], files["labels"], files["labels"],
                      {"low": [1, 2], "high": [2]}, {})  # fmt: skip
    scores = bench.score(pair, files["fixed"], files["labels"], path)
    assert scores["dice_low"] == scores["dice_high"] == scores["dice_mean"] == 1.0
    assert scores["folding_percent"] == 0.0 and scores["jacobian_min"] == pytest.approx(1.331, abs=1e-3)
    mirrored = scaling.copy()
    mirrored[0] = -2.0 * (x[0] - centre[0])  # x -> -x: det J = -1.21 everywhere
    scores = bench.score(pair, files["fixed"], files["labels"], save_displacement_field(tmp_path / "f.nii.gz",
                         mirrored, affine))  # fmt: skip
    assert scores["folding_percent"] == 100.0 and scores["jacobian_min"] == pytest.approx(-1.21, abs=1e-3)


def test_head_and_brain_masks_find_a_synthetic_head(bench):
    shape, spacing = (96, 96, 6), (2.0, 2.0, 6.0)
    yy, xx = np.mgrid[:96, :96]
    r = np.sqrt((xx - 48.0) ** 2 + (yy - 48.0) ** 2)[..., None] * spacing[0] * np.ones(shape)
    image = np.zeros(shape, np.float32)
    image[r < 80] = 1000.0  # scalp (bright)
    image[r < 70] = 50.0  # skull (dark)
    image[r < 62] = 400.0  # brain (mid grey)
    masks = bench.head_and_brain_masks(image, spacing)
    assert dice(masks >= 1, r < 80) > 0.97
    assert dice(masks == 2, r < 62) > 0.95


def test_run_timed_stops_a_peer_that_runs_past_its_limit(bench, tmp_path):
    t0 = time.perf_counter()
    run = bench.run_timed(
        [sys.executable, "-S", "-c", "import time; time.sleep(30)"], tmp_path / "log.txt", timeout=0.5
    )
    assert run["timed_out"] and run["rc"] != 0 and time.perf_counter() - t0 < 10
    run = bench.run_timed([sys.executable, "-S", "-c", "x = bytearray(200 << 20)"], tmp_path / "log.txt")
    assert run["rc"] == 0 and not run["timed_out"] and run["peak_rss_mib"] > 200


@pytest.mark.slow
def test_gvsl_row_end_to_end_on_one_sample_pair(bench, tmp_path):
    """The whole harness on one bundled-MNI pair, network alone: the CLI's outputs are scored,
    registration beats the identity, and the folding read from the written field is gvsl's own."""
    res = bench.main(["-o", str(tmp_path), "--sets", "mni", "--quick", "--spacing", "4", "--source", "sample",
                      "--methods", "gvsl"])  # fmt: skip
    before, row = res["rows"]
    assert (before["method"], row["method"]) == ("before", "gvsl") and "error" not in row
    assert res["model"] == str(default_model_dir())
    assert row["dice_mean"] > before["dice_mean"] + 0.03 and row["ncc"] > before["ncc"] + 0.02
    assert row["dice_gm"] > before["dice_gm"] and row["dice_wm"] > before["dice_wm"] and row["folding_percent"] < 1.0
    reported = row["runs"][0]["gvsl_metrics"]
    assert row["folding_percent"] == pytest.approx(reported["folding_percent"], abs=1e-9)
    assert row["seconds"] == row["process_seconds"] > 0 and row["peak_rss_mib"] > 50
    assert (tmp_path / "registration.md").read_text().startswith("### mni")
