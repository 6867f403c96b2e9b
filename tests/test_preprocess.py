"""gvsl.runtime.preprocess: loading, validation, geometry, intensity, padding."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from gvsl.runtime import GvslInputError
from gvsl.runtime.preprocess import (
    PreprocessConfig,
    Volume,
    load_volume,
    normalize_intensity,
    pad_to_multiple,
    pad_to_shape,
    preprocess,
    resample,
    save_nifti,
    to_canonical,
    unpad,
    volume_from_array,
    voxel_sizes,
)

# ------------------------------------------------------------------ config


def test_config_roundtrip_json():
    cfg = PreprocessConfig(spacing=(1.5, 1.5, 2.0), modality="mr", mr_percentiles=(1, 99))
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["spacing"] == [1.5, 1.5, 2.0]
    assert PreprocessConfig.from_dict(d) == cfg
    native = PreprocessConfig(spacing=None)
    assert PreprocessConfig.from_dict(json.loads(json.dumps(native.to_dict()))) == native


@pytest.mark.parametrize(
    "kw",
    [
        {"spacing": (1.0, -1.0, 1.0)},
        {"spacing": (1.0, 1.0)},
        {"spacing": (1.0, float("nan"), 1.0)},
        {"modality": "pet"},
        {"ct_window": (100.0, -100.0)},
        {"mr_percentiles": (50.0, 101.0)},
        {"canonical": "yes"},
    ],
)
def test_config_rejects_bad_values(kw):
    with pytest.raises(ValueError):
        PreprocessConfig(**kw)


def test_config_rejects_unknown_key():
    with pytest.raises(ValueError, match="unknown"):
        PreprocessConfig.from_dict({"spacing": [1, 1, 1], "bogus": 1})


# ------------------------------------------------------------------ loading


def test_load_mni(mni_t1_path):
    vol = load_volume(mni_t1_path)
    img = nib.load(mni_t1_path)
    assert vol.data.shape == (197, 233, 189)
    assert vol.data.dtype == np.float32
    np.testing.assert_array_equal(vol.affine, img.affine)
    assert vol.source == str(mni_t1_path)
    assert vol.data.max() == 255.0


def test_load_applies_scaling_and_squeezes_trailing_singletons(tmp_path):
    raw = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6, 1)
    img = nib.Nifti1Image(raw, np.eye(4))
    img.header.set_slope_inter(0.5, 10.0)
    nib.save(img, tmp_path / "s.nii")
    vol = load_volume(tmp_path / "s.nii")
    assert vol.data.shape == (4, 5, 6)
    np.testing.assert_allclose(vol.data, raw[..., 0] * 0.5 + 10.0)


@pytest.mark.parametrize(
    "dtype,klass,shape",
    [
        ("<i2", nib.Nifti1Image, (20, 18, 16)),
        (">i2", nib.Nifti1Image, (20, 18, 16)),  # big-endian file
        ("u1", nib.Nifti2Image, (20, 18, 16)),
        ("<f8", nib.Nifti1Image, (20, 18, 16, 1)),  # trailing singleton
    ],
)
def test_gz_fast_read_matches_nibabel_and_keeps_file_layout(tmp_path, dtype, klass, shape):
    """``.nii.gz`` is inflated by ISA-L (when installed) straight into the stored layout:
    same values as nibabel's reader, x-fastest (no transpose at load time)."""
    raw = np.random.default_rng(0).integers(0, 200, size=shape).astype(dtype)
    img = klass(raw, np.diag([0.9, 1.1, 1.3, 1.0]))
    img.set_data_dtype(np.dtype(dtype))
    nib.save(img, tmp_path / "v.nii.gz")
    vol = load_volume(tmp_path / "v.nii.gz")
    expect = nib.load(tmp_path / "v.nii.gz").get_fdata(dtype=np.float32).reshape(shape[:3])
    assert vol.data.dtype == np.float32 and vol.data.flags.f_contiguous
    np.testing.assert_array_equal(vol.data, expect)


def test_gz_with_short_voxel_data_is_reported(tmp_path):
    """An intact gzip stream whose NIfTI holds fewer voxel bytes than its header says."""
    p = _write(tmp_path / "v.nii", np.ones((16, 16, 16), np.int16))
    (tmp_path / "short.nii.gz").write_bytes(gzip.compress(p.read_bytes()[:-100]))
    with pytest.raises(GvslInputError, match="short.nii.gz.*(corrupt|truncated)"):
        load_volume(tmp_path / "short.nii.gz")


