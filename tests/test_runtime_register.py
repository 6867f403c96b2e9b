"""gvsl.runtime.register: outputs on the fixed grid, the displacement-field convention
checked with SimpleITK and scipy, recovery of a known deformation of the MNI template,
labels, quality figures, threads and `gvsl register`.

About "registration improves NCC and Dice": a tiny GVSL trained with
gvsl.train.train for ~30 s on this 2-core CPU does *not* reliably register
better than identity. Measured on held-out smooth deformations of the MNI T1
through this runtime: 60 iterations (35 s, 6 mm, 32^3 patch) changed NCC by
-0.005..+0.013 and lowered GM Dice by ~0.04; 100 iterations (54 s) raised
NCC by 0.02..0.05 but Dice only by -0.006..+0.03; 600 iterations on 4 mm
crops made NCC worse, because GVSL pre-training pairs independent random
crops and so learns large shifts. So the improvement is tested where it is
robust: the runtime is given the true deformation on the model grid (a test
double in place of the network) and must turn it into a warped image, labels
and a displacement field on the original, anisotropic, non-RAS grids that
undo a known deformation of the real template. The real exported network
runs through the same code in the convention, parity, label, CLI and thread
tests.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from test_runtime import PATCH, PRE, _aff, _save, tiny_artifacts
from typer.testing import CliRunner

from gvsl.cli.main import app
from gvsl.runtime import GvslInputError
from gvsl.runtime.backends import Backend, ModelInfo
from gvsl.runtime.io import read_volume
from gvsl.runtime.metrics import dice, folding_stats, jacobian_determinant, max_displacement, ncc
from gvsl.runtime.preprocess import PreprocessConfig, pad_to_multiple, preprocess
from gvsl.runtime.register import RefineOptions, Registrar, network_affine_to_voxel

runner = CliRunner()
#: the oracle tests check how the runtime carries a given field to the user's grids: no refinement
NETWORK_ONLY = RefineOptions(iterations=0)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    return tiny_artifacts(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def registrar(tiny) -> Registrar:
    return Registrar(tiny[1], backend="onnxruntime", device="cpu")


# ----------------------------------------------------------------------------- a known deformation
def _sample_world(vol4: np.ndarray, aff4: np.ndarray, world: np.ndarray, order: int = 1) -> np.ndarray:
    """Read the 4 mm template (grid aff4) at world points [3, ...] (trilinear, 0 outside)."""
    inv = np.linalg.inv(aff4)
    idx = np.einsum("ij,j...->i...", inv[:3, :3], world) + inv[:3, 3].reshape(3, *([1] * (world.ndim - 1)))
    return ndimage.map_coordinates(vol4.astype(np.float32), idx, order=order, mode="constant", cval=0.0)


def _world(aff: np.ndarray, shape) -> np.ndarray:
    idx = np.indices(shape).astype(np.float64)
    return np.einsum("ij,j...->i...", aff[:3, :3], idx) + aff[:3, 3].reshape(3, 1, 1, 1)


def _v(y: np.ndarray) -> np.ndarray:
    """Smooth pull-back field of the moving image (mm): moving(y) = template(y + v(y))."""
    return np.stack(
        [
            4.0 + 6.0 * np.sin(y[1] / 21.0),
            -5.0 + 5.0 * np.cos(y[2] / 25.0 + 0.4),
            3.0 + 4.0 * np.sin(y[0] / 19.0 - 0.2),
        ]
    )


def _u(x: np.ndarray, iters: int = 30) -> np.ndarray:
    """The registration's answer: u = -v(x + u) (fixed point; |grad v| < 0.3)."""
    u = np.zeros_like(x)
    for _ in range(iters):
        u = -_v(x + u)
    return u


