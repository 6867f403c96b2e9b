"""Outputs are published with the user's umask (0o666 & ~umask), like any file a
program opens for writing, although every one of them is written through a
temporary file (which ``tempfile`` creates owner-only) and renamed into place."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from gvsl.cli.main import app
from gvsl.config import ModelConfig
from gvsl.export import ExportOptions, run_export
from gvsl.export.onnx_export import export_graph
from gvsl.io import save_model
from gvsl.model import GVSL
from gvsl.runtime import artifact
from gvsl.runtime.atomic import atomic_write, current_umask, published_mode
from gvsl.runtime.io import save_npy
from gvsl.runtime.preprocess import PreprocessConfig, save_nifti
from gvsl.train import TrainConfig, train

UMASKS = {"umask022": (0o022, 0o644, 0o755), "umask077": (0o077, 0o600, 0o700)}


@pytest.fixture(params=list(UMASKS.values()), ids=list(UMASKS))
def umask(request):
    """Run the test under each umask; yields (umask, expected file mode, expected folder mode)."""
    old = os.umask(request.param[0])
    yield request.param
    os.umask(old)


@pytest.fixture
def umask022():
    """The common umask, where a temporary file's owner-only mode differs from the right one
    (the slower tests run under this one only)."""
    old = os.umask(0o022)
    yield UMASKS["umask022"]
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_umask_is_read_without_changing_it(umask):
    mask, file_mode, dir_mode = umask
    assert current_umask() == mask and current_umask() == mask
    assert published_mode() == file_mode and published_mode(directory=True) == dir_mode


def test_volumes_arrays_and_tables_get_the_umask_mode(umask, tmp_path):
    _, file_mode, _ = umask
    nifti = save_nifti(tmp_path / "warped.nii.gz", np.ones((4, 4, 4), np.float32), np.eye(4))
    array = save_npy(tmp_path / "embedding.npy", np.arange(8, dtype=np.float32))
    table = tmp_path / "shard" / "scan.npy"
    save_npy(table, np.arange(4, dtype=np.float32))
    merged = tmp_path / "all.csv"
    r = CliRunner().invoke(app, ["embed", str(tmp_path / "shard"), "--merge", "-o", str(merged), "--quiet"])
    assert r.exit_code == 0, r.output
    assert merged.read_text().splitlines()[1].startswith("scan,0,1,2,3")
    for path in (nifti, array, table, merged):
        assert mode(path) == file_mode, (path.name, oct(mode(path)))
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_a_failed_write_leaves_nothing(umask, tmp_path):
    def broken(tmp: str) -> None:
        Path(tmp).write_bytes(b"half")
        raise OSError("disk full")

    (tmp_path / "keep.json").write_text("old")
    with pytest.raises(OSError, match="disk full"):
        atomic_write(tmp_path / "keep.json", broken)
    assert (tmp_path / "keep.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.json"]


def test_checkpoint_model_and_run_files_get_the_umask_mode(umask022, tmp_path):
    _, file_mode, _ = umask022
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for k in range(2):
        nib.save(nib.Nifti1Image(rng.random((16, 16, 16), dtype=np.float32), np.eye(4)), data / f"s{k}.nii.gz")
    cfg = TrainConfig(
        data=[str(data)], out=str(tmp_path / "run"), iterations=1, patch_size=(16, 16, 16),
        widths=list(ModelConfig.from_preset("tiny").widths), affine_width=32, deform_width=8, restore_width=8,
        preprocess={"spacing": None, "modality": "mr"}, device="cpu",
    )  # fmt: skip
    train(cfg, log=lambda s: None)
    run = tmp_path / "run"
    written = [run / "checkpoints" / "last.pt", run / "model" / "model.safetensors", run / "model" / "model.json",
               run / "config.json", next((run / "cache").glob("*.npy"))]  # fmt: skip
    for path in written:
        assert mode(path) == file_mode, (path.name, oct(mode(path)))
    assert torch.load(written[0], weights_only=True)["step"] == 1


def test_export_folder_and_onnx_files_get_the_umask_mode(umask022, tmp_path):
    _, file_mode, dir_mode = umask022
    torch.manual_seed(0)
    model_dir = save_model(
        GVSL(ModelConfig.from_preset("tiny")),
        tmp_path / "model",
        preprocess=PreprocessConfig(spacing=None, modality="mr").to_dict(),
        extra={"patch_size": [16, 16, 16]},
    )
    out = tmp_path / "export"
    run_export(model_dir, out, ExportOptions(verify=False, simplify=False))
    assert mode(out) == dir_mode
    files = sorted(p.name for p in out.iterdir())
    assert files == [
        "encoder.onnx", "manifest.json", "refine.onnx", "refine_affine.onnx", "refine_mi.onnx", "registration.onnx"
    ]  # fmt: skip
    for name in files:
        assert mode(out / name) == file_mode, (name, oct(mode(out / name)))
    # one graph written on its own (not through the export folder, whose tree is chmod-ed when published)
    direct = export_graph(
        GVSL(ModelConfig.from_preset("tiny")), artifact.ENCODER, tmp_path / "alone" / "encoder.onnx", metadata={},
        simplify=False, example_shape=(1, 1, 16, 16, 16),
    )  # fmt: skip
    assert mode(direct) == file_mode and sorted(p.name for p in direct.parent.iterdir()) == ["encoder.onnx"]