def test_preprocess_of_x_fastest_data_equals_c_order(mni_t1_path):
    """Files keep NIfTI's x-fastest layout; preprocessing resamples the reversed view.
    Same result as on a C-ordered copy (up to float rounding) and C-contiguous output."""
    img = nib.load(mni_t1_path)
    data = np.asarray(img.dataobj, dtype=np.float32)[::2, ::2, ::2]
    aff = np.diag([-1.4, 1.8, 2.2, 1.0])  # LAS: the x axis is flipped by reorientation
    fortran, c_order = np.asfortranarray(data), np.ascontiguousarray(data)
    for cfg in (PreprocessConfig(spacing=(1.7, 2.3, 2.9), modality="mr"), PreprocessConfig(spacing=None)):
        a, b = preprocess(Volume(fortran, aff), cfg), preprocess(Volume(c_order, aff), cfg)
        assert a.data.flags.c_contiguous and a.data.shape == b.data.shape
        np.testing.assert_allclose(a.data, b.data, rtol=0, atol=1e-5)
        np.testing.assert_allclose(a.affine, b.affine, atol=1e-12)


def _write(path: Path, data, affine=None) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), path)
    return path


def _bad_missing(d):
    return d / "missing.nii.gz"


def _bad_txt(d):
    (d / "notes.txt").write_text("hello")
    return d / "notes.txt"


def _bad_png(d):
    p = d / "x.nii.gz"
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    return p


def _bad_truncated(d):
    p = _write(d / "trunc.nii.gz", np.random.default_rng(0).random((24, 24, 24), dtype=np.float32))
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])
    return p


def _bad_truncated_plain(d):
    p = _write(d / "trunc.nii", np.ones((24, 24, 24), np.float32))
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])
    return p


def _bad_gzip_garbage(d):
    p = d / "garbage.nii.gz"
    p.write_bytes(gzip.compress(b"not a nifti header" * 40))
    return p


def _bad_empty(d):
    p = d / "empty.nii.gz"
    p.write_bytes(b"")
    return p


def _bad_2d(d):
    return _write(d / "slice.nii.gz", np.ones((16, 16), np.float32))


def _bad_single_slice(d):
    return _write(d / "oneslice.nii.gz", np.ones((16, 16, 1), np.float32))


def _bad_4d(d):
    return _write(d / "fmri.nii.gz", np.ones((8, 8, 8, 3), np.float32))


def _bad_nan(d):
    a = np.ones((8, 8, 8), np.float32)
    a[3, 3, 3] = np.nan
    return _write(d / "nan.nii.gz", a)


def _bad_inf(d):
    a = np.ones((8, 8, 8), np.float32)
    a[1, 2, 3] = np.inf
    return _write(d / "inf.nii.gz", a)


def _bad_singular(d):
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((8, 8, 8))
    hdr.set_data_dtype(np.float32)
    hdr.set_sform(np.diag([0.0, 0.0, 0.0, 1.0]), code=1)
    p = d / "singular.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), None, header=hdr), p)
    assert not np.linalg.det(nib.load(p).affine[:3, :3])  # really written singular
    return p


def _bad_folder(d):
    (d / "sub.nii.gz").mkdir()
    return d / "sub.nii.gz"


