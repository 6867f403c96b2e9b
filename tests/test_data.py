"""gvsl.data: volume discovery, the preprocessed-volume cache and the pair stream."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import gvsl.data as gdata
from gvsl.data import PairDataset, VolumeCache, list_volumes, make_batch, scan_volumes
from gvsl.runtime import GvslInputError
from gvsl.runtime.preprocess import PreprocessConfig, load_volume, preprocess

CFG = PreprocessConfig(spacing=(4.0, 4.0, 4.0), modality="mr")

# ------------------------------------------------------------------ list_volumes


def test_list_folder_recursive_sorted_skips_hidden_and_other_files(small_nifti_dir):
    sub = small_nifti_dir / "more"
    sub.mkdir()
    (sub / "a.nii").write_bytes((small_nifti_dir / "t1.nii.gz").read_bytes())
    (small_nifti_dir / "readme.txt").write_text("x")
    (small_nifti_dir / "._t1.nii.gz").write_bytes(b"appledouble")
    found = list_volumes([small_nifti_dir])
    assert [p.relative_to(small_nifti_dir).as_posix() for p in found] == [
        "gm.nii.gz",
        "more/a.nii",
        "t1.nii.gz",
        "wm.nii.gz",
    ]


def test_list_files_globs_and_dedup(small_nifti_dir):
    t1 = small_nifti_dir / "t1.nii.gz"
    found = list_volumes([t1, str(small_nifti_dir / "*m.nii.gz"), small_nifti_dir])
    assert [p.name for p in found] == ["t1.nii.gz", "gm.nii.gz", "wm.nii.gz"]
    assert list_volumes(str(t1)) == [t1]


def test_list_errors_name_the_path(tmp_path, small_nifti_dir):
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(
        GvslInputError, match=r"no \.nii/\.nii\.gz files in .*empty_dir; point DATA"
    ):
        list_volumes([empty])
    other = tmp_path / "pngs"
    other.mkdir()
    (other / "a.png").write_bytes(b"\x89PNG")
    (other / "b.txt").write_text("x")
    with pytest.raises(GvslInputError, match="pngs"):
        list_volumes([other])
    txt = other / "b.txt"
    with pytest.raises(GvslInputError, match=r"b\.txt: not a \.nii/\.nii\.gz file"):
        list_volumes([small_nifti_dir, txt])
    with pytest.raises(GvslInputError, match="nowhere: no such file"):
        list_volumes([tmp_path / "nowhere"])
    with pytest.raises(GvslInputError, match="match"):
        list_volumes([str(tmp_path / "*.nii.gz")])
    with pytest.raises(GvslInputError):
        list_volumes([])


# ------------------------------------------------------------------ cache


def test_cache_hit_skips_preprocessing_and_matches_direct(small_nifti_dir, tmp_path, monkeypatch):
    calls = []
    real = gdata.load_preprocessed
    monkeypatch.setattr(gdata, "load_preprocessed", lambda p, c, **kw: calls.append(str(p)) or real(p, c, **kw))
    path = small_nifti_dir / "gm.nii.gz"

    cache = VolumeCache(tmp_path / "cache")
    arr = cache.get(path, CFG)
    assert (cache.misses, cache.hits, len(calls)) == (1, 0, 1)
    assert isinstance(arr, np.memmap) and arr.dtype == np.float32 and not arr.flags.writeable
    np.testing.assert_array_equal(arr, preprocess(load_volume(path), CFG).data)

    again = VolumeCache(tmp_path / "cache")  # a new run: reuses the files on disk
    np.testing.assert_array_equal(again.get(path, CFG), arr)
    assert (again.misses, again.hits, len(calls)) == (0, 1, 1)
    assert [p.suffix for p in (tmp_path / "cache").iterdir()] == [".npy"]  # no temp files


def test_cache_invalidates_on_file_or_config_change(small_nifti_dir, tmp_path):
    path = small_nifti_dir / "t1.nii.gz"
    cache = VolumeCache(tmp_path / "cache")
    first = np.array(cache.get(path, CFG))
    cache.get(path, PreprocessConfig(spacing=(8.0, 8.0, 8.0), modality="mr"))
    assert cache.misses == 2

    img = nib.load(path)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:, :, :20], img.affine), path)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # coarse-mtime filesystems
    changed = cache.get(path, CFG)
    assert cache.misses == 3 and cache.hits == 0
    assert changed.shape == (40, 48, 20) and first.shape == (40, 48, 40)


# ------------------------------------------------------------------ scan


def test_scan_reports_bad_files(small_nifti_dir, tmp_path):
    bad = small_nifti_dir / "zz_nan.nii.gz"
    data = np.ones((8, 8, 8), np.float32)
    data[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), bad)
    files = list_volumes([small_nifti_dir])
    seen = []
    good, skipped = scan_volumes(
        files, CFG, VolumeCache(tmp_path / "c"), skip_bad=True, progress=lambda *a: seen.append(a)
    )
    assert [p.name for p in good] == ["gm.nii.gz", "t1.nii.gz", "wm.nii.gz"]
    assert len(skipped) == 1 and skipped[0][0] == bad and "zz_nan.nii.gz" in skipped[0][1]
    assert [(i, n) for i, n, _ in seen] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    with pytest.raises(GvslInputError, match="zz_nan"):
        scan_volumes(files, CFG, VolumeCache(tmp_path / "c"), skip_bad=False)


def test_scan_max_voxels(small_nifti_dir, tmp_path):
    files = list_volumes([small_nifti_dir])  # each 40*48*40 = 76800 voxels as stored
    cache = VolumeCache(tmp_path / "c")
    good, bad = scan_volumes(files, CFG, cache, skip_bad=True, max_voxels=76_799)
    assert good == [] and all("76800 voxels" in why for _, why in bad)
    good, bad = scan_volumes(files, CFG, cache, skip_bad=True, max_voxels=76_800)
    assert len(good) == 3 and bad == []


# ------------------------------------------------------------------ pairs


def _labelled(n, shape=(40, 48, 40)):
    """Volumes filled with their index + 1, so a crop tells which volume it came from."""
    return [np.full(shape, k + 1, np.float32) for k in range(n)]


def _ids(item):
    return int(item["x1"].max()), int(item["x2"].max())


def test_pairs_come_from_different_volumes_with_patch_shape():
    ds = PairDataset(_labelled(3), (32, 32, 16), seed=0)
    it = iter(ds)
    pairs = [_ids(next(it)) for _ in range(60)]
    assert all(a != b for a, b in pairs)
    assert {a for a, _ in pairs} == {1, 2, 3} and {b for _, b in pairs} == {1, 2, 3}
    item = next(it)
    assert item["x1"].shape == (1, 32, 32, 16) and item["x2"].dtype == torch.float32


def test_pairs_are_cropped_at_the_same_relative_position():
    """Both crops hold corresponding anatomy: every voxel stores its relative
    position along axis 0 (x100), so the two crops' centre values must agree
    wherever neither crop was pushed back inside at a border."""

    def rel_pos(shape):
        return np.broadcast_to(np.linspace(0, 100, shape[0])[:, None, None], shape).astype(np.float32)

    ds = PairDataset([rel_pos((200, 48, 48)), rel_pos((120, 48, 48))], 32, seed=3)
    centres, checked = [], 0
    for _ in range(40):
        pair = ds.sample()
        a, b = pair["x1"][0, 16, 0, 0].item(), pair["x2"][0, 16, 0, 0].item()
        centres.append(a)
        if 20 < a < 80 and 20 < b < 80:  # away from the borders of both volumes
            checked += 1
            assert abs(a - b) < 2.0, (a, b)
    assert checked >= 10
    assert np.std(centres) > 10  # the position itself is random


def test_single_volume_pairs_with_itself():
    ds = PairDataset(_labelled(1), 16, seed=0)
    assert _ids(next(iter(ds))) == (1, 1)


def test_small_volume_is_zero_padded_centred():
    ds = PairDataset([np.ones((10, 40, 12), np.float32)], (16, 32, 16))
    x = next(iter(ds))["x1"][0]
    assert x.shape == (16, 32, 16)
    assert x[3:13, :, 2:14].min() == 1.0 and x.sum() == 10 * 32 * 12


def test_same_seed_same_stream_and_ranks_differ(small_nifti_dir, tmp_path):
    files = list_volumes([small_nifti_dir])
    cache = VolumeCache(tmp_path / "c")
    scan_volumes(files, CFG, cache, skip_bad=False)

    def first(n, **kw):
        it = iter(PairDataset.from_cache(files, CFG, cache, 16, **kw))
        return [next(it) for _ in range(n)]

    a, b = first(4, seed=7), first(4, seed=7)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["x1"], y["x1"]) and torch.equal(x["x2"], y["x2"])
    c = first(4, seed=8)
    d = first(4, seed=7, rank=1, world_size=2)
    assert not all(torch.equal(x["x1"], y["x1"]) for x, y in zip(a, c, strict=True))
    assert not all(torch.equal(x["x1"], y["x1"]) for x, y in zip(a, d, strict=True))


def test_ranks_shard_first_volume():
    vols = _labelled(3)
    for rank in range(3):
        it = iter(PairDataset(vols, 16, seed=0, rank=rank, world_size=3))
        pairs = [_ids(next(it)) for _ in range(12)]
        assert {a for a, _ in pairs} == {rank + 1}
        assert all(b != rank + 1 for _, b in pairs)
    # more ranks than volumes: every rank sees all volumes, with its own stream
    streams = [
        [_ids(p) for p, _ in zip(PairDataset(vols, 16, rank=r, world_size=4), range(20), strict=False)]
        for r in range(4)
    ]
    assert len({tuple(s) for s in streams}) == 4


def test_state_dict_resume_reproduces_stream():
    rng = np.random.default_rng(3)
    vols = [rng.random((40, 36, 20), dtype=np.float32) for _ in range(3)]
    ds = PairDataset(vols, 16, seed=1)
    it = iter(ds)
    for _ in range(3):
        next(it)
    state = ds.state_dict()
    expected = [next(it) for _ in range(5)]

    resumed = PairDataset(vols, 16, seed=1)
    resumed.load_state_dict(state)
    it2 = iter(resumed)
    for x, y in zip(expected, [next(it2) for _ in range(5)], strict=True):
        assert torch.equal(x["x1"], y["x1"]) and torch.equal(x["x2"], y["x2"])


@pytest.mark.parametrize("bad", [20, (16, 16), (16, 16, 0), (32, 24, 16)])
def test_patch_size_must_be_multiples_of_16(bad):
    with pytest.raises(ValueError, match="multiples of 16"):
        PairDataset(_labelled(2), bad)


def test_make_batch_stacks():
    batch = make_batch(iter(PairDataset(_labelled(2), 16)), 3)
    assert batch["x1"].shape == (3, 1, 16, 16, 16) and batch["x2"].shape == (3, 1, 16, 16, 16)


def test_empty_dataset_is_an_input_error():
    with pytest.raises(GvslInputError):
        PairDataset([], 16)


def test_source_path_objects(small_nifti_dir):
    assert all(isinstance(p, Path) for p in list_volumes([str(small_nifti_dir)]))
