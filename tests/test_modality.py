"""`--modality auto`: every real volume the tests can reach is classified correctly, and one
that looks like neither CT nor MR gets one line naming it and the override."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from gvsl.runtime.errors import GvslInputError
from gvsl.runtime.modality import decide_modality
from gvsl.runtime.preprocess import (
    PreprocessConfig,
    load_preprocessed,
    normalize_intensity,
    preprocess,
    volume_from_array,
)
from gvsl.synth import SAMPLE_T1

NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"
#: nibabel's shipped MR test volumes (structural, EPI, NIfTI-2, MINC): all MR
NIBABEL_MR = ["anatomical.nii", "example4d.nii.gz", "example_nifti2.nii.gz", "functional.nii",
              "reoriented_anat_moved.nii", "tiny.mnc"]  # fmt: skip


def hu_phantom(pad: float | None = -3024.0) -> np.ndarray:
    """A CT-like volume in HU: air around a soft-tissue body with fat, lungs and a bone rod,
    optionally padded outside a reconstruction circle."""
    n = 64
    x, y, z = np.meshgrid(*[np.arange(n) - n / 2 + 0.5] * 3, indexing="ij")
    r = np.sqrt(x**2 + y**2)
    hu = np.full((n, n, n), -1000.0, np.float32) + np.random.default_rng(0).normal(0, 20, (n, n, n))
    hu[r < 24] = 40.0
    hu[(r < 24) & (r > 21)] = -100.0
    hu[((x - 9) ** 2 + y**2 < 49) | ((x + 9) ** 2 + y**2 < 49)] = -850.0
    hu[(np.abs(x) < 3) & (np.abs(y + 14) < 3)] = 800.0
    if pad is not None:
        hu[r > 30] = pad
    return hu.astype(np.float32)


def test_bundled_mni_sample_and_nilearn_templates_are_mr(mni_t1_path):
    for path in (SAMPLE_T1, mni_t1_path):
        assert decide_modality(np.asarray(nib.load(path).dataobj), str(path)) == "mr"


@pytest.mark.parametrize("name", NIBABEL_MR)
def test_nibabel_shipped_volumes_are_mr(name):
    img = nib.load(NIBABEL_DATA / name)
    assert decide_modality(np.asarray(img.dataobj, dtype=np.float32), name) == "mr"


@pytest.mark.parametrize("pad", [None, -1024.0, -3024.0])
def test_hounsfield_volumes_are_ct(pad):
    assert decide_modality(hu_phantom(pad)) == "ct"


def test_shifted_or_windowed_ct_is_not_taken_for_ct():
    """Values that merely go negative are not HU: the same phantom stored unsigned as HU + 1024
    without its intercept reads as MR-like magnitudes, and halved HU have no air at -1000."""
    assert decide_modality(np.clip(hu_phantom(None) + 1024.0, 0, None).astype(np.uint16)) == "mr"
    with pytest.raises(GvslInputError, match="no air peak"):
        decide_modality(hu_phantom(None) / 2.0, "half.nii.gz")


@pytest.mark.parametrize("values", ["zscored", "constant"])
def test_undecidable_volumes_get_one_line_with_the_override(values):
    rng = np.random.default_rng(1)
    data = rng.standard_normal((32, 32, 32)).astype(np.float32) if values == "zscored" else np.ones((8, 8, 8))
    with pytest.raises(GvslInputError) as e:
        decide_modality(data, "scan.nii.gz")
    msg = str(e.value)
    assert msg.startswith("scan.nii.gz: --modality auto cannot decide") and "--modality ct or --modality mr" in msg
    assert "\n" not in msg
    # nibabel's own random-valued MGH test file is such a volume too
    with pytest.raises(GvslInputError, match="test.mgz"):
        decide_modality(np.asarray(nib.load(NIBABEL_DATA / "test.mgz").dataobj)[..., 0], "test.mgz")


def test_auto_normalises_each_volume_as_what_it_is(tmp_path):
    """auto = ct on a HU volume and = mr on an MR volume, voxel for voxel, through preprocess
    (in memory and from a file) and normalize_intensity; the decision is reported."""
    hu = hu_phantom()
    mr = np.asarray(nib.load(SAMPLE_T1).dataobj, dtype=np.float32)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    for data, truth in ((hu, "ct"), (mr, "mr")):
        auto = PreprocessConfig(spacing=(3.0, 3.0, 3.0), modality="auto")
        fixed = PreprocessConfig(spacing=(3.0, 3.0, 3.0), modality=truth)
        got = preprocess(volume_from_array(data, aff), auto)
        want = preprocess(volume_from_array(data, aff), fixed)
        assert got.modality == truth and np.array_equal(got.data, want.data)
        assert np.array_equal(normalize_intensity(data, auto), normalize_intensity(data, fixed))
        path = tmp_path / f"{truth}.nii.gz"
        nib.save(nib.Nifti1Image(data.astype(np.int16), aff), path)
        raw, pre = load_preprocessed(path, auto)
        assert pre.modality == truth
        assert np.array_equal(pre.data, load_preprocessed(path, fixed)[1].data)


# ----------------------------------------------------------------------------- commands
def _save(tmp_path: Path, name: str, data: np.ndarray, spacing: float = 4.0) -> Path:
    aff = np.diag([spacing, spacing, spacing, 1.0])
    aff[:3, 3] = -spacing * (np.asarray(data.shape) - 1) / 2
    path = tmp_path / name
    nib.save(nib.Nifti1Image(data.astype(np.float32), aff), path)
    return path


def test_embed_decides_per_volume_reports_it_and_can_be_overridden(tmp_path):
    from typer.testing import CliRunner

    from gvsl.cli.main import app
    from gvsl.runtime.default_model import default_model_dir
    from gvsl.runtime.embed import Embedder

    runner = CliRunner()
    (tmp_path / "in").mkdir()
    ct = _save(tmp_path / "in", "ct.nii.gz", hu_phantom()[::2, ::2, ::2])
    _save(tmp_path / "in", "mr.nii.gz", np.asarray(nib.load(SAMPLE_T1).dataobj)[::2, ::2, ::2])
    res = runner.invoke(app, ["embed", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--format", "npz"])
    assert res.exit_code == 0, res.output
    assert str(np.load(tmp_path / "out" / "ct.npz")["modality"]) == "ct"
    assert str(np.load(tmp_path / "out" / "mr.npz")["modality"]) == "mr"
    assert "ct 1, mr 1" in res.output  # the summary table counts the decisions
    # auto = the modality it decided, and an override changes the input the encoder sees
    model_dir = default_model_dir()
    with Embedder(model_dir, modality=None) as model_own, Embedder(model_dir, modality="ct") as forced:
        assert model_own.preprocess.modality == "mr"  # the shipped model was trained on MR
        e_auto = np.load(tmp_path / "out" / "ct.npz")["embedding"]
        assert not np.allclose(model_own.embed(ct).embedding, e_auto, atol=1e-4)  # MR percentiles on a CT differ
        assert np.allclose(forced.embed(ct).embedding, e_auto, atol=1e-5)
    with Embedder(model_dir) as default:  # the Python default is auto, as the CLI's
        e_default = default.embed(ct)
        assert e_default.modality == "ct" and np.allclose(e_default.embedding, e_auto, atol=1e-5)
    # a volume auto cannot decide: one line naming it and the override; --modality mr embeds it
    (tmp_path / "odd").mkdir()
    odd = _save(tmp_path / "odd", "zscored.nii.gz", np.random.default_rng(0).standard_normal((24, 24, 24)))
    res = runner.invoke(app, ["embed", str(odd), "-o", str(tmp_path / "out2")])
    assert res.exit_code == 1 and "zscored.nii.gz" in res.output and "--modality ct or --modality mr" in res.output
    assert not (tmp_path / "out2" / "zscored.npy").exists()
    res = runner.invoke(app, ["embed", str(odd), "-o", str(tmp_path / "out3"), "--modality", "mr", "-q"])
    assert res.exit_code == 0 and (tmp_path / "out3" / "zscored.npy").is_file()


def test_register_reports_each_images_modality(tmp_path):
    import json

    from typer.testing import CliRunner

    from gvsl.cli.main import app

    ct = _save(tmp_path, "ct.nii.gz", hu_phantom()[::2, ::2, ::2])
    mr = _save(tmp_path, "mr.nii.gz", np.asarray(nib.load(SAMPLE_T1).dataobj)[::2, ::2, ::2])
    res = CliRunner().invoke(
        app, ["register", str(ct), str(mr), "-o", str(tmp_path / "w.nii.gz"), "--metrics", str(tmp_path / "m.json")]
    )
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "m.json").read_text())
    assert (m["modality_fixed"], m["modality_moving"]) == ("ct", "mr")
    assert "ct / mr" in res.output


def test_register_takes_each_images_modality_for_a_pair_auto_cannot_decide(tmp_path):
    """A CT without bone (no tissue tail above 100 HU) is undecidable for ``auto``: ``register``
    says so in one line naming the file; ``--modality ct,mr`` registers it, reporting each
    image's setting. On a pair auto can decide, naming what auto decides changes nothing."""
    import json

    from typer.testing import CliRunner

    from gvsl.cli.main import app
    from gvsl.runtime.default_model import default_model_dir
    from gvsl.runtime.register import Registrar

    boneless = hu_phantom()[::2, ::2, ::2]
    boneless[boneless > 100] = 40.0
    ct = _save(tmp_path, "ct.nii.gz", boneless)
    mr = _save(tmp_path, "mr.nii.gz", np.asarray(nib.load(SAMPLE_T1).dataobj)[::2, ::2, ::2])
    runner = CliRunner()
    res = runner.invoke(app, ["register", str(ct), str(mr), "-o", str(tmp_path / "w.nii.gz"), "--refine", "0"])
    assert res.exit_code == 2 and "ct.nii.gz: --modality auto cannot decide" in res.output, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)
    assert not (tmp_path / "w.nii.gz").exists()
    args = ["register", str(ct), str(mr), "-o", str(tmp_path / "w.nii.gz"), "--metrics", str(tmp_path / "m.json")]
    res = runner.invoke(app, [*args, "--refine", "0", "--modality", "ct,mr"])
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "m.json").read_text())
    assert (m["modality_fixed"], m["modality_moving"]) == ("ct", "mr")
    res = runner.invoke(app, [*args, "--modality", "ct,mr,mr"])
    assert res.exit_code == 2 and "FIXED,MOVING" in res.output

    ct_bone = _save(tmp_path, "ct_bone.nii.gz", hu_phantom()[::2, ::2, ::2])
    options = {"refine": None}
    with (
        Registrar(default_model_dir(), **options) as auto,  # the default: auto, as the CLI
        Registrar(default_model_dir(), modality=("ct", "mr"), **options) as named,
    ):
        a, b = auto.register(ct_bone, mr), named.register(ct_bone, mr)
    assert a.modalities == b.modalities == ("ct", "mr")
    np.testing.assert_array_equal(a.warped, b.warped)
    with Registrar(default_model_dir(), modality=("ct", "ct"), **options) as wrong:
        c = wrong.register(ct_bone, mr)
    assert c.modalities == ("ct", "ct") and not np.allclose(c.warped, a.warped)