BAD_FILES = {
    "missing": _bad_missing,
    "txt": _bad_txt,
    "png_named_nii_gz": _bad_png,
    "truncated_gz": _bad_truncated,
    "truncated_plain": _bad_truncated_plain,
    "gzip_not_nifti": _bad_gzip_garbage,
    "empty_file": _bad_empty,
    "2d": _bad_2d,
    "single_slice": _bad_single_slice,
    "4d": _bad_4d,
    "nan": _bad_nan,
    "inf": _bad_inf,
    "singular_affine": _bad_singular,
    "folder": _bad_folder,
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_gives_one_line_error_naming_it(tmp_path, case):
    path = BAD_FILES[case](tmp_path)
    with pytest.raises(GvslInputError) as info:
        load_volume(path)
    msg = str(info.value)
    assert path.name in msg
    assert "\n" not in msg
    assert isinstance(info.value, ValueError)


def test_bad_file_messages_say_what(tmp_path):
    def msg(case):
        with pytest.raises(GvslInputError) as info:
            load_volume(BAD_FILES[case](tmp_path))
        return str(info.value)

    assert "not found" in msg("missing")
    assert "4-D (8x8x8x3)" in msg("4d") and "single 3-D volume" in msg("4d")
    assert "2-D" in msg("2d")
    assert "NaN or Inf" in msg("nan")
    assert "empty" in msg("empty_file")
    assert "corrupt or truncated" in msg("truncated_gz")
    assert "not invertible" in msg("singular_affine")


def test_too_many_voxels(tmp_path):
    p = _write(tmp_path / "big.nii.gz", np.zeros((10, 10, 10), np.float32))
    with pytest.raises(GvslInputError, match=r"big\.nii\.gz.*1000 voxels.*limit of 999"):
        load_volume(p, max_voxels=999)
    assert load_volume(p, max_voxels=1000).data.shape == (10, 10, 10)


@pytest.mark.parametrize(
    ("data", "affine", "what"),
    [
        (np.zeros((0, 4, 4)), np.eye(4), "empty"),
        (np.zeros((4, 4)), np.eye(4), "2-D"),
        (np.zeros((4, 4, 4, 2)), np.eye(4), "4-D"),
        (np.full((4, 4, 4), np.nan), np.eye(4), "NaN"),
        (np.zeros((4, 4, 4)), np.zeros((4, 4)), "not invertible"),
        (np.zeros((4, 4, 4)), np.full((4, 4), np.inf), "not finite"),
        (np.zeros((4, 4, 4), complex), np.eye(4), "real number"),
    ],
)
def test_volume_from_array_validates(data, affine, what):
    with pytest.raises(GvslInputError, match=what) as info:
        volume_from_array(data, affine, source="mine")
    assert str(info.value).startswith("mine:")


def test_volume_from_array_ok():
    vol = volume_from_array(np.ones((4, 5, 6, 1), np.uint8), np.eye(4))
    assert vol.data.shape == (4, 5, 6) and vol.data.dtype == np.float32
    assert vol.source == "<array>"


# ------------------------------------------------------------------ geometry


def test_canonical_matches_nibabel(mni_small_arrays):
    data = mni_small_arrays["t1"].astype(np.float32)
    # permuted (axes -> A, S, L) + flips, 2x3x1.5 mm, with a translation
    aff = np.array([[0.0, 0.0, -1.5, 30.0], [-2.0, 0.0, 0.0, 50.0], [0.0, 3.0, 0.0, -20.0], [0, 0, 0, 1]])
    ref = nib.as_closest_canonical(nib.Nifti1Image(data, aff))
    out = to_canonical(Volume(data, aff))
    np.testing.assert_array_equal(out.data, np.asarray(ref.dataobj))
    np.testing.assert_allclose(out.affine, ref.affine)
    assert out.data.flags.c_contiguous
    assert nib.aff2axcodes(out.affine) == ("R", "A", "S")


def test_canonical_is_noop_on_ras():
    vol = Volume(np.zeros((3, 4, 5), np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
    assert to_canonical(vol) is vol


def _oblique_affine(spacing):
    c, s = np.cos(0.3), np.sin(0.3)
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, -1.0]])  # rotation + flip
    aff = np.eye(4)
    aff[:3, :3] = rot * np.asarray(spacing)[None, :]
    aff[:3, 3] = (12.0, -7.0, 30.0)
    return aff


@pytest.mark.parametrize("target", [(1.0, 1.0, 1.0), (3.0, 5.0, 2.5)])
def test_resample_shape_affine_and_linear_ramp(target):
    old_sp = np.array([2.0, 3.0, 1.5])
    shape = (20, 24, 16)
    i, j, k = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    ramp = (0.5 * i - 2.0 * j + 3.0 * k + 7.0).astype(np.float32)
    aff = _oblique_affine(old_sp)
    out = resample(Volume(ramp, aff), target)

    expect_shape = tuple(max(1, round(n * o / t)) for n, o, t in zip(shape, old_sp, target, strict=False))
    assert out.data.shape == expect_shape
    np.testing.assert_allclose(voxel_sizes(out.affine), target)
    np.testing.assert_allclose(out.affine[:3, 3], aff[:3, 3])  # voxel (0,0,0) stays put
    np.testing.assert_allclose(  # directions kept
        out.affine[:3, :3] / voxel_sizes(out.affine), aff[:3, :3] / old_sp, atol=1e-12
    )
    # a linear ramp stays the same linear function of the old voxel index
    ni, nj, nk = np.meshgrid(*(np.arange(n) for n in expect_shape), indexing="ij")
    oi, oj, ok = ni * target[0] / 2.0, nj * target[1] / 3.0, nk * target[2] / 1.5
    inside = (oi <= shape[0] - 1) & (oj <= shape[1] - 1) & (ok <= shape[2] - 1)
    np.testing.assert_allclose(out.data[inside], (0.5 * oi - 2.0 * oj + 3.0 * ok + 7.0)[inside], rtol=1e-5, atol=1e-4)


