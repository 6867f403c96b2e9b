"""Embedding statistics: gathered, stored in model.json, carried to ONNX metadata and the
manifest, applied identically by torch, ONNX Runtime and `gvsl serve`; the raw embedding kept,
and the fallback for models without statistics.

Tiny random GVSLs and the MNI template at 4 mm (conftest) keep everything on CPU in seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from test_runtime import _aff, tiny_artifacts
from typer.testing import CliRunner

from gvsl.cli.main import app
from gvsl.embedding_stats import STATS_KEY, gather_embedding_stats, write_embedding_stats
from gvsl.export.errors import ExportError
from gvsl.runtime import artifact
from gvsl.runtime.backends import Backend, ModelInfo
from gvsl.runtime.embed import Embedder, EmbeddingStats
from gvsl.runtime.errors import GvslInputError
from gvsl.runtime.preprocess import PreprocessConfig

runner = CliRunner()


def _views(arrays: dict[str, np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Five volumes of different content (T1, GM and WM maps, smooth noise, a crop) to gather
    statistics over: spread like a training set, so the statistics' std is not tiny."""
    from scipy import ndimage

    rng = np.random.default_rng(3)
    t1 = arrays["t1"].astype(np.float32)
    noise = ndimage.gaussian_filter(rng.standard_normal(t1.shape).astype(np.float32), 2.0) + 3.0
    return [
        (t1, _aff()),
        (arrays["gm"].astype(np.float32), _aff()),
        (arrays["wm"][::-1].astype(np.float32), _aff()),
        (noise, _aff()),
        (np.ascontiguousarray(t1[4:, :40]), _aff()),
    ]


