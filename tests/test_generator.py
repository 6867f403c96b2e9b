"""The label-map generator: reproducible draws, labels that move with the image, the
requested intensity and resolution ranges, one-line bad input, and `gvsl train --synth`."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from gvsl.cli.main import app
from gvsl.generator import CT_HU, SynthGenerator, kmeans_labels, load_recipe, thick_slices
from gvsl.io import load_model
from gvsl.runtime.errors import GvslInputError
from gvsl.runtime.preprocess import PreprocessConfig
from gvsl.runtime.warp import warp_by_displacement
from gvsl.synth_source import SynthPairSource, check_ratio
from gvsl.train import TrainConfig, train

runner = CliRunner()
SHAPE = (32, 32, 32)
CLEAN = {"blur_mm": [0, 0], "ct_noise_hu": [0, 0], "mr_noise": [0, 0], "bias": 0.0, "p_thick": 0.0, "p_fov": 0.0,
         "p_flip": [0, 0, 0]}  # fmt: skip


def body_volume(tmp_path: Path, shift: float = 0.0) -> tuple[Path, Path]:
    """A CT-like phantom (air, a soft-tissue body, a fat layer, two lungs, a bone rod) in HU and
    a 3-label map of it (0 outside, 1 body, 2 lungs), on a 2 mm grid."""
    n = 48
    x, y, z = np.meshgrid(*[np.arange(n) - n / 2 + 0.5] * 3, indexing="ij")
    r = np.sqrt(x**2 + y**2)
    hu = np.full((n, n, n), -1000.0, np.float32)
    body = r < 20
    hu[body] = 40.0
    hu[body & (r > 17)] = -100.0  # subcutaneous fat
    lungs = ((x - 8 - shift) ** 2 + y**2 < 36) | ((x + 8) ** 2 + y**2 < 36)
    hu[lungs] = -850.0
    hu[(np.abs(x) < 2) & (np.abs(y + 12) < 2)] = 700.0  # a spine-like rod
    lab = np.zeros((n, n, n), np.int16)
    lab[body] = 1
    lab[lungs] = 2
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    aff[:3, 3] = -48
    img_path, lab_path = tmp_path / f"ct{shift}.nii.gz", tmp_path / f"ct{shift}_seg.nii.gz"
    nib.save(nib.Nifti1Image(hu, aff), img_path)
    nib.save(nib.Nifti1Image(lab, aff), lab_path)
    return img_path, lab_path


def write_recipe(path: Path, sources: list[dict], **sections) -> Path:
    recipe = {"format": "gvsl-synth-recipe", "spacing": 2.0, "shape": list(SHAPE), "sources": sources, **sections}
    path.write_text(json.dumps(recipe))
    return path


def chest_source(img: Path, lab: Path) -> dict:
    return {
        "name": "phantom",
        "kind": "label_map",
        "label_maps": [str(lab)],
        "images": [str(img)],
        "labels": {"0": "air", "1": "soft", "2": "lung"},
        "derive": [
            {"within": [1], "range": [-200, -30], "label": 3, "class": "fat"},
            {"within": [1], "range": [300, 3000], "label": 4, "class": "bone"},
        ],
    }


@pytest.fixture()
def phantom_recipe(tmp_path) -> Path:
    img, lab = body_volume(tmp_path)
    return write_recipe(tmp_path / "r.json", [chest_source(img, lab)])


def test_derived_labels_follow_the_hu_thresholds(phantom_recipe):
    gen = SynthGenerator(load_recipe(phantom_recipe))
    lm = gen.maps[0][0]
    hu = np.asarray(nib.load(str(phantom_recipe.parent / "ct0.0.nii.gz")).dataobj)
    # the phantom is already RAS+ at 2 mm, so the label map is on its grid voxel for voxel
    assert lm.labels.shape == hu.shape
    assert np.array_equal(lm.labels == 3, hu == -100.0) and np.array_equal(lm.labels == 4, hu == 700.0)
    assert lm.classes == {0: "air", 1: "soft", 2: "lung", 3: "fat", 4: "bone"}


def test_draws_are_reproducible_from_a_seed(phantom_recipe):
    gen = SynthGenerator(load_recipe(phantom_recipe))
    a1, b1 = gen.draw_pair(np.random.default_rng(5))
    a2, b2 = gen.draw_pair(np.random.default_rng(5))
    a3, _ = gen.draw_pair(np.random.default_rng(6))
    assert np.array_equal(a1.image, a2.image) and np.array_equal(b1.labels, b2.labels)
    assert a1.params == a2.params
    assert np.abs(a1.image - a3.image).mean() > 10.0  # another seed, another subject (HU)
    assert not np.array_equal(a1.labels, b1.labels)  # the pair: two different deformations


def test_a_voxels_label_determines_its_intensity_and_the_pair_shares_it(tmp_path, phantom_recipe):
    recipe = load_recipe(phantom_recipe)
    recipe["artefacts"] = CLEAN
    # a narrow requested range for soft tissue and MR means: the draws must honour them
    recipe["appearance"] = {"ct_std_hu": [0, 0], "mr_std": [0, 0], "gamma": [1, 1], "ct_hu": {"soft": [100, 110]},
                            "mr_mean": [0.4, 0.6]}  # fmt: skip
    gen = SynthGenerator(recipe)
    requested = {**CT_HU, "soft": (100.0, 110.0)}
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(8):
        a, b = gen.draw_pair(rng)
        for v in np.unique(a.labels):
            values = a.image[a.labels == v]
            assert np.ptp(values) < 1e-3 * max(1.0, abs(float(values[0])))  # one value per label
            other = b.image[b.labels == v]
            if other.size:
                assert np.allclose(other, values[0], rtol=1e-5, atol=1e-4)  # same appearance in the pair
            cls = gen.maps[0][0].classes[int(v)]
            seen.add(a.modality)
            if a.modality == "ct":  # the requested HU range of the label's tissue class
                lo, hi = requested[cls]
            else:  # air and lung are dark in MR; the other labels take the requested mean range
                lo, hi = (0.0, 0.05) if cls in ("air", "lung") else (0.4, 0.6)
            assert lo <= values[0] <= hi, (a.modality, cls, values[0])
    assert seen == {"ct", "mr"}  # p_ct 0.5: both appearances were checked


def test_a_cross_modal_pair_is_one_anatomy_in_mr_and_in_ct(phantom_recipe):
    """``draw_cross_modal_pair``: the first draw is MR-like, the second CT-like, each within
    its modality's requested ranges, both of the same label map (its labels, its flips)
    under different deformations; the plain pairs keep drawing exactly as before."""
    recipe = load_recipe(phantom_recipe)
    recipe["artefacts"] = {**CLEAN, "p_flip": [0.5, 0.5, 0.5]}
    recipe["appearance"] = {"ct_std_hu": [0, 0], "mr_std": [0, 0], "gamma": [1, 1], "mr_mean": [0.4, 0.6]}
    gen = SynthGenerator(recipe)
    flips_seen = set()
    for seed in range(6):
        mr, ct = gen.draw_cross_modal_pair(np.random.default_rng(seed))
        assert (mr.modality, ct.modality) == ("mr", "ct")
        assert mr.params["flips"] == ct.params["flips"]
        flips_seen.add(tuple(mr.params["flips"]))
        for draw in (mr, ct):  # the map's labels (a small one may leave the crop)
            labels = set(np.unique(draw.labels).tolist())
            assert {0, 1, 2, 3} <= labels <= {0, 1, 2, 3, 4}, labels
        assert not np.array_equal(mr.labels, ct.labels)  # two deformations
        assert 0.0 <= mr.image.min() and mr.image.max() <= 0.6 + 1e-5  # MR means as requested
        for v, cls in gen.maps[0][0].classes.items():  # CT values in their tissue's HU range
            values = ct.image[ct.labels == v]
            if values.size == 0:
                continue
            lo, hi = CT_HU[cls]
            assert lo - 1e-3 <= values.min() and values.max() <= hi + 1e-3, (cls, values.min(), values.max())
    assert len(flips_seen) > 1  # flips are drawn, and shared
    a1, b1 = gen.draw_pair(np.random.default_rng(3))
    assert a1.modality == b1.modality


def test_labels_move_with_the_image(tmp_path):
    """With noise and blur on, voxels classified by the nearest label mean agree with the
    *warped* label map (Dice > 0.9) far better than with the label map left unwarped."""
    img, lab = body_volume(tmp_path)
    recipe = load_recipe(
        write_recipe(
            tmp_path / "r.json",
            [chest_source(img, lab)],
            appearance={"p_ct": 0.0, "mr_std": [0.01, 0.01], "mr_mean": [0, 1], "gamma": [1, 1]},
            artefacts={**CLEAN, "blur_mm": [0.5, 0.5], "mr_noise": [0.005, 0.005]},
            deformation={"rotation_deg": 15, "translation_mm": 8, "elastic_mm": 6},
        )
    )
    gen = SynthGenerator(recipe)
    lm = gen.maps[0][0]
    rng = np.random.default_rng(1)
    a, _ = gen.draw_pair(rng)
    present = np.unique(a.labels)
    means = np.array([a.image[a.labels == v].mean() for v in present])
    nearest = present[np.argmin(np.abs(a.image[..., None] - means), axis=-1)]
    unwarped = warp_by_displacement(lm.labels, lm.affine, a.affine, None, order=0, dst_shape=SHAPE)

    def dice(x, y):
        return np.mean([2 * np.sum((x == v) & (y == v)) / (np.sum(x == v) + np.sum(y == v)) for v in present])

    assert dice(nearest, a.labels) > 0.9
    assert dice(nearest, a.labels) > dice(nearest, unwarped) + 0.1


def test_thick_slices_remove_detail_finer_than_the_slice(tmp_path):
    """White noise through 8 mm slices on a 2 mm grid keeps < 5 % of its power above the
    slices' Nyquist frequency along that axis, and every other axis keeps its detail."""
    noise = np.random.default_rng(0).standard_normal((64, 64, 64)).astype(np.float32)
    out = thick_slices(noise, axis=1, thickness_mm=8.0, spacing_mm=2.0)

    def high_share(a, axis):
        power = np.abs(np.fft.rfft(a, axis=axis)) ** 2
        freqs = np.fft.rfftfreq(a.shape[axis], d=2.0)  # cycles / mm
        sel = [slice(None)] * 3
        sel[axis] = freqs > 1 / 16.0
        return power[tuple(sel)].sum() / power.sum()

    assert high_share(out, 1) < 0.05
    assert high_share(out, 0) > 0.6 and high_share(out, 2) > 0.6


