"""gvsl.synth: subjects are the real template under a known, smooth deformation, reproducible
from their seed; the bundled sample matches nilearn's template; bad input is one clear line."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from gvsl.cli.main import app
from gvsl.runtime.errors import GvslInputError
from gvsl.runtime.warp import warp_by_displacement
from gvsl.synth import SynthConfig, load_template, make_subject, make_subjects

runner = CliRunner()


@pytest.fixture(scope="module")
def sample4():
    return load_template("sample", 4.0)


def test_bundled_sample_is_the_nilearn_template(mni_t1_path):
    a = load_template("sample", 2.0)
    b = load_template("mni", 2.0)
    assert a.image.shape == b.image.shape
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-4)
    assert np.corrcoef(a.image.ravel(), b.image.ravel())[0, 1] > 0.98
    assert (a.labels == b.labels).mean() > 0.9
    assert set(np.unique(a.labels)) == {0, 1, 2}


def test_subject_is_the_template_pulled_through_its_field(sample4):
    cfg = SynthConfig(bias=0.0, noise=0.0, gamma=(1.0, 1.0), gain=(1.0, 1.0))
    s = make_subject(sample4, np.random.default_rng(3), cfg)
    assert s.image.shape == sample4.image.shape and s.disp_mm.shape == (3, *sample4.image.shape)
    again = warp_by_displacement(sample4.image, sample4.affine, sample4.affine, s.disp_mm, order=1)
    np.testing.assert_allclose(s.image, again, atol=1e-5)
    # the field is a real deformation, but a plausible one
    mag = np.sqrt((s.disp_mm**2).sum(0))
    assert 1.0 < float(mag.max()) < 60.0
    assert set(np.unique(s.labels)) <= {0, 1, 2}
    assert (s.labels != sample4.labels).mean() > 0.02


def test_subjects_are_reproducible_and_different(tmp_path):
    a = make_subjects(tmp_path / "a", 2, seed=7, source="sample", spacing=4.0)
    b = make_subjects(tmp_path / "b", 2, seed=7, source="sample", spacing=4.0)
    img = [np.asarray(nib.load(r["image"]).dataobj) for r in a + b]
    np.testing.assert_array_equal(img[0], img[2])
    assert not np.allclose(img[0], img[1])
    meta = json.loads((tmp_path / "a" / "subject_synth.json").read_text())
    assert meta["n"] == 2 and meta["subjects"][1]["params"] == a[1]["params"]
    lab = nib.load(a[0]["labels"])
    assert lab.get_data_dtype() == np.uint8 and lab.shape == img[0].shape


def test_four_d_source_uses_its_first_frame(tmp_path, mni_small_arrays):
    vol = np.stack([mni_small_arrays["t1"], mni_small_arrays["t1"] * 0], axis=-1).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.diag([4.0, 4.0, 4.0, 1.0])), tmp_path / "run.nii.gz")
    t = load_template(tmp_path / "run.nii.gz", None)
    assert t.labels is None and t.image.ndim == 3 and t.image.max() == pytest.approx(1.0)


def test_bad_input_is_one_clear_line(tmp_path):
    with pytest.raises(GvslInputError, match="at least one"):
        make_subjects(tmp_path, 0, source="sample")
    with pytest.raises(GvslInputError, match="nope.nii.gz"):
        load_template(tmp_path / "nope.nii.gz")
    r = runner.invoke(app, ["synth", "-o", str(tmp_path / "x"), "--source", str(tmp_path / "nope.nii.gz")])
    assert r.exit_code == 2 and "nope.nii.gz" in r.output


def test_synth_command(tmp_path):
    r = runner.invoke(app, ["synth", "-o", str(tmp_path), "--n", "2", "--source", "sample", "--spacing", "4"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in tmp_path.glob("*.nii.gz")) == [
        "subject_000.nii.gz",
        "subject_000_labels.nii.gz",
        "subject_001.nii.gz",
        "subject_001_labels.nii.gz",
    ]