@pytest.fixture(scope="module")
def t1(mni_small_arrays) -> np.ndarray:
    return mni_small_arrays["t1"].astype(np.float32)  # 40 x 48 x 40 at 4 mm


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """The shared tiny model without statistics (model folder, export folder)."""
    return tiny_artifacts(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def with_stats(tiny, mni_small_arrays, tmp_path_factory) -> tuple[Path, Path, EmbeddingStats]:
    """A copy of the tiny model with statistics gathered over :func:`_views`, and its export."""
    from gvsl.export.pipeline import ExportOptions, run_export

    base = tmp_path_factory.mktemp("stats")
    model_dir = base / "model"
    shutil.copytree(tiny[0], model_dir)
    stats = gather_embedding_stats(model_dir, _views(mni_small_arrays), device="cpu")
    write_embedding_stats(model_dir, stats)
    run_export(model_dir, base / "export", ExportOptions(verify=False))
    return model_dir, base / "export", stats


# ----------------------------------------------------------------------------- numbers
class _ConstantEncoder(Backend):
    """An encoder that returns the same embedding for every window (known numbers)."""

    name = "constant"

    def __init__(self, vector: np.ndarray, stats: dict | None) -> None:
        self.vector = np.asarray(vector, np.float32)
        self.info = ModelInfo(
            kind=artifact.ENCODER,
            path="constant.onnx",
            model={"widths": [4, 4, 4, 4, len(vector), 4, 4, 4, 4]},
            preprocess=PreprocessConfig(spacing=None, modality="none", canonical=False),
            patch_size=(16, 16, 16),
            extra={"embedding_stats": stats} if stats is not None else {},
        )

    @property
    def output_names(self) -> tuple[str, ...]:
        return ("embedding",)

    def run(self, inputs, outputs=None):
        return {"embedding": np.repeat(self.vector[None], inputs["image"].shape[0], axis=0)}


def test_standardisation_gives_the_known_numbers():
    stats = EmbeddingStats(mean=np.array([1.0, 2.0, -1.0]), std=np.array([2.0, 4.0, 0.5]))
    np.testing.assert_array_equal(stats.standardise(np.array([3.0, 0.0, -1.0])), [1.0, -0.5, 0.0])
    # through the Embedder: 27 windows (overlap 0.5) of a 32^3 volume, each [3, 0, -2]: mean [3, 0, -2] -> [1, -0.5, -2]
    block = json.dumps({"mean": [1.0, 2.0, -1.0], "std": [2.0, 4.0, 0.5], "n": 7, "source": "test"})
    emb = Embedder(_ConstantEncoder(np.array([3.0, 0.0, -2.0]), block), modality=None)
    res = emb.embed((np.zeros((32, 32, 32), np.float32), np.eye(4)))
    assert res.windows == 27 and res.standardised
    np.testing.assert_allclose(res.embedding, [1.0, -0.5, -2.0], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(res.embedding_raw, [3.0, 0.0, -2.0])
    raw = Embedder(_ConstantEncoder(np.array([3.0, 0.0, -2.0]), block), modality=None, embedding="raw").embed(
        (np.zeros((32, 32, 32), np.float32), np.eye(4))
    )
    assert not raw.standardised
    np.testing.assert_array_equal(raw.embedding, [3.0, 0.0, -2.0])


@pytest.mark.parametrize(
    "block, why",
    [
        ({"mean": [0.0, 0.0, 0.0], "std": [1.0, 0.0, 1.0]}, "std > 0"),
        ({"mean": [0.0, 0.0], "std": [1.0, 1.0]}, "2 channels but the model's embedding has 3"),
        ({"std": [1.0, 1.0, 1.0]}, "'mean'"),
        ("{not json", "Expecting property name"),
    ],
)
def test_damaged_statistics_are_one_line_naming_the_file(block, why):
    with pytest.raises(GvslInputError) as e:
        Embedder(_ConstantEncoder(np.zeros(3), block))
    msg = str(e.value)
    assert msg.startswith("constant.onnx: embedding statistics are damaged") and why in msg
    assert "gvsl embed-stats" in msg and "\n" not in msg


# ----------------------------------------------------------------------------- round trip, parity
def test_statistics_round_trip_and_torch_onnx_parity(with_stats, t1, mni_small_arrays):
    model_dir, export_dir, stats = with_stats
    # the gathered statistics are those of the raw embeddings of the same volumes
    raw_torch = Embedder(model_dir, "torch", "cpu", embedding="raw")
    table = np.stack([raw_torch.embed(v).embedding for v in _views(mni_small_arrays)]).astype(np.float64)
    np.testing.assert_allclose(stats.mean, table.mean(axis=0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(stats.std, np.maximum(table.std(axis=0), 1e-3 * table.std(axis=0).max()), rtol=1e-5)
    assert stats.n == 5
    # model.json == safetensors header copy == ONNX metadata == manifest
    block = json.loads((model_dir / "model.json").read_text())[STATS_KEY]
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["gvsl"])[STATS_KEY] == block
    from gvsl.export.onnx_export import read_metadata

    assert json.loads(read_metadata(export_dir / "encoder.onnx")[artifact.META_EMBEDDING_STATS]) == block
    assert json.loads((export_dir / "manifest.json").read_text())["embedding_stats"] == block
    # every backend standardises with the same numbers; a volume larger than the patch (windows)
    onnx, torch_ = Embedder(export_dir, "onnxruntime", "cpu"), Embedder(model_dir, "torch", "cpu")
    np.testing.assert_array_equal(onnx.stats.mean, torch_.stats.mean)
    np.testing.assert_array_equal(onnx.stats.std, torch_.stats.std)
    big = np.pad(t1[:, :40], ((0, 8), (0, 0), (0, 0)), mode="reflect")  # 48 x 40 x 40: 8 windows of 32^3
    a, b = onnx.embed((big, _aff())), torch_.embed((big, _aff()))
    assert a.windows == b.windows == 8 and a.standardised and b.standardised
    # the raw vectors agree to float32 rounding (a few 1e-6 here); standardising divides that by the
    # std, which for this random tiny model is as small as 0.005, so the standardised vectors (values
    # up to ~10) agree to 1e-3 -- still far inside what a missing or different standardisation gives
    np.testing.assert_allclose(a.embedding_raw, b.embedding_raw, rtol=0, atol=2e-5)
    np.testing.assert_allclose(a.embedding, b.embedding, rtol=0, atol=1e-3)
    np.testing.assert_allclose(a.embedding, (a.embedding_raw - np.asarray(block["mean"])) / block["std"], atol=1e-5)
    # standardising changes the vector: it is centred on the gathered data, the raw one is not
    assert np.abs(a.embedding - a.embedding_raw).max() > 0.1


def test_model_without_statistics_warns_once_and_returns_raw(tiny, t1):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        emb = Embedder(tiny[1], "onnxruntime", "cpu")
        first, second = emb.embed((t1, _aff())), emb.embed((t1[::-1].copy(), _aff()))
    assert len(caught) == 1
    msg = str(caught[0].message)
    assert msg.startswith(f"{tiny[1] / 'encoder.onnx'}: the model has no embedding statistics") and "\n" not in msg
    assert "gvsl embed-stats" in msg and "gvsl export" in msg
    for res in (first, second):
        assert not res.standardised
        np.testing.assert_array_equal(res.embedding, res.embedding_raw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Embedder(tiny[1], "onnxruntime", "cpu", embedding="raw")
    assert caught == []  # asking for raw is not a fallback


def test_export_refuses_damaged_statistics(tiny, tmp_path):
    from gvsl.export.source import load_source

    model_dir = tmp_path / "model"
    shutil.copytree(tiny[0], model_dir)
    meta = json.loads((model_dir / "model.json").read_text())
    meta[STATS_KEY] = {"mean": [0.0] * 3, "std": [1.0] * 3}
    (model_dir / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ExportError, match="embedding statistics are damaged .*3 channels but the model's"):
        load_source(model_dir)


# ----------------------------------------------------------------------------- CLI
def test_cli_embed_stats_then_embed_standardised_and_raw(tiny, small_nifti_dir, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny[0], model_dir)
    res = runner.invoke(app, ["embed-stats", str(model_dir), str(small_nifti_dir), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    block = json.loads((model_dir / "model.json").read_text())[STATS_KEY]
    assert block["n"] == 3 and block["source"] == "3 volumes"
    out = tmp_path / "out"
    common = ["embed", str(small_nifti_dir / "t1.nii.gz"), "-m", str(model_dir), "--backend", "torch", "-q"]
    assert runner.invoke(app, [*common, "-o", str(out), "--format", "npz"]).exit_code == 0
    with np.load(out / "t1.npz") as z:
        std, raw = z["embedding"], z["embedding_raw"]
    np.testing.assert_allclose(std, (raw - np.asarray(block["mean"])) / block["std"], atol=1e-5)
    assert runner.invoke(app, [*common, "-o", str(tmp_path / "raw"), "--raw-embedding"]).exit_code == 0
    np.testing.assert_array_equal(np.load(tmp_path / "raw" / "t1.npy"), raw)
    # no statistics: one warning line, the raw embedding written
    res = runner.invoke(app, ["embed", str(small_nifti_dir), "-m", str(tiny[1]), "-o", str(tmp_path / "old"), "-q"])
    assert res.exit_code == 0 and res.output.count("warning:") == 1 and "gvsl embed-stats" in res.output
    # bad input: one line, exit 2, nothing written
    empty = tmp_path / "empty"
    empty.mkdir()
    res = runner.invoke(app, ["embed-stats", str(empty), str(small_nifti_dir)])
    assert res.exit_code == 2 and "not a gvsl model folder" in res.output and "Traceback" not in res.output
    assert not (empty / "model.json").exists()


# ----------------------------------------------------------------------------- serve
def test_serve_embed_handler_sends_standardised_and_raw(with_stats, t1):
    from test_serve import _Req

    from gvsl.runtime.serve import ERROR_OUTPUT, EmbedHandler, ServeOptions

    _, export_dir, _ = with_stats
    embedder = Embedder(export_dir, "onnxruntime", "cpu")
    handler = EmbedHandler(embedder, ServeOptions(model=export_dir))
    out = handler([_Req({"image": t1[None], "affine": _aff()[None]}, ["embedding", "embedding_raw", ERROR_OUTPUT])])
    ref = embedder.embed((t1, _aff()))
    np.testing.assert_array_equal(out[0]["embedding"][0], ref.embedding)
    np.testing.assert_array_equal(out[0]["embedding_raw"][0], ref.embedding_raw)


def test_served_embedding_is_the_in_process_standardised_one(with_stats, t1, tmp_path):
    """Through a real `gvsl serve` (Triton); skips without the serve venv (build/serve-venv)."""
    import subprocess
    import sys

    from test_serve import Server, _serve_python

    from gvsl.runtime.client import GvslClient
    from gvsl.runtime.serve import EMBED_MODEL, free_ports, wait_ready

    python = _serve_python()
    if python is None or not Path(python).is_file():
        pytest.skip("no serve interpreter: python3.11 -m venv build/serve-venv && pip install -e '.[cpu,serve]'")
    _, export_dir, _ = with_stats
    path = tmp_path / "t1.nii.gz"
    nib.save(nib.Nifti1Image(t1, _aff()), path)
    http, grpc, metrics = free_ports(3)
    cmd = [
        sys.executable, "-m", "gvsl.cli.main", "serve", "--model", str(export_dir), "--python", python,
        "--models", "embed", "--host", "127.0.0.1", "--http-port", str(http), "--grpc-port", str(grpc),
        "--metrics-port", str(metrics), "--instances", "1", "--exit-timeout", "5", "--device", "cpu",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "_GVSL_SERVE_CHILD"}
    with open(tmp_path / "serve.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    srv = Server(proc, http, grpc, metrics, tmp_path / "serve.log")
    try:
        wait_ready(f"127.0.0.1:{http}", models=(EMBED_MODEL,), timeout=120, alive=lambda: proc.poll() is None)
        served = GvslClient(srv.url).embed(path)
        served_raw = GvslClient(srv.url, embedding="raw").embed(path)
    finally:
        srv.stop()
    ref = Embedder(export_dir, "onnxruntime", "cpu").embed(path)
    torch_ref = Embedder(with_stats[0], "torch", "cpu").embed(path)
    assert served.standardised and not served_raw.standardised
    np.testing.assert_allclose(served.embedding, ref.embedding, rtol=0, atol=1e-5)
    np.testing.assert_allclose(served.embedding, torch_ref.embedding, rtol=0, atol=1e-3)  # as in the parity test
    np.testing.assert_allclose(served_raw.embedding, ref.embedding_raw, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- the shipped model
@pytest.mark.slow
def test_shipped_model_separates_two_subjects_more_than_two_perturbations_of_one(tmp_path):
    """The default model, standardised with its own statistics (or, while it has none, with
    statistics of 8 draws of the shipped recipe): the bundled MNI T1 under a gain/offset and
    under noise is far closer to itself than to a subject drawn from the shipped recipe.
    Measured (EVALUATION.md, "Embeddings"): same ~0.98-1.00, different <= 0.57 over 3 seeds."""
    from gvsl.generator import SynthGenerator, load_recipe, recipe_path
    from gvsl.runtime.default_model import default_model_dir, sample_volume
    from gvsl.runtime.embed import embedding_stats_of
    from gvsl.runtime.io import read_volume

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the shipped model may predate statistics
        raw = Embedder(default_model_dir() / "encoder.onnx", "onnxruntime", "cpu", embedding="raw", modality="mr")
    stats = embedding_stats_of(raw.info) or gather_embedding_stats(raw, synth="default_v2", n=8, seed=0)
    vol = read_volume(sample_volume())
    rng = np.random.default_rng(0)
    data = vol.data.astype(np.float32)
    spread = float(np.percentile(data, 99) - np.percentile(data, 1))
    gained = (data * np.float32(1.3) + np.float32(0.02 * spread), vol.affine)
    noisy = (data + np.float32(0.03 * spread) * rng.standard_normal(data.shape, dtype=np.float32), vol.affine)
    # the shipped recipe's sources that need no real volumes (a user's clone has no ../shared)
    recipe = json.loads(recipe_path("default_v2").read_text())
    recipe["sources"] = [source for source in recipe["sources"] if source["kind"] in ("mni", "shapes")]
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    draw = SynthGenerator(load_recipe(tmp_path / "recipe.json"), spacing=4.0).draw(np.random.default_rng(1000), (64, 80, 64))
    other = Embedder(raw.backend, embedding="raw", modality=draw.modality).embed((draw.image, draw.affine))
    a, b, c = (stats.standardise(e) for e in (raw.embed(gained).embedding_raw, raw.embed(noisy).embedding_raw,
                                               other.embedding_raw))  # fmt: skip

    def cos(x, y):
        return float(x @ y / np.linalg.norm(x) / np.linalg.norm(y))

    assert cos(a, b) - max(cos(a, c), cos(b, c)) > 0.3


def test_tensorrt_engines_read_the_statistics_from_the_manifest(with_stats):
    """Engines carry no gvsl metadata: their ModelInfo comes from manifest.json, statistics included."""
    from gvsl.runtime.backends.model_files import info_from_manifest
    from gvsl.runtime.embed import embedding_stats_of

    _, export_dir, stats = with_stats
    manifest = json.loads((export_dir / "manifest.json").read_text())
    entry = {"file": "encoder.sm90.engine", "format": "engine", "kind": artifact.ENCODER, "precision": "fp16"}
    info = info_from_manifest(manifest, export_dir / entry["file"], artifact.ENCODER, entry)
    got = embedding_stats_of(info)
    np.testing.assert_array_equal(got.mean, np.asarray(stats.to_dict()["mean"]))
    np.testing.assert_array_equal(got.std, np.asarray(stats.to_dict()["std"]))
    assert got.n == stats.n == 5