def test_draws_honour_the_requested_slice_range(phantom_recipe):
    recipe = load_recipe(phantom_recipe)
    recipe["artefacts"] = {**CLEAN, "p_thick": 1.0, "slice_mm": [6, 9]}
    gen = SynthGenerator(recipe)
    rng = np.random.default_rng(2)
    got = [gen.draw(rng).params for _ in range(8)]
    assert all(6 <= p["slice_mm"] <= 9 and p["slice_axis"] in (0, 1, 2) for p in got)
    assert len({p["slice_axis"] for p in got}) >= 2


def test_kmeans_labels_split_a_real_brain_by_intensity(mni_small_arrays):
    t1 = mni_small_arrays["t1"].astype(np.float32)
    labels = kmeans_labels(t1, 3, np.random.default_rng(0))
    means = [float(t1[labels == k].mean()) for k in range(1, 4)]
    assert means == sorted(means) and means[0] < 0.8 * means[2]
    assert set(np.unique(labels)) == {0, 1, 2, 3}


def test_mni_brain_source_has_csf_skull_and_scalp():
    recipe = {"format": "gvsl-synth-recipe", "sources": [{"name": "mni", "kind": "mni", "template": "sample"}]}
    lm = SynthGenerator(recipe, spacing=4.0).maps[0][0]
    counts = np.bincount(lm.labels.ravel(), minlength=6)
    assert all(counts[k] > 100 for k in range(6)), counts  # air, CSF, GM, WM, skull, scalp all present
    assert counts[3] > counts[1]  # more white matter than CSF