def test_resample_matches_scipy_trilinear():
    rng = np.random.default_rng(1)
    data = rng.random((17, 23, 11), dtype=np.float32)
    aff = np.diag([0.8, 1.3, 2.6, 1.0])
    out = resample(Volume(data, aff), (1.0, 1.0, 1.0))
    scale = np.array([1 / 0.8, 1 / 1.3, 1 / 2.6])
    ref = ndimage.affine_transform(data, scale, output_shape=out.data.shape, order=1, mode="nearest")
    np.testing.assert_allclose(out.data, ref, atol=1e-5)
    nearest = resample(Volume(data, aff), (1.0, 1.0, 1.0), order=0)
    assert set(np.unique(nearest.data)) <= set(np.unique(data))


def test_resample_threaded_path_matches_scipy():
    rng = np.random.default_rng(2)
    data = rng.random((96, 100, 60), dtype=np.float32)  # output > 1M voxels: thread pool
    out = resample(Volume(data, np.diag([0.7, 0.7, 2.5, 1.0])), (1.0, 1.0, 1.0))
    ref = ndimage.affine_transform(data, [1 / 0.7, 1 / 0.7, 0.4], output_shape=out.data.shape, order=1, mode="nearest")
    np.testing.assert_allclose(out.data, ref, atol=1e-5)


def test_resample_skips_matching_spacing():
    vol = Volume(np.zeros((4, 4, 4), np.float32), np.diag([1.0005, 1.0, 0.9995, 1.0]))
    assert resample(vol, (1.0, 1.0, 1.0)) is vol


def test_resample_tiny_axis_keeps_one_voxel():
    out = resample(Volume(np.ones((2, 4, 4), np.float32), np.eye(4)), (10.0, 1.0, 1.0))
    assert out.data.shape == (1, 4, 4)


# ------------------------------------------------------------------ intensity


def test_ct_window():
    cfg = PreprocessConfig(modality="ct")
    hu = np.array([-3000.0, -1024.0, 0.0, 512.0, 1024.0, 4000.0])
    np.testing.assert_allclose(normalize_intensity(hu, cfg), [0.0, 0.0, 0.5, 0.75, 1.0, 1.0], atol=1e-7)
    assert normalize_intensity(hu, cfg).dtype == np.float32


def test_mr_percentiles():
    rng = np.random.default_rng(0)
    data = np.zeros((20, 20, 20), np.float32)
    data[5:15, 5:15, 5:15] = rng.uniform(100.0, 1100.0, (10, 10, 10))
    cfg = PreprocessConfig(modality="mr", mr_percentiles=(1.0, 99.0))
    out = normalize_intensity(data, cfg)
    lo, hi = np.percentile(data[data != 0], [1.0, 99.0])
    fg = data[5:15, 5:15, 5:15]
    np.testing.assert_allclose(out[5:15, 5:15, 5:15], np.clip((fg - lo) / (hi - lo), 0, 1), atol=1e-6)
    assert out.min() == 0.0 and out.max() == 1.0
    assert np.all(out[data == 0] == 0.0)  # background stays 0
    full = normalize_intensity(data, PreprocessConfig(modality="mr", mr_percentiles=(0, 100)))
    assert np.isclose(full[data == fg.min()][0], 0.0) and np.isclose(full.max(), 1.0)


@pytest.mark.parametrize("value", [0.0, 5.0])
def test_mr_constant_image_gives_zeros(value):
    out = normalize_intensity(np.full((4, 4, 4), value, np.float32), PreprocessConfig(modality="mr"))
    assert np.all(out == 0.0) and out.dtype == np.float32


def test_none_modality_passes_through():
    data = np.array([[[-5, 0, 7000]]], dtype=np.int16)
    out = normalize_intensity(data, PreprocessConfig(modality="none"))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, data)


# ------------------------------------------------------------------ padding


def test_pad_to_multiple_roundtrip():
    data = np.random.default_rng(0).random((17, 32, 33), dtype=np.float32)
    padded, pads = pad_to_multiple(data, 16, value=-1.0)
    assert padded.shape == (32, 32, 48)
    assert pads == ((7, 8), (0, 0), (7, 8))
    assert padded[0, 0, 0] == -1.0
    np.testing.assert_array_equal(unpad(padded, pads), data)
    feats = np.stack([padded, padded * 2])  # [C, D, H, W]
    np.testing.assert_array_equal(unpad(feats, pads)[1], data * 2)