FIXED_AFF = np.array([[0.0, 0.0, -4.0, 76.0], [-3.0, 0.0, 0.0, 78.0], [0.0, 3.5, 0.0, -56.0], [0, 0, 0, 1]])
FIXED_SHAPE = (62, 46, 39)  # PSL storage, 3 x 3.5 x 4 mm
MOVING_AFF = np.array([[-4.5, 0.0, 0.0, 84.0], [0.0, 3.5, 0.0, -112.0], [0.0, 0.0, 3.0, -60.0], [0, 0, 0, 1]])
MOVING_SHAPE = (37, 54, 55)  # LAS storage, 4.5 x 3.5 x 3 mm


@pytest.fixture(scope="session")
def known_pair(tmp_path_factory, mni_small_arrays) -> dict:
    """MNI T1 / GM / WM on a PSL fixed grid and, deformed by the known field, on an LAS
    moving grid of other spacings; files plus the truth."""
    d = tmp_path_factory.mktemp("known")
    aff4 = _aff((4.0, 4.0, 4.0), (-80.0, -110.0, -56.0))  # the conftest arrays' grid (40 x 48 x 40)
    xf = _world(FIXED_AFF, FIXED_SHAPE)
    ym = _world(MOVING_AFF, MOVING_SHAPE)
    pull = ym + _v(ym)
    out: dict = {"dir": d}
    for kind in ("t1", "gm", "wm"):
        src = mni_small_arrays[kind]
        out[f"fixed_{kind}"] = _sample_world(src, aff4, xf)
        out[f"moving_{kind}"] = _sample_world(src, aff4, pull)
    lab_f = (out["fixed_gm"] > 128).astype(np.uint8) + 2 * (out["fixed_wm"] > 128).astype(np.uint8)
    lab_m = (out["moving_gm"] > 128).astype(np.uint8) + 2 * (out["moving_wm"] > 128).astype(np.uint8)
    out["fixed_labels"], out["moving_labels"] = np.minimum(lab_f, 2), np.minimum(lab_m, 2)
    out["fixed"] = _save(d / "fixed.nii.gz", out["fixed_t1"], FIXED_AFF)
    out["moving"] = _save(d / "moving.nii.gz", out["moving_t1"], MOVING_AFF)
    out["labels"] = _save(d / "moving_seg.nii.gz", out["moving_labels"], MOVING_AFF)
    return out


class OracleRegistration(Backend):
    """Test double: returns the true fused field of the known pair on the padded model
    grid (what a perfect network would predict), an identity affine, no warped image."""

    def __init__(self, fixed_path: Path, pre: PreprocessConfig = PRE) -> None:
        self.info = ModelInfo(
            kind="registration",
            path="<oracle>",
            model={"widths": [8, 16, 16, 32, 32, 32, 16, 16, 8]},
            preprocess=pre,
            patch_size=PATCH,
        )
        self.name = "oracle"
        fpre = preprocess(read_volume(fixed_path), pre)
        padded, pads = pad_to_multiple(fpre.data)
        pad_aff = fpre.affine.copy()
        pad_aff[:3, 3] -= fpre.affine[:3, :3] @ np.array([b for b, _ in pads], dtype=np.float64)
        x = _world(pad_aff, padded.shape)
        u_mm = _u(x)
        inv = np.linalg.inv(fpre.affine[:3, :3])
        self.dvf = np.einsum("ij,j...->i...", inv, u_mm).astype(np.float32)[None]
        self.calls = 0

    @property
    def output_names(self):
        return ("affine", "dvf", "warped")

    def run(self, inputs, outputs=None):
        self.calls += 1
        assert inputs["fixed"].shape[2:] == self.dvf.shape[2:] == inputs["moving"].shape[2:]
        out = {"affine": np.array([[[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0]]], np.float32), "dvf": self.dvf}
        return {k: out[k] for k in outputs or ("affine", "dvf")}