# ----------------------------------------------------------------------------- bad input
def test_label_map_on_another_grid_than_its_image(tmp_path):
    img, _ = body_volume(tmp_path)
    lab = tmp_path / "small_seg.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((24, 24, 24), np.int16), np.diag([4.0, 4, 4, 1])), lab)
    r = write_recipe(tmp_path / "r.json", [chest_source(img, lab)])
    with pytest.raises(GvslInputError, match="does not match its image") as e:
        SynthGenerator(load_recipe(r))
    assert str(lab) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s["labels"].update({"9": "bone"}), r"names labels \[9\], which none"),
        (lambda s: s["labels"].update({"1": "brain"}), "unknown tissue classes"),
        (lambda s: s["labels"].pop("2"), "label 2 has no tissue class"),
        (lambda s: s.update(label_maps=["missing_seg.nii.gz"]), "does not exist"),
        (lambda s: s.update(kind="atlas"), "kind must be one of"),
    ],
)
def test_bad_recipes_get_one_line(tmp_path, change, message):
    img, lab = body_volume(tmp_path)
    src = chest_source(img, lab)
    change(src)
    r = write_recipe(tmp_path / "r.json", [src])
    with pytest.raises(GvslInputError, match=message) as e:
        SynthGenerator(load_recipe(r))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("ratio", [-0.1, 1.5, float("nan")])