def test_pad_to_multiple_noop_returns_same_array():
    data = np.zeros((16, 32, 48), np.float32)
    padded, pads = pad_to_multiple(data)
    assert padded is data and pads == ((0, 0), (0, 0), (0, 0))


def test_pad_to_shape_only_pads_small_axes():
    data = np.ones((10, 40, 15), np.float32)
    padded, pads = pad_to_shape(data, (16, 32, 16))
    assert padded.shape == (16, 40, 16)
    assert pads == ((3, 3), (0, 0), (0, 1))
    np.testing.assert_array_equal(unpad(padded, pads), data)


# ------------------------------------------------------------------ pipeline + output


def test_preprocess_mni_to_2mm(mni_t1_path):
    vol = load_volume(mni_t1_path)
    flipped = Volume(
        vol.data[::-1].copy(),
        vol.affine @ np.array([[-1.0, 0, 0, 196], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]),
    )
    cfg = PreprocessConfig(spacing=(2.0, 2.0, 2.0), modality="mr")
    a, b = preprocess(vol, cfg), preprocess(flipped, cfg)
    assert a.data.shape == (98, 116, 94)  # round(n / 2), halves to even
    np.testing.assert_allclose(a.affine, b.affine)  # canonical undoes the flip
    np.testing.assert_array_equal(a.data, b.data)
    np.testing.assert_allclose(voxel_sizes(a.affine), 2.0)
    np.testing.assert_allclose(a.affine[:3, 3], vol.affine[:3, 3])
    assert a.data.dtype == np.float32 and 0.0 <= a.data.min() and a.data.max() <= 1.0


def test_save_nifti_roundtrip_is_atomic(tmp_path):
    data = np.random.default_rng(0).random((6, 7, 8), dtype=np.float32)
    aff = _oblique_affine((1.0, 2.0, 3.0))
    out = save_nifti(tmp_path / "sub" / "out.nii.gz", data, aff)
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.nii.gz"]  # no temp left
    back = load_volume(out)
    np.testing.assert_array_equal(back.data, data)
    np.testing.assert_allclose(back.affine, aff, atol=1e-5)
    assert nib.load(out).header["qform_code"] == 1 and nib.load(out).header["sform_code"] == 1
    save_nifti(tmp_path / "mask.nii", np.ones((2, 2, 2), bool), np.eye(4))
    assert nib.load(tmp_path / "mask.nii").get_data_dtype() == np.uint8