def test_known_deformation_is_undone_on_the_original_grids(known_pair):
    """A correct model-grid field must become a warped image, labels and a field on the
    fixed image's own PSL 3 x 3.5 x 4 mm grid that undo the deformation of the real
    template (moving stored LAS at 4.5 x 3.5 x 3 mm)."""
    k = known_pair
    reg = Registrar(OracleRegistration(k["fixed"]), init="world", refine=NETWORK_ONLY)
    res = reg.register(k["fixed"], k["moving"], labels=k["labels"])
    assert res.warped.shape == FIXED_SHAPE and res.dvf_mm.shape == (3, *FIXED_SHAPE)
    np.testing.assert_allclose(res.affine, FIXED_AFF)
    # the field on the fixed grid is the truth (up to trilinear resampling of a smooth field)
    truth = _u(_world(FIXED_AFF, FIXED_SHAPE))
    assert np.abs(res.dvf_mm - truth).max() < 0.1  # mm; the field reaches 15 mm
    m = res.metrics
    assert m["ncc_before"] < 0.92 and m["ncc_after"] > 0.98 and m["ncc_after"] - m["ncc_before"] > 0.05, m
    # label overlap of the grey / white matter maps
    fixed_lab, warped_lab = k["fixed_labels"], res.labels[0]
    before = warp_identity(k["moving_labels"], MOVING_AFF)
    for lab in (1, 2):
        d_before = dice(fixed_lab == lab, before == lab)
        d_after = dice(fixed_lab == lab, warped_lab == lab)
        assert d_before < 0.7 and d_after > 0.85 and d_after - d_before > 0.15, (lab, d_before, d_after)
    # labels come back exactly: same dtype, no new values
    assert warped_lab.dtype == np.uint8 and set(np.unique(warped_lab)) <= {0, 1, 2}
    # a smooth, invertible field: no folding
    assert m["jacobian_min"] > 0.9 and m["folding_percent"] == 0.0
    # thresholded probability maps: Dice of the warped GM/WM probability maps too
    gm_w = warp_with(res, k["moving_gm"])
    gm_0 = warp_identity(k["moving_gm"], MOVING_AFF)
    assert dice(k["fixed_gm"] > 128, gm_0 > 128) < 0.7 and dice(k["fixed_gm"] > 128, gm_w > 128) > 0.9


def warp_identity(moving: np.ndarray, moving_aff: np.ndarray) -> np.ndarray:
    """Moving labels on the fixed grid with no registration (world alignment only)."""
    x = _world(FIXED_AFF, FIXED_SHAPE)
    inv = np.linalg.inv(moving_aff)
    idx = np.einsum("ij,j...->i...", inv[:3, :3], x) + inv[:3, 3].reshape(3, 1, 1, 1)
    return ndimage.map_coordinates(moving, idx, order=0, mode="constant", cval=0)


def warp_with(res, moving: np.ndarray) -> np.ndarray:
    """Independent application of res.dvf_mm (scipy, RAS mm) to a moving-grid array."""
    y = _world(FIXED_AFF, FIXED_SHAPE) + res.dvf_mm
    inv = np.linalg.inv(MOVING_AFF)
    idx = np.einsum("ij,j...->i...", inv[:3, :3], y) + inv[:3, 3].reshape(3, 1, 1, 1)
    return ndimage.map_coordinates(moving.astype(np.float32), idx, order=1, mode="constant", cval=0.0)


def _interior(res, moving_shape, moving_aff, margin: float = 1.0) -> np.ndarray:
    """Fixed voxels whose moving point lies at least ``margin`` voxels inside the moving grid."""
    y = _world(res.affine, res.warped.shape) + res.dvf_mm
    inv = np.linalg.inv(moving_aff)
    idx = np.einsum("ij,j...->i...", inv[:3, :3], y) + inv[:3, 3].reshape(3, 1, 1, 1)
    hi = np.array(moving_shape, dtype=np.float64).reshape(3, 1, 1, 1) - 1 - margin
    return np.all((idx >= margin) & (idx <= hi), axis=0)