def test_ratio_outside_0_1_is_refused(ratio, tmp_path, phantom_recipe):
    with pytest.raises(GvslInputError, match=r"must be in \[0, 1\]"):
        check_ratio(ratio)
    res = runner.invoke(app, ["train", "-o", str(tmp_path / "run"), "--synth", str(phantom_recipe),
                              "--synth-ratio", str(ratio)])  # fmt: skip
    assert res.exit_code == 2 and "must be in [0, 1]" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "run").exists()


def test_mixing_needs_real_data_below_ratio_one(tmp_path, phantom_recipe):
    res = runner.invoke(app, ["train", "-o", str(tmp_path / "run"), "--synth", str(phantom_recipe),
                              "--synth-ratio", "0.5"])  # fmt: skip
    assert res.exit_code == 2 and "pass DATA or --synth-ratio 1" in res.output
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- training
def test_ranks_draw_different_pairs_and_the_ratio_is_honoured(phantom_recipe, tmp_path):
    gen = SynthGenerator(load_recipe(phantom_recipe))
    pre = PreprocessConfig(spacing=(2.0,) * 3, modality="ct")
    r0 = SynthPairSource(gen, 1.0, None, pre, (16, 16, 16), seed=0, rank=0).sample()
    r1 = SynthPairSource(gen, 1.0, None, pre, (16, 16, 16), seed=0, rank=1).sample()
    assert not torch.equal(r0["x1"], r1["x1"])
    assert 0.0 <= float(r0["x1"].min()) and float(r0["x1"].max()) <= 1.0  # normalised like real inputs

    class Real:
        def sample(self):
            return {"x1": torch.zeros(1, 16, 16, 16), "x2": torch.zeros(1, 16, 16, 16)}

    mixed = SynthPairSource(gen, 0.25, Real(), pre, (16, 16, 16), seed=3)  # type: ignore[arg-type]
    for _ in range(80):
        mixed.sample()
    share = mixed.drawn["synthetic"] / 80
    assert 0.1 < share < 0.42, share  # binomial(80, 0.25): 0.1..0.42 is beyond 3 sigma