def test_runtime_works_without_torch():
    code = textwrap.dedent(
        """
        import sys

        class NoTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this test")
                return None

        sys.meta_path.insert(0, NoTorch())
        import numpy as np
        import gvsl.runtime as runtime
        from gvsl.runtime.preprocess import pad_to_multiple, volume_from_array

        vol = volume_from_array(np.random.default_rng(0).random((20, 20, 10)), np.eye(4))
        out = runtime.preprocess(vol, runtime.PreprocessConfig(spacing=(2.0, 2.0, 2.0), modality="mr"))
        padded, _ = pad_to_multiple(out.data)
        assert out.data.shape == (10, 10, 5), out.data.shape
        assert padded.shape == (16, 16, 16)
        assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules)
        print("ok")
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    res = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_keep_dtype_load_preprocesses_to_the_same_values(tmp_path, suffix):
    """``load_volume(keep_dtype=True)`` (Embedder.prepare, the training cache) keeps int16
    voxels as stored; preprocess converts while resampling, to exactly the float path's numbers."""
    raw = np.random.default_rng(3).integers(-1024, 3000, size=(70, 60, 40)).astype(np.int16)
    path = _write(tmp_path / f"ct{suffix}", raw, np.diag([-0.7, -0.8, 1.5, 1.0]))
    kept, floats = load_volume(path, keep_dtype=True), load_volume(path)
    assert kept.data.dtype == np.int16 and floats.data.dtype == np.float32
    np.testing.assert_array_equal(kept.data, floats.data)
    for cfg in (PreprocessConfig(), PreprocessConfig(spacing=None, modality="mr")):
        a, b = preprocess(kept, cfg), preprocess(floats, cfg)
        assert a.data.dtype == np.float32 and a.data.flags.c_contiguous
        np.testing.assert_array_equal(a.data, b.data)
    np.testing.assert_array_equal(kept.data, raw)  # never modified in place


@pytest.mark.parametrize(
    "affine,cfg",
    [
        (np.diag([-0.7, -0.7, 1.0, 1.0]), PreprocessConfig()),  # LPS CT, in-plane resampling only
        (np.diag([0.9, -1.1, -1.3, 1.0]), PreprocessConfig(spacing=(1.2, 0.8, 2.0), modality="mr")),  # z flipped
        (np.diag([-0.7, -0.7, 1.0, 1.0]), PreprocessConfig(canonical=False, spacing=(1.0, 1.0, 0.5))),
    ],
)
def test_load_preprocessed_streams_gz_to_the_same_numbers(tmp_path, affine, cfg):
    """load_preprocessed overlaps inflating a .nii.gz with the in-plane resampling of the
    slabs already inflated: same original and preprocessed volumes as the plain path."""
    import importlib

    from gvsl.runtime import nifti, nifti_stream

    P = importlib.import_module("gvsl.runtime.preprocess")
    raw = np.random.default_rng(5).integers(-1024, 2000, size=(128, 120, 90)).astype(np.int16)  # > 1 M voxels
    path = _write(tmp_path / "ct.nii.gz", raw, affine)
    opened = nifti.open_nifti(path, str(path), None)
    assert nifti_stream.stream_preprocess(*opened, path, cfg) is not None  # overlapped path taken
    vol, pre = P.load_preprocessed(path, cfg)
    ref = preprocess(load_volume(path, keep_dtype=True), cfg)
    np.testing.assert_array_equal(vol.data, raw)
    np.testing.assert_array_equal(vol.affine, nib.load(path).affine)
    assert pre.data.flags.c_contiguous and pre.data.shape == ref.data.shape
    np.testing.assert_allclose(pre.data, ref.data, rtol=0, atol=1e-6)
    np.testing.assert_allclose(pre.affine, ref.affine, atol=1e-12)


def test_load_preprocessed_falls_back_and_reports_like_load_volume(tmp_path):
    import importlib

    from gvsl.runtime import nifti, nifti_stream

    P = importlib.import_module("gvsl.runtime.preprocess")
    cfg = PreprocessConfig()
    floats = _write(tmp_path / "f.nii.gz", np.ones((128, 120, 90), np.float32), np.diag([-0.7, -0.7, 1.0, 1.0]))
    permuted = _write(tmp_path / "p.nii.gz", np.ones((128, 120, 90), np.int16),
                      np.array([[0, 0.7, 0, 0], [0.7, 0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1]]))  # fmt: skip
    for path in (floats, permuted):  # not streamed, same results as the plain path
        assert nifti_stream.stream_preprocess(*nifti.open_nifti(path, str(path), None), path, cfg) is None
        np.testing.assert_array_equal(P.load_preprocessed(path, cfg)[1].data, preprocess(load_volume(path), cfg).data)
    good = _write(tmp_path / "t.nii.gz", np.ones((128, 120, 90), np.int16), np.diag([-0.7, -0.7, 1.0, 1.0]))
    (tmp_path / "cut.nii.gz").write_bytes(good.read_bytes()[:-4000])
    with pytest.raises(GvslInputError, match="cut.nii.gz.*(corrupt|truncated)"):
        P.load_preprocessed(tmp_path / "cut.nii.gz", cfg)


def test_preprocessed_shape_is_the_shape_preprocess_gives():
    """``preprocessed_shape`` predicts the preprocessed grid without resampling: flipped and
    permuted axes, anisotropic voxels, native spacing and no reorientation alike."""
    from gvsl.runtime.preprocess import preprocessed_shape

    rng = np.random.default_rng(0)
    permuted = np.array([[0.0, 0, -3.0, 10], [1.3, 0, 0, -4], [0, -0.9, 0, 2], [0, 0, 0, 1]])
    for affine in (np.diag([0.8, 1.1, 3.0, 1.0]), permuted):
        vol = volume_from_array(rng.random((37, 29, 11), dtype=np.float32), affine)
        for cfg in (PreprocessConfig(spacing=(2.0, 2.0, 2.0), modality="none"),
                    PreprocessConfig(spacing=(1.7, 2.3, 4.1), modality="none", canonical=False),
                    PreprocessConfig(spacing=None, modality="none")):  # fmt: skip
            assert preprocessed_shape(vol, cfg) == preprocess(vol, cfg).data.shape, (affine, cfg)
