"""The runtime's numpy grid reads (gvsl.runtime.warp) against scipy.ndimage, which they replace:
the same values to float32 rounding for every order, mode, axis-aligned and oblique map."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from gvsl.runtime.warp import resample_to_grid, sample, warp_by_displacement

RNG = np.random.default_rng(7)
SRC = RNG.random((17, 13, 11), dtype=np.float32) * 100.0
LABELS = RNG.integers(0, 5, (17, 13, 11)).astype(np.int16)


def _affine(rot_deg: float, spacing, origin) -> np.ndarray:
    t = np.deg2rad(rot_deg)
    rot = np.array([[np.cos(t), -np.sin(t), 0.0], [np.sin(t), np.cos(t), 0.0], [0.0, 0.0, 1.0]])
    a = np.eye(4)
    a[:3, :3] = rot @ np.diag(spacing)
    a[:3, 3] = origin
    return a


SRC_AFFINE = _affine(0.0, (2.0, 2.5, 3.0), (-10.0, 4.0, 7.0))
GRIDS = {
    # a finer grid shifted by a fraction of a voxel and reaching past the source: the separable path
    "axis-aligned": (_affine(0.0, (1.5, 2.0, 2.0), (-13.3, 1.1, 5.2)), (26, 19, 18)),
    # flipped first axis, shifted past the source's far edge: still axis-aligned, negative step
    "flipped": (np.diag([-2.0, 2.5, 3.0, 1.0]) + np.pad([[23.1], [4.7], [7.0]], ((0, 1), (3, 0))), (18, 13, 11)),
    # rotated 20 degrees: the gather path
    "oblique": (_affine(20.0, (2.2, 2.2, 2.9), (-6.0, -3.0, 8.0)), (15, 14, 12)),
}


def _scipy(data, src_affine, dst_affine, shape, order, mode, cval):
    m = np.linalg.inv(src_affine) @ dst_affine
    return ndimage.affine_transform(
        data, m[:3, :3], offset=m[:3, 3], output_shape=shape, order=order, mode=mode, cval=cval,
        output=data.dtype if order == 0 else np.float32,
    )  # fmt: skip


@pytest.mark.parametrize("grid", sorted(GRIDS))
@pytest.mark.parametrize("order", [0, 1])
@pytest.mark.parametrize("mode", ["nearest", "constant"])
def test_resample_to_grid_matches_scipy(grid, order, mode):
    dst_affine, shape = GRIDS[grid]
    ours = resample_to_grid(SRC, SRC_AFFINE, dst_affine, shape, order=order, mode=mode, cval=-5.0)
    ref = _scipy(SRC, SRC_AFFINE, dst_affine, shape, order, mode, -5.0)
    assert ours.dtype == np.float32 and ours.shape == shape
    if mode == "constant":
        assert (ref == -5.0).mean() > 0.05  # the grids reach outside the source
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-3)  # values up to 100: float32 rounding


@pytest.mark.parametrize("grid", sorted(GRIDS))
def test_labels_keep_their_values_and_dtype(grid):
    dst_affine, shape = GRIDS[grid]
    ours = resample_to_grid(LABELS, SRC_AFFINE, dst_affine, shape, order=0, mode="constant")
    assert ours.dtype == np.int16
    np.testing.assert_array_equal(ours, _scipy(LABELS, SRC_AFFINE, dst_affine, shape, 0, "constant", 0))


def test_channels_resample_like_single_volumes():
    field = np.stack([SRC, SRC * 0.5, -SRC])
    dst_affine, shape = GRIDS["oblique"]
    ours = resample_to_grid(field, SRC_AFFINE, dst_affine, shape, order=1, mode="nearest")
    assert ours.shape == (3, *shape)
    for c in range(3):
        np.testing.assert_allclose(ours[c], _scipy(field[c], SRC_AFFINE, dst_affine, shape, 1, "nearest", 0), atol=1e-3)


@pytest.mark.parametrize("order", [0, 1])
def test_warp_by_displacement_matches_map_coordinates(order):
    dst_affine, shape = GRIDS["oblique"]
    disp = (RNG.normal(0.0, 3.0, (3, *shape))).astype(np.float32)
    shift = np.array([1.5, -2.0, 0.7])
    src = LABELS if order == 0 else SRC
    ours = warp_by_displacement(src, SRC_AFFINE, dst_affine, disp, order=order, cval=-1, shift_mm=shift)
    index = np.indices(shape).reshape(3, -1).astype(np.float64)
    world = dst_affine[:3, :3] @ index + dst_affine[:3, 3:] + disp.reshape(3, -1) + shift[:, None]
    inv = np.linalg.inv(SRC_AFFINE)
    coords = (inv[:3, :3] @ world + inv[:3, 3:]).reshape(3, *shape)
    ref = ndimage.map_coordinates(src, coords, order=order, mode="constant", cval=-1)
    assert ours.dtype == src.dtype
    if order == 0:
        np.testing.assert_array_equal(ours, ref)
    else:
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-3)


def test_fortran_ordered_sources_read_the_same():
    """nibabel hands out Fortran-ordered arrays; the reads take them as they are."""
    dst_affine, shape = GRIDS["oblique"]
    disp = RNG.normal(0.0, 2.0, (3, *shape)).astype(np.float32)
    fortran = np.asfortranarray(SRC)
    np.testing.assert_array_equal(
        warp_by_displacement(fortran, SRC_AFFINE, dst_affine, disp),
        warp_by_displacement(SRC, SRC_AFFINE, dst_affine, disp),
    )
    np.testing.assert_array_equal(
        resample_to_grid(fortran, SRC_AFFINE, dst_affine, shape), resample_to_grid(SRC, SRC_AFFINE, dst_affine, shape)
    )


def test_sample_reads_voxels_exactly_and_the_edge_or_cval_outside():
    pts = np.array([[0.0, 16.0, 16.0 + 1e-9, -0.2, 8.5], [0.0, 12.0, 0.0, 3.0, 6.0], [0.0, 10.0, 0.0, 3.0, 5.0]])
    inside, = sample([SRC], pts, order=1, mode="constant", cval=-9.0)
    edge, = sample([SRC], pts, order=1, mode="nearest")
    assert inside[0] == SRC[0, 0, 0] and inside[1] == SRC[16, 12, 10]
    assert inside[2] == -9.0 and inside[3] == -9.0  # past the last centre / before the first
    assert edge[2] == SRC[16, 0, 0] and edge[3] == SRC[0, 3, 3]
    assert abs(inside[4] - 0.5 * (SRC[8, 6, 5] + SRC[9, 6, 5])) < 1e-4


def test_written_nii_gz_is_plain_gzip_and_round_trips(tmp_path):
    """``write_image`` deflates with ISA-L: the file is an ordinary gzip stream (Python's gzip
    reads it) and nibabel gives back the exact voxels, header and affine."""
    import gzip

    import nibabel as nib

    from gvsl.runtime.io import save_vector_nifti
    from gvsl.runtime.nifti import save_nifti

    affine = np.diag([2.0, 2.5, 3.0, 1.0])
    path = save_nifti(tmp_path / "v.nii.gz", SRC, affine)
    raw = gzip.decompress(path.read_bytes())
    assert raw[344:348] == b"n+1\x00"  # the NIfTI-1 single-file magic
    back = nib.load(path)
    np.testing.assert_array_equal(np.asarray(back.dataobj), SRC)
    np.testing.assert_array_equal(back.affine, affine)
    field = np.stack([SRC, -SRC, 2 * SRC], axis=-1)
    vec = nib.load(save_vector_nifti(tmp_path / "f.nii.gz", field, affine))
    assert vec.shape == (*SRC.shape, 1, 3) and vec.header.get_intent()[0] == "vector"
    np.testing.assert_array_equal(np.asarray(vec.dataobj)[:, :, :, 0], field)