def tiny_cfg(data: list[str], out: Path, recipe: dict, **kw) -> TrainConfig:
    base = dict(
        data=data,
        out=str(out),
        iterations=4,
        patch_size=(16, 16, 16),
        widths=[8, 16, 16, 32, 32, 32, 16, 16, 8],
        affine_width=32,
        deform_width=8,
        restore_width=8,
        preprocess={"spacing": [4.0, 4.0, 4.0], "modality": "ct"},
        device="cpu",
        log_every=1,
        synth=recipe,
        synth_ratio=0.5,
        checkpoint_every=100,
    )
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.slow
def test_train_from_a_recipe_mixed_with_real_volumes_resumes_exactly(tmp_path):
    img, lab = body_volume(tmp_path)
    img2, _ = body_volume(tmp_path, shift=2.0)
    recipe = load_recipe(write_recipe(tmp_path / "r.json", [chest_source(img, lab), {"name": "s", "kind": "shapes"}]))
    data = [str(img), str(img2)]
    full = train(tiny_cfg(data, tmp_path / "full", recipe, iterations=6), log=lambda s: None)
    train(tiny_cfg(data, tmp_path / "half", recipe, iterations=3), log=lambda s: None)
    resumed = train(tiny_cfg(data, tmp_path / "half", recipe, iterations=6), resume=True, log=lambda s: None)
    assert full.step == resumed.step == 6
    a, meta = load_model(full.model_dir)
    b, _ = load_model(resumed.model_dir)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.allclose(pa, pb, atol=1e-6, rtol=1e-5), name
    assert (tmp_path / "full" / "metrics.csv").read_text().splitlines()[1:] and meta["train"]["synth_ratio"] == 0.5
    assert meta["train"]["synth"]["sources"][0]["name"] == "phantom"
    # a different seed draws other pairs, hence other weights: the stream is not ignored
    other = train(tiny_cfg(data, tmp_path / "other", recipe, iterations=6, seed=1), log=lambda s: None)
    c, _ = load_model(other.model_dir)
    assert not torch.allclose(next(iter(a.state_dict().values())), next(iter(c.state_dict().values())))


def test_cli_trains_from_a_shipped_recipe_without_real_data(tmp_path):
    res = runner.invoke(
        app,
        [
            "train",
            "-o",
            str(tmp_path / "run"),
            "--synth",
            "default",
            "--iterations",
            "2",
            "--widths",
            "tiny",
            "--patch-size",
            "16",
            "--spacing",
            "4",
            "--device",
            "cpu",
            "--quiet",
        ],  # fmt: skip
    )
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["synth_ratio"] == 1.0 and cfg["data"] == []
    assert [s["kind"] for s in cfg["synth"]["sources"]] == ["mni", "clusters", "shapes"]
    assert len((tmp_path / "run" / "metrics.csv").read_text().splitlines()) == 3


def test_synth_command_writes_reproducible_pairs_with_their_labels(tmp_path, phantom_recipe):
    args = [
        "synth",
        "--recipe",
        str(phantom_recipe),
        "--n",
        "2",
        "--shape",
        "24",
        "--pairs",
        "--seed",
        "3",
        "--prefix",
        "synth",
    ]
    for run in ("a", "b"):
        res = runner.invoke(app, [*args, "-o", str(tmp_path / run)])
        assert res.exit_code == 0, res.output
    meta = json.loads((tmp_path / "a" / "synth_synth.json").read_text())
    assert [Path(r["image"]).name for r in meta["subjects"]][:2] == ["synth_000_a.nii.gz", "synth_000_b.nii.gz"]
    for name in ("synth_000_a", "synth_001_b"):
        img_a, img_b = (nib.load(tmp_path / run / f"{name}.nii.gz") for run in ("a", "b"))
        lab = nib.load(tmp_path / "a" / f"{name}_labels.nii.gz")
        assert np.array_equal(np.asarray(img_a.dataobj), np.asarray(img_b.dataobj))  # same seed, same draw
        assert img_a.shape == lab.shape == (24, 24, 24) and np.allclose(img_a.affine, lab.affine)
        assert np.allclose(np.abs(np.diag(img_a.affine)[:3]), 2.0)
    # the pair: one appearance, two deformations
    a, b = (np.asarray(nib.load(tmp_path / "a" / f"synth_000_{s}_labels.nii.gz").dataobj) for s in "ab")
    assert not np.array_equal(a, b)
    assert meta["subjects"][0]["params"]["modality"] == meta["subjects"][1]["params"]["modality"]