@pytest.mark.parametrize("source", ["oracle", "onnx"])
def test_dvf_nifti_applied_by_simpleitk_reproduces_warped(tmp_path, known_pair, registrar, source):
    """The saved field, read and applied by SimpleITK's DisplacementFieldTransform (what
    ANTs' antsApplyTransforms does), gives back the runtime's warped image."""
    sitk = pytest.importorskip("SimpleITK")
    k = known_pair
    reg = (
        Registrar(OracleRegistration(k["fixed"]), init="world", refine=NETWORK_ONLY)
        if source == "oracle"
        else registrar
    )
    res = reg.register(k["fixed"], k["moving"])
    dvf_path = res.save_dvf(tmp_path / "dvf.nii.gz")
    # the file: 5-D vector image, intent vector, fixed grid
    img = nib.load(dvf_path)
    assert img.shape == (*FIXED_SHAPE, 1, 3) and img.header.get_intent()[0] == "vector"
    np.testing.assert_allclose(img.affine, FIXED_AFF, atol=1e-5)
    field = sitk.ReadImage(str(dvf_path), sitk.sitkVectorFloat64)
    tx = sitk.DisplacementFieldTransform(field)
    fixed = sitk.ReadImage(str(k["fixed"]), sitk.sitkFloat32)
    moving = sitk.ReadImage(str(k["moving"]), sitk.sitkFloat32)
    out = sitk.Resample(moving, fixed, tx, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    itk_warped = sitk.GetArrayFromImage(out).transpose(2, 1, 0)
    inside = _interior(res, MOVING_SHAPE, MOVING_AFF)
    assert inside.mean() > 0.5
    scale = float(np.abs(res.warped).max())
    diff = np.abs(itk_warped - res.warped)[inside]
    assert diff.max() < 1e-3 * scale, diff.max()
    # and scipy reading the NIfTI directly (LPS components -> RAS) agrees as well
    lps = np.asarray(img.dataobj, dtype=np.float64)[:, :, :, 0, :]
    ras = np.moveaxis(lps * np.array([-1.0, -1.0, 1.0]), -1, 0)
    y = _world(FIXED_AFF, FIXED_SHAPE) + ras
    inv = np.linalg.inv(MOVING_AFF)
    idx = np.einsum("ij,j...->i...", inv[:3, :3], y) + inv[:3, 3].reshape(3, 1, 1, 1)
    scipy_warped = ndimage.map_coordinates(k["moving_t1"], idx, order=1, mode="constant", cval=0.0)
    assert np.abs(scipy_warped - res.warped)[inside].max() < 1e-3 * scale


def test_onnx_registration_matches_torch_backend(known_pair, tiny, registrar):
    """The exported registration graph and the PyTorch model agree through the whole
    runtime pipeline (preprocessing, field mapping, warping)."""
    k = known_pair
    a = registrar.register(k["fixed"], k["moving"], labels=k["labels"])
    b = Registrar(tiny[0], backend="torch", device="cpu").register(k["fixed"], k["moving"], labels=k["labels"])
    np.testing.assert_allclose(a.matrix, b.matrix, atol=1e-4)
    np.testing.assert_allclose(a.dvf_mm, b.dvf_mm, atol=5e-3)
    assert np.abs(a.warped - b.warped).mean() < 1e-2
    assert (a.labels[0] != b.labels[0]).mean() < 1e-3
    for key in ("ncc_before", "ncc_after", "jacobian_min"):
        assert a.metrics[key] == pytest.approx(b.metrics[key], abs=1e-2)


def test_network_affine_to_voxel_matches_gvsl_spatial():
    import torch

    from gvsl.spatial import affine_to_voxel

    rng = np.random.default_rng(0)
    for shape in ((32, 48, 16), (16, 16, 16), (64, 32, 48)):
        mat = np.concatenate([np.eye(3) + rng.normal(0, 0.1, (3, 3)), rng.normal(0, 0.2, (3, 1))], axis=1)
        for convention in ("centered", "official"):
            ref = affine_to_voxel(torch.from_numpy(mat)[None], shape, convention)[0].numpy()
            np.testing.assert_allclose(network_affine_to_voxel(mat, shape, convention), ref, atol=1e-10)


def test_world_matrix_maps_fixed_to_moving_points(known_pair, registrar):
    """world_matrix is the affine part in mm: identity network affine -> identity (+ init shift)."""
    k = known_pair
    res = Registrar(OracleRegistration(k["fixed"]), init="world", refine=NETWORK_ONLY).register(k["fixed"], k["moving"])
    np.testing.assert_allclose(res.world_matrix, np.eye(4), atol=1e-9)
    centred = Registrar(OracleRegistration(k["fixed"]), init="center", refine=NETWORK_ONLY).register(
        k["fixed"], k["moving"]
    )
    shift = centred.world_matrix[:3, 3]
    cf = FIXED_AFF[:3, :3] @ ((np.array(FIXED_SHAPE) - 1) / 2) + FIXED_AFF[:3, 3]
    cm = MOVING_AFF[:3, :3] @ ((np.array(MOVING_SHAPE) - 1) / 2) + MOVING_AFF[:3, 3]
    np.testing.assert_allclose(shift, cm - cf, atol=1e-9)
    np.testing.assert_allclose(
        centred.dvf_mm - res.dvf_mm, np.broadcast_to((cm - cf)[:, None, None, None], res.dvf_mm.shape), atol=1e-4
    )


# ----------------------------------------------------------------------------- metrics
def test_metrics_on_known_fields():
    rng = np.random.default_rng(0)
    a = rng.random((10, 12, 8))
    assert ncc(a, 3 * a + 2) == pytest.approx(1.0) and ncc(a, -a) == pytest.approx(-1.0)
    assert ncc(a, np.ones_like(a)) == 0.0
    # chunked sums agree with the textbook formula, masked too, on a volume bigger than one chunk
    big = rng.random((130, 100, 90)).astype(np.float32)
    other = big + 0.5 * rng.random(big.shape).astype(np.float32)
    mask = big > 0.3
    for m in (None, mask):
        x, y = (big.astype(np.float64), other.astype(np.float64)) if m is None else (big[m] * 1.0, other[m] * 1.0)
        r = np.corrcoef(x.ravel(), y.ravel())[0, 1]
        assert ncc(big, other, m) == pytest.approx(r, abs=1e-9)
    field = np.zeros((3, 4, 5, 6), np.float32)
    field[:, 1, 2, 3] = (3.0, 0.0, -4.0)  # one 5 mm vector
    assert max_displacement(field) == pytest.approx(5.0)
    assert dice(a > 0.5, a > 0.5) == 1.0 and dice(a > 2, a > 2) == 1.0
    assert dice(np.eye(4, dtype=bool), ~np.eye(4, dtype=bool)) == 0.0
    aff = np.array([[0.0, 2.0, 0.0, 1.0], [-3.0, 0.0, 0.0, 2.0], [0.0, 0.0, 4.0, 3.0], [0, 0, 0, 1]])
    x = _world(aff, (9, 11, 7))
    m = np.array([[1.1, 0.2, 0.0], [0.0, 0.9, 0.1], [0.05, 0.0, 1.2]])  # x -> m x: det J = det m
    det = jacobian_determinant(np.einsum("ij,j...->i...", m - np.eye(3), x), aff, slab_voxels=100)
    np.testing.assert_allclose(det, np.linalg.det(m), rtol=1e-6)
    fold = np.zeros_like(x)
    fold[0] = -2.0 * x[0]  # x -> -x along one axis: det = -1 everywhere
    jmin, pct = folding_stats(jacobian_determinant(fold, aff))
    assert jmin == pytest.approx(-1.0) and pct == 100.0


# ----------------------------------------------------------------------------- inputs
def test_register_bad_inputs_are_named(tmp_path, known_pair, registrar):
    four_d = _save(tmp_path / "fmri.nii.gz", np.ones((8, 8, 8, 3), np.float32), np.eye(4))
    with pytest.raises(GvslInputError, match=r"fmri\.nii\.gz.*4-D"):
        registrar.register(known_pair["fixed"], four_d)
    soft = _save(tmp_path / "soft.nii.gz", np.full(MOVING_SHAPE, 0.5, np.float32), MOVING_AFF)
    with pytest.raises(GvslInputError, match=r"soft\.nii\.gz.*non-integer"):
        registrar.register(known_pair["fixed"], known_pair["moving"], labels=soft)
    with pytest.raises(GvslInputError, match="--init"):
        Registrar(registrar.backend, init="guess")
    with pytest.raises(GvslInputError, match="limit of 1000"):
        Registrar(registrar.backend, max_voxels=1000).register(known_pair["fixed"], known_pair["moving"])


def test_one_registrar_shared_by_8_threads(mni_small_arrays, registrar):
    t1 = mni_small_arrays["t1"].astype(np.float32)
    rng = np.random.default_rng(1)
    pairs = [
        ((t1[a : a + 14, b : b + 15, 8:24], _aff()), (np.roll(t1, s, axis=0)[a : a + 14, b : b + 15, 8:24], _aff()))
        for a, b, s in rng.integers(0, 20, (6, 3))
    ]
    serial = [registrar.register(f, m).warped for f, m in pairs]
    got: dict[tuple[int, int], np.ndarray] = {}
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            for k in range(6):
                i = (t + k) % len(pairs)
                got[(t, k)] = registrar.register(*pairs[i]).warped
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[0]
    for (t, k), w in got.items():
        np.testing.assert_allclose(w, serial[(t + k) % len(pairs)], atol=1e-5)


# ----------------------------------------------------------------------------- gvsl register
def test_cli_register_writes_everything(tmp_path, known_pair, tiny):
    k = known_pair
    out = tmp_path / "res" / "warped.nii.gz"
    res = runner.invoke(
        app,
        [
            "register",
            str(k["fixed"]),
            str(k["moving"]),
            "-m",
            str(tiny[1]),
            "-o",
            str(out),
            "--dvf",
            str(tmp_path / "res" / "dvf.nii.gz"),
            "--labels",
            str(k["labels"]),
            "--png",
            str(tmp_path / "res" / "overview.png"),
            "--metrics",
            str(tmp_path / "res" / "m.json"),
            "--device",
            "cpu",
        ],
    )
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "NCC before" in text and "folding" in text
    w = nib.load(out)
    assert w.shape == FIXED_SHAPE
    np.testing.assert_allclose(w.affine, FIXED_AFF, atol=1e-5)
    seg = nib.load(tmp_path / "res" / "moving_seg_warped.nii.gz")
    assert seg.get_data_dtype() == np.uint8 and set(np.unique(np.asarray(seg.dataobj))) <= {0, 1, 2}
    assert nib.load(tmp_path / "res" / "dvf.nii.gz").shape == (*FIXED_SHAPE, 1, 3)
    png = (tmp_path / "res" / "overview.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    m = json.loads((tmp_path / "res" / "m.json").read_text())
    assert {"ncc_before", "ncc_after", "jacobian_min", "folding_percent", "affine_world_ras"} <= set(m)
    assert not list((tmp_path / "res").glob(".*"))  # atomic writes leave no temp files


def test_cli_register_errors_are_one_line(tmp_path, known_pair, tiny):
    k = known_pair
    flat = _save(tmp_path / "flat.nii.gz", np.ones((16, 16), np.float32), np.eye(4))
    res = runner.invoke(
        app, ["register", str(flat), str(k["moving"]), "-m", str(tiny[1]), "-o", str(tmp_path / "w.nii.gz")]
    )
    assert res.exit_code == 2 and "flat.nii.gz" in res.output and "2-D" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "w.nii.gz").exists()
    res = runner.invoke(
        app, ["register", str(k["fixed"]), str(k["moving"]), "-m", str(tiny[1]), "-o", str(tmp_path / "w.png")]
    )
    assert res.exit_code == 2 and ".nii" in res.output
    res = runner.invoke(
        app,
        [
            "register",
            str(k["fixed"]),
            str(k["moving"]),
            "-m",
            str(tiny[1] / "encoder.onnx"),
            "-o",
            str(tmp_path / "w.nii.gz"),
        ],
    )
    assert res.exit_code == 2 and "encoder graph" in " ".join(res.output.split())


def test_overview_scales_each_scan_by_its_own_intensities(mni_small_arrays):
    """A moving scan 100x brighter than the fixed one is shown with its own window (it used to
    be drawn with the fixed image's and came out solid white); warped shares moving's window."""
    from gvsl.runtime.figures import display_scaled

    fixed = mni_small_arrays["t1"].astype(np.float32)
    f, m, w = display_scaled(fixed, 100.0 * fixed, 100.0 * fixed)
    np.testing.assert_allclose(m, f, atol=1e-5)
    np.testing.assert_allclose(w, f, atol=1e-5)
    assert 0.0 <= f.min() and f.max() <= 1.0 and (f == 1.0).mean() < 0.05  # only the top percent clips


def test_the_network_grid_stretches_a_little_instead_of_padding_much():
    """``network_spacing``: an axis a few voxels past a multiple of 16 gets voxels at most 10 %
    larger so that resampling lands on that multiple (the chest CT's 98 x 98 x 85 model grid
    becomes 96 x 96 x 80, not 112 x 112 x 96 after padding); multiples of 16 and axes that
    would stretch more keep the model's spacing."""
    from gvsl.runtime.preprocess import PreprocessConfig, preprocess, volume_from_array
    from gvsl.runtime.register import network_spacing

    assert network_spacing((4.0, 4.0, 4.0), (98, 96, 85)) == pytest.approx((4.0 * 98 / 96, 4.0, 4.0 * 85 / 80))
    assert network_spacing((4.0, 4.0, 4.0), (20, 40, 15)) == (4.0, 4.0, 4.0)  # 25 %, 11 % and < 16: padded
    stretched = 0
    for voxels in range(30, 400, 3):  # resampling lands a stretched axis on the multiple below
        vol = volume_from_array(np.zeros((voxels, 2, 2), np.float32), np.diag([1.3, 1.0, 1.0, 1.0]))
        n = preprocess(vol, PreprocessConfig(spacing=(4.0, 4.0, 4.0), modality="none")).data.shape[0]
        s = network_spacing((4.0, 4.0, 4.0), (n, 16, 16))[0]
        shape = preprocess(vol, PreprocessConfig(spacing=(s, 4.0, 4.0), modality="none")).data.shape[0]
        assert shape == (n // 16 * 16 if s != 4.0 else n), (voxels, n, s, shape)
        stretched += s != 4.0
    assert stretched > 20


def test_compose_initial_with_a_rotation_is_the_composed_world_map():
    """``initial(x + d(x)) - x`` for an initial map with a linear part, on an oblique grid."""
    from gvsl.runtime.register import compose_initial
    from gvsl.runtime.warp import grid_world_coordinates

    rng = np.random.default_rng(1)
    aff = np.array([[0, 0, -1.5, 10], [0.9, 0.3, 0, 0], [0.2, -1.1, 0, 3], [0, 0, 0, 1.0]])
    initial = np.eye(4)
    initial[:3, :3] = np.linalg.qr(np.eye(3) + 0.05 * rng.normal(size=(3, 3)))[0]
    initial[:3, 3] = (4.0, -2.0, 7.0)
    field = rng.normal(0, 2, (3, 20, 18, 16)).astype(np.float32)
    x = grid_world_coordinates(aff, field.shape[1:])
    expected = np.einsum("ij,j...->i...", initial[:3, :3], x + field) + initial[:3, 3].reshape(3, 1, 1, 1) - x
    np.testing.assert_allclose(compose_initial(initial, field, aff), expected, rtol=0, atol=1e-4)
