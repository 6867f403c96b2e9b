"""`gvsl train`: the loss goes down on real volumes, resume is exact, torchrun works,
bad input gets one clear line."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from gvsl.cli.main import app
from gvsl.io import load_model
from gvsl.losses import GVSLLoss
from gvsl.runtime.errors import GvslInputError
from gvsl.train import TrainConfig, train

TINY = ["--widths", "tiny", "--patch-size", "16", "--spacing", "native", "--modality", "mr", "--device", "cpu"]
runner = CliRunner()


def cli(*args: str):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def train_cfg(data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(
        data=[str(data)],
        out=str(out),
        iterations=4,
        patch_size=(16, 16, 16),
        widths=[8, 16, 16, 32, 32, 32, 16, 16, 8],
        affine_width=32,
        deform_width=8,
        restore_width=8,
        preprocess={"spacing": None, "modality": "mr"},
        device="cpu",
        log_every=1,
    )
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def mni_dir(tmp_path_factory, mni_t1_path) -> Path:
    """Four real 'subjects': the MNI T1 template at 4 mm, shifted and rescaled."""
    img = nib.load(mni_t1_path)
    data = np.asarray(img.dataobj, dtype=np.float32)[::4, ::4, ::4]
    aff = img.affine.copy()
    aff[:3, :3] *= 4
    out = tmp_path_factory.mktemp("mni")
    for k, (shift, gain) in enumerate([(0, 1.0), (3, 0.8), (-2, 1.3), (5, 0.9)]):
        vol = np.roll(data, shift, axis=k % 3) * gain
        nib.save(nib.Nifti1Image(vol, aff), out / f"subject{k}.nii.gz")
    return out


def fixed_eval_loss(model, batch) -> float:
    model.eval()
    with torch.no_grad():
        x1, x2 = batch
        o = model(x1, x2)
        return GVSLLoss()(x1, o.warped, o.restored, o.local_dvf).total.item()


def test_training_lowers_the_loss_on_real_volumes(mni_dir, tmp_path):
    cfg = train_cfg(mni_dir, tmp_path / "run", iterations=30, lr=2e-3, checkpoint_every=1000, patch_size=(32, 32, 32))
    from gvsl.data import PairDataset, VolumeCache, list_volumes
    from gvsl.model import GVSL
    from gvsl.runtime.preprocess import PreprocessConfig

    pre = PreprocessConfig.from_dict(cfg.preprocess)
    ds = PairDataset.from_cache(list_volumes([mni_dir]), pre, VolumeCache(tmp_path / "c"), (32, 32, 32), seed=123)
    items = [ds.sample() for _ in range(2)]
    batch = (torch.stack([i["x1"] for i in items]), torch.stack([i["x2"] for i in items]))
    torch.manual_seed(cfg.seed)
    before = fixed_eval_loss(GVSL(cfg.model_config()), batch)  # same init as the run

    result = train(cfg, log=lambda s: None)
    model, meta = load_model(result.model_dir)
    after = fixed_eval_loss(model, batch)
    assert result.step == 30 and not result.interrupted
    assert after < 0.8 * before, (before, after)
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,total,ncc,mse,smooth") and len(rows) == 31
    assert meta["preprocess"]["modality"] == "mr" and meta["patch_size"] == [32, 32, 32]


def test_resume_equals_uninterrupted(mni_dir, tmp_path):
    full = train(train_cfg(mni_dir, tmp_path / "full", iterations=6, checkpoint_every=100), log=lambda s: None)
    half = train(train_cfg(mni_dir, tmp_path / "half", iterations=3, checkpoint_every=100), log=lambda s: None)
    assert half.step == 3
    # the resumed run takes its configuration from the checkpoint, only the length changes
    resumed = train(train_cfg(mni_dir, tmp_path / "half", iterations=6), resume=True, log=lambda s: None)
    assert resumed.step == 6
    a, _ = load_model(full.model_dir)
    b, _ = load_model(resumed.model_dir)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.allclose(pa, pb, atol=1e-6, rtol=1e-5), name
    m_full = (tmp_path / "full" / "metrics.csv").read_text()
    m_half = (tmp_path / "half" / "metrics.csv").read_text()
    assert len(m_half.splitlines()) == len(m_full.splitlines()) == 7


def test_checkpoint_loads_without_pickle_and_refuses_second_run(mni_dir, tmp_path):
    cfg = train_cfg(mni_dir, tmp_path / "run", iterations=2)
    train(cfg, log=lambda s: None)
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 2 and set(state) >= {"model", "optimizer", "config", "rng"}
    with pytest.raises(GvslInputError, match="--resume"):
        train(cfg, log=lambda s: None)
    assert not any(p.name.startswith(".") for p in (tmp_path / "run" / "checkpoints").iterdir())


def test_stop_flag_saves_and_exits(mni_dir, tmp_path, monkeypatch):
    """SIGINT between steps: a checkpoint at the current step, no final model, resumable."""
    import signal

    calls = []

    def progress(step, total, m):
        calls.append(step)
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    cfg = train_cfg(mni_dir, tmp_path / "run", iterations=10)
    result = train(cfg, progress=progress, log=lambda s: None)
    assert result.interrupted and result.step == 2 and result.model_dir is None
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 2
    done = train(train_cfg(mni_dir, tmp_path / "run", iterations=4), resume=True, log=lambda s: None)
    assert done.step == 4 and done.model_dir is not None


def test_cli_train_end_to_end(mni_dir, tmp_path):
    out = tmp_path / "run"
    r = cli("train", mni_dir, "-o", out, "--iterations", "3", "--quiet", *TINY)
    assert r.exit_code == 0, r.output
    meta = json.loads((out / "model" / "model.json").read_text())
    assert meta["model"]["widths"] == [8, 16, 16, 32, 32, 32, 16, 16, 8]
    assert (out / "model" / "model.safetensors").stat().st_size > 1000
    r = cli("train", mni_dir, "-o", out, "--iterations", "5", "--resume", "--quiet", *TINY)
    assert r.exit_code == 0, r.output
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["step"] == 5


def test_cli_train_head_widths_and_augment_overrides(mni_dir, tmp_path):
    out = tmp_path / "run"
    r = cli(
        "train", mni_dir, "-o", out, "--iterations", "1", "--quiet", *TINY, "--affine-width", "24",
        "--deform-width", "8", "--restore-width", "8", "--augment", "p_shuffle=0", "--augment", "rotation=[-0.1,0.1]",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["affine_width"], cfg["deform_width"], cfg["restore_width"]) == (24, 8, 8)
    assert cfg["augment"]["p_shuffle"] == 0 and cfg["augment"]["rotation"] == [-0.1, 0.1]
    assert cfg["augment"]["p_inpaint"] == 1.0  # untouched keys keep the spec's defaults
    for bad, say in ((["--augment", "bogus=1"], "unknown augmentation keys"), (["--augment", "p_shuffle"], "KEY=VALUE"),
                     (["--augment", "p_shuffle=2"], "probability"), (["--restore-width", "6"], "restore_width"),
                     (["--deform-width", "12"], "deform_width")):  # fmt: skip
        r = cli("train", mni_dir, "-o", tmp_path / "bad", "--iterations", "1", "--quiet", *TINY, *bad)
        assert r.exit_code == 2 and say in r.output and "Traceback" not in r.output, (bad, r.output)
        assert not (tmp_path / "bad" / "model").exists()


def test_cli_help_explains():
    r = cli("train", "--help")
    assert r.exit_code == 0
    for word in ("--iterations", "--resume", "--skip-bad", "--widths", "torchrun"):
        assert word in r.output


# ----------------------------------------------------------------------------- bad input
def write(path: Path, data: np.ndarray, affine=None) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4) * 2 if affine is None else affine), path)
    return path


def bad_cases(tmp: Path, good: Path) -> dict[str, tuple[Path, str]]:
    ok = np.asarray(nib.load(good).dataobj, dtype=np.float32)
    cases = {}
    d = tmp / "empty"
    d.mkdir(parents=True)
    cases["empty folder"] = (d, "empty")
    d = tmp / "notnifti"
    d.mkdir()
    (d / "notes.txt").write_text("hello")
    cases["non-NIfTI folder"] = (d, "notnifti")
    cases["text file"] = (tmp / "notes.txt", "notes.txt")
    cases["text file"][0].write_text("x")
    for name, arr in {
        "flat2d": ok[:, :, 0],
        "four_d": np.stack([ok, ok, ok], -1),
        "nan": np.where(np.arange(ok.size).reshape(ok.shape) == 7, np.nan, ok).astype(np.float32),
    }.items():
        cases[name] = (write(tmp / f"{name}.nii.gz", arr), f"{name}.nii.gz")
    raw = good.read_bytes()
    (tmp / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    cases["truncated"] = (tmp / "truncated.nii.gz", "truncated.nii.gz")
    (tmp / "fake.nii.gz").write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 100)
    cases["png renamed"] = (tmp / "fake.nii.gz", "fake.nii.gz")
    cases["too small for patch"] = (write(tmp / "small.nii.gz", ok[:4, :4, :4]), "small.nii.gz")
    return cases


def test_cli_bad_inputs_one_line_nothing_written(mni_dir, tmp_path):
    good = mni_dir / "subject0.nii.gz"
    for label, (path, name) in bad_cases(tmp_path / "bad", good).items():
        out = tmp_path / f"run_{label.replace(' ', '_')}"
        r = cli("train", path, "-o", out, "--iterations", "1", "--quiet", *TINY)
        assert r.exit_code == 2, (label, r.output)
        assert "Traceback" not in r.output, label
        lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
        assert len(lines) == 1 and name in lines[0], (label, r.output)
        assert not (out / "model").exists() and not (out / "checkpoints").exists(), label


def test_cli_bad_options(mni_dir, tmp_path):
    r = runner.invoke(app, ["train", str(mni_dir), "-o", str(tmp_path / "r"), "--bogus"])
    assert r.exit_code == 2 and "No such option" in r.output
    r = cli("train", mni_dir, "-o", tmp_path / "r", "--patch-size", "30", *TINY[:2])
    assert r.exit_code == 2 and "multiples of 16" in r.output and "Traceback" not in r.output
    r = cli("train", mni_dir, "-o", tmp_path / "r", "--widths", "huge")
    assert r.exit_code == 2 and "unknown widths" in r.output


def test_cli_skip_bad_trains_on_the_rest(mni_dir, tmp_path):
    data = tmp_path / "mixed"
    shutil.copytree(mni_dir, data)
    (data / "broken.nii.gz").write_bytes((mni_dir / "subject0.nii.gz").read_bytes()[:500])
    write(data / "four_d.nii.gz", np.zeros((8, 8, 8, 2), np.float32))
    out = tmp_path / "run"
    r = cli("train", data, "-o", out, "--iterations", "2", "--skip-bad", *TINY)
    assert r.exit_code == 0, r.output
    assert "2 file(s) skipped" in r.output
    assert "broken.nii.gz" in r.output and "four_d.nii.gz" in r.output
    meta = json.loads((out / "model" / "model.json").read_text())
    assert len(meta["train"]["data"]) == 4


def torchrun_command() -> str:
    """The torchrun of this interpreter's environment: a torchrun found first on PATH may
    belong to another Python, with another gvsl installed."""
    beside = Path(sys.executable).with_name("torchrun")
    return str(beside) if beside.is_file() else shutil.which("torchrun") or "torchrun"


def test_a_torchrun_worker_leaves_with_its_commands_status(tmp_path):
    """``python -m gvsl.cli.main`` under WORLD_SIZE > 1 ends through os._exit with the
    command's own status: 0 for success, 2 for a user error, with its one-line message."""
    env = {**os.environ, "WORLD_SIZE": "2"}
    base = [sys.executable, "-m", "gvsl.cli.main"]
    ok = subprocess.run([*base, "--version"], capture_output=True, text=True, env=env, timeout=120, check=False)
    assert ok.returncode == 0 and ok.stdout.strip(), ok.stderr
    bad = subprocess.run(
        [*base, "info", str(tmp_path / "missing")], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert bad.returncode == 2, bad.stderr
    assert bad.stderr.count("error:") == 1 and "missing" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_torchrun_two_processes_gloo(mni_dir, tmp_path):
    torchrun = torchrun_command()
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        torchrun,
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "gvsl.cli.main",
        "train",
        str(mni_dir),
        "-o",
        str(out),
        "--iterations",
        "3",
        "--quiet",
        *TINY,
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    ranks = json.loads(state["rng"])
    assert state["step"] == 3 and len(ranks) == 2
    assert ranks[0]["data"]["rng"] != ranks[1]["data"]["rng"]  # per-rank data streams
    model, _ = load_model(out / "model")
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ----------------------------------------------------------------------------- distributed collectives
class RecordingProcessGroup:
    """Stands in for ``torch.distributed`` as a two-rank group of whatever backend the loop asks for.

    Like torch, it hands a tensor collective to the backend registered for the
    tensor's device type and fails when there is none (an NCCL-only group has no
    CPU backend); object collectives and barriers use torch's rule for them
    (CPU when a CPU backend is present). Every call is recorded as
    ``(collective, device type, backend)``. The other rank votes ``other_flag``.
    """

    ReduceOp = torch.distributed.ReduceOp

    def __init__(self, other_flag: float = 0.0) -> None:
        self.backend: str | None = None
        self.other_flag = other_flag
        self.calls: list[tuple[str, str, str]] = []

    def is_initialized(self) -> bool:
        return self.backend is not None

    def init_process_group(self, backend: str, **kwargs) -> None:
        self.backend = backend

    def carriers(self) -> dict[str, str]:
        """Device type -> backend, as ``init_process_group`` reads its backend string."""
        if ":" not in self.backend:
            return {"cuda": "nccl"} if self.backend == "nccl" else {"cpu": self.backend}
        return dict(part.split(":") for part in self.backend.split(","))

    def _use(self, collective: str, device_type: str) -> None:
        carriers = self.carriers()
        if device_type not in carriers:
            raise RuntimeError(f"{collective}: a {self.backend} group has no backend for {device_type} tensors")
        self.calls.append((collective, device_type, carriers[device_type]))

    def _object_device(self) -> str:
        carriers = self.carriers()
        return "cpu" if "cpu" in carriers else next(iter(carriers))

    def all_reduce(self, tensor: torch.Tensor, op=None) -> None:
        self._use("all_reduce", tensor.device.type)
        tensor.fill_(max(float(tensor.max()), self.other_flag))

    def all_gather_object(self, out: list, obj) -> None:
        self._use("all_gather_object", self._object_device())
        out[:] = [obj, obj]

    def barrier(self, **kwargs) -> None:
        self._use("barrier", self._object_device())

    def destroy_process_group(self) -> None:
        self.backend = None


@pytest.mark.parametrize(
    ("device", "carriers"), [("cuda:0", {"cpu": "gloo", "cuda": "nccl"}), ("cpu", {"cpu": "gloo"})]
)
def test_every_collective_uses_a_backend_of_its_device(monkeypatch, device, carriers):
    """On GPUs the group carries DDP's CUDA gradients on NCCL and the loop's own CPU
    collectives on gloo: an NCCL-only group would reject the first stop-flag vote."""
    from gvsl import train_processes

    group = RecordingProcessGroup(other_flag=1.0)
    monkeypatch.setattr(train_processes, "dist", group)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    ddp = train_processes.Distributed(torch.device(device))
    assert group.carriers() == carriers
    assert ddp.any(False) is True  # the other rank's vote reaches this one
    group.other_flag = 0.0
    assert ddp.any(False) is False and ddp.any(True) is True
    assert ddp.gather({"rank": 0}) == [{"rank": 0}, {"rank": 0}]
    ddp.barrier()
    ddp.close()
    assert [c[0] for c in group.calls] == ["all_reduce"] * 3 + ["all_gather_object", "barrier"]
    assert {(device_type, backend) for _, device_type, backend in group.calls} == {("cpu", "gloo")}


def test_the_loop_calls_torch_distributed_only_through_its_collectives_class():
    """Every collective of a training run lives in ``Distributed`` (checked above), none
    elsewhere: not in the loop (gvsl/train.py), not beside the class."""
    import ast

    from gvsl import train as training
    from gvsl import train_processes

    def dist_uses(tree: ast.AST) -> list[ast.Attribute]:
        return [
            node
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "dist"
        ]

    loop = ast.parse(Path(training.__file__).read_text())
    assert not dist_uses(loop), "gvsl/train.py calls torch.distributed directly"
    assert "torch.distributed" not in Path(training.__file__).read_text()
    tree = ast.parse(Path(train_processes.__file__).read_text())
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == "Distributed":
            inside |= {id(n) for n in ast.walk(node)}
    uses = dist_uses(tree)
    outside = [node.lineno for node in uses if id(node) not in inside]
    assert len(uses) >= 6 and not outside, f"torch.distributed used outside Distributed at lines {outside}"


# ----------------------------------------------------------------------------- non-finite loss
class NaNAtSecondCall(GVSLLoss):
    """The GVSL loss with a NaN total at its second call (the loop's step 2)."""

    calls = 0

    def forward(self, *args, **kwargs):
        terms = super().forward(*args, **kwargs)
        type(self).calls += 1
        if type(self).calls == 2:
            terms.total = terms.total * float("nan")
        return terms


def test_nonfinite_loss_saves_the_weights_before_it_and_resumes(mni_dir, tmp_path, monkeypatch):
    from gvsl import train as training

    one = train(train_cfg(mni_dir, tmp_path / "one", iterations=1), log=lambda s: None)
    monkeypatch.setattr(training, "GVSLLoss", NaNAtSecondCall)
    NaNAtSecondCall.calls = 0
    with pytest.raises(GvslInputError, match=r"loss became nan at step 2; the weights before it \(step 1\)"):
        train(train_cfg(mni_dir, tmp_path / "run", iterations=5), log=lambda s: None)
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 1
    # the update of the NaN step was skipped: the weights are those after step 1, bit for bit
    after_one = torch.load(tmp_path / "one" / "checkpoints" / "last.pt", weights_only=True)["model"]
    for name, value in state["model"].items():
        assert torch.equal(value, after_one[name]), name
    monkeypatch.setattr(training, "GVSLLoss", GVSLLoss)
    done = train(train_cfg(mni_dir, tmp_path / "run", iterations=3), resume=True, log=lambda s: None)
    assert done.step == 3 and done.model_dir is not None
    assert math.isfinite(done.last_metrics["total"])
    assert one.step == 1


@pytest.mark.slow
def test_torchrun_nonfinite_loss_on_one_rank_stops_every_rank(mni_dir, tmp_path):
    """Rank 1 alone sees NaN: both ranks agree before any update, save one checkpoint,
    leave with one clear line, and the run resumes from it (a deadlock would hang until
    gloo's 30-minute timeout: the 60 s limit catches it)."""
    torchrun = torchrun_command()
    worker = Path(__file__).with_name("ddp_nonfinite_worker.py")
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["train", str(mni_dir), "-o", str(out), "--iterations", "4", "--quiet", *TINY]
    p = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", str(worker), *args],
                       capture_output=True, text=True, env=env, timeout=60, check=False)  # fmt: skip
    assert p.returncode != 0, p.stderr[-3000:]
    assert "loss became nan on rank 1 at step 2; the weights before it (step 1)" in p.stderr, p.stderr[-3000:]
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 1 and len(json.loads(state["rng"])) == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    resume = [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "gvsl.cli.main", *args, "--resume"]
    resumed = subprocess.run(resume, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["step"] == 4


def test_warm_start_copies_weights_and_refuses_another_architecture(tmp_path):
    from gvsl.config import ModelConfig
    from gvsl.io import save_model
    from gvsl.model import GVSL
    from gvsl.train import _warm_start

    torch.manual_seed(0)
    source = GVSL(ModelConfig.from_preset("tiny"))
    folder = save_model(source, tmp_path / "source", preprocess={}, extra={"patch_size": [16, 16, 16]})
    torch.manual_seed(1)
    target = GVSL(ModelConfig.from_preset("tiny"))
    assert not torch.equal(
        target.state_dict()["unet.inc.double_conv.0.weight"], source.state_dict()["unet.inc.double_conv.0.weight"]
    )
    _warm_start(target, str(folder), torch.device("cpu"))
    for name, tensor in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], tensor), name
    other = GVSL(ModelConfig.from_preset("small"))
    with pytest.raises(GvslInputError, match="architecture differs"):
        _warm_start(other, str(folder), torch.device("cpu"))