def test_synth_command_bad_recipe_is_one_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "gvsl-synth-recipe", "sources": [{"kind": "shapes", "colour": "red"}]}))
    res = runner.invoke(app, ["synth", "--recipe", str(bad), "-o", str(tmp_path / "out")])
    assert res.exit_code == 2 and "unknown keys ['colour']" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "out").exists()


def test_a_folder_of_binary_masks_is_one_label_map(tmp_path):
    """TotalSegmentator-style output (one binary NIfTI per structure) becomes one label map
    whose labels carry the classes named by file stem; the draws paint them as such."""
    img, lab = body_volume(tmp_path)
    seg = np.asarray(nib.load(lab).dataobj)
    hu = np.asarray(nib.load(img).dataobj)
    aff = nib.load(lab).affine
    folder = tmp_path / "subject1" / "segmentations"
    folder.mkdir(parents=True)
    for name, mask in (("lung_left", seg == 2), ("body", seg == 1), ("spine", hu == 700.0)):
        nib.save(nib.Nifti1Image(mask.astype(np.uint8), aff), folder / f"{name}.nii.gz")
    src = {"name": "ts", "kind": "masks", "folders": ["subject1/segmentations"],
           "labels": {"lung_left": "lung", "body": "soft", "spine": "bone"}}  # fmt: skip
    recipe = load_recipe(write_recipe(tmp_path / "r.json", [src]))
    lm = SynthGenerator(recipe).maps[0][0]
    # sorted stems: body 1, lung_left 2, spine 3 (later files win where masks overlap)
    assert lm.classes == {0: "air", 1: "soft", 2: "lung", 3: "bone"}
    assert np.array_equal(lm.labels == 2, seg == 2) and np.array_equal(lm.labels == 3, hu == 700.0)
    src["labels"]["liver"] = "soft"
    with pytest.raises(GvslInputError, match=r"names labels \['liver'\], which none of its mask folders"):
        SynthGenerator(load_recipe(write_recipe(tmp_path / "r2.json", [src])))
    src["labels"].pop("liver")
    src["labels"].pop("spine")
    with pytest.raises(GvslInputError, match="mask 'spine' has no tissue class"):
        SynthGenerator(load_recipe(write_recipe(tmp_path / "r3.json", [src])))


@pytest.mark.slow
def test_training_on_generator_pairs_lowers_the_loss(tmp_path):
    """30 steps on synthetic pairs only: the loss on a fixed batch of held-back synthetic
    pairs (another seed) falls by a fifth."""
    from gvsl.losses import GVSLLoss
    from gvsl.model import GVSL

    img, lab = body_volume(tmp_path)
    recipe = load_recipe(write_recipe(tmp_path / "r.json", [chest_source(img, lab)]))
    cfg = tiny_cfg([], tmp_path / "run", recipe, iterations=30, lr=2e-3, synth_ratio=1.0, patch_size=(32, 32, 32))
    pre = PreprocessConfig.from_dict(cfg.preprocess)
    held = SynthPairSource.from_recipe(recipe, 1.0, None, pre, (32, 32, 32), seed=99)
    items = [held.sample() for _ in range(2)]
    x1, x2 = torch.stack([i["x1"] for i in items]), torch.stack([i["x2"] for i in items])

    def loss(model) -> float:
        model.eval()
        with torch.no_grad():
            o = model(x1, x2)
            return GVSLLoss()(x1, o.warped, o.restored, o.local_dvf).total.item()

    torch.manual_seed(cfg.seed)
    before = loss(GVSL(cfg.model_config()))
    result = train(cfg, log=lambda s: None)
    after = loss(load_model(result.model_dir)[0])
    assert after < 0.8 * before, (before, after)
