"""The GVSL pre-training loop behind ``gvsl train``.

One process or many (``torchrun`` -> DistributedDataParallel, one rank per GPU
or gloo on CPU). Each iteration: draw pairs of different volumes, augment them
on the device (same spatial draw for x1 and x2, Models Genesis damage on x1),
run GVSL with the damaged x1 as A and x2 as B, and minimise
``NCC(warped B, x1) + MSE(restored, x1) + smooth(psi^l)``.

Checkpoints (``RUN/checkpoints/last.pt``) hold model, optimiser, step, the
configuration and every random state (torch, augmentation generator, each
rank's data stream), written atomically, so ``--resume`` continues the very
same run. They are read back with ``torch.load(weights_only=True)``. The final
model is ``RUN/model/model.safetensors`` + ``model.json``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from gvsl import __version__
from gvsl.augment import AugmentConfig, Augmenter
from gvsl.config import SIZE_MULTIPLE, LossWeights, ModelConfig
from gvsl.data import PairDataset, VolumeCache, list_volumes, make_batch, scan_volumes
from gvsl.io import atomic_write, save_model
from gvsl.losses import GVSLLoss
from gvsl.model import GVSL
from gvsl.runtime.atomic import save_text
from gvsl.runtime.errors import GvslInputError
from gvsl.runtime.preprocess import PreprocessConfig
from gvsl.train_metrics import MetricsLog
from gvsl.train_processes import Distributed, StopFlag, resolve_device

__all__ = ["TrainConfig", "TrainResult", "make_train_step", "train", "resolve_device"]


@dataclass
class TrainConfig:
    """Everything that defines a run; saved in every checkpoint and in ``RUN/config.json``."""

    data: list[str]
    out: str
    iterations: int = 1000
    batch_size: int = 1
    patch_size: tuple[int, int, int] = (64, 64, 64)
    widths: list[int] = field(default_factory=lambda: list(ModelConfig().widths))
    affine_width: int = 256
    deform_width: int = 16
    restore_width: int = 16
    # how the affine head's matrix is read (gvsl.config.ModelConfig.affine_convention)
    affine_convention: str = "centered"
    lr: float = 1e-4
    loss: dict[str, float] = field(default_factory=lambda: LossWeights().to_dict())
    checkpoint_every: int = 500
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    preprocess: dict[str, Any] = field(default_factory=lambda: PreprocessConfig().to_dict())
    augment: dict[str, Any] = field(default_factory=lambda: AugmentConfig().to_dict())
    skip_bad: bool = False
    cache_dir: str | None = None
    # speed options (results stay the same up to float rounding): channels-last 3-D
    # memory format for the network and its inputs; torch.compile of the model
    channels_last: bool = False
    compile: bool = False
    # on-the-fly synthetic pairs (gvsl/synth_source.py): the loaded recipe (absolute paths) and
    # the share of pairs drawn from it; None trains on ``data`` only
    synth: dict[str, Any] | None = None
    synth_ratio: float = 1.0
    #: a trained model (folder / .safetensors) whose weights start a new run (warm start);
    #: its widths must be this run's
    init_weights: str | None = None

    def __post_init__(self) -> None:
        self.patch_size = tuple(int(p) for p in self.patch_size)  # type: ignore[assignment]
        if len(self.patch_size) != 3 or any(p <= 0 or p % SIZE_MULTIPLE for p in self.patch_size):
            raise ValueError(f"patch size must be three positive multiples of {SIZE_MULTIPLE}, got {self.patch_size}")
        for name in ("iterations", "batch_size", "checkpoint_every", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"learning rate must be positive, got {self.lr}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        self.model_config()  # validates widths
        PreprocessConfig.from_dict(self.preprocess)
        AugmentConfig.from_dict(self.augment)
        LossWeights(**self.loss)
        if self.synth is not None:
            from gvsl.synth_source import check_ratio

            check_ratio(self.synth_ratio)
            if not self.data and self.synth_ratio < 1:
                raise GvslInputError(
                    f"--synth-ratio {self.synth_ratio}: part of the pairs should be real volumes but no DATA was "
                    "given; pass DATA or --synth-ratio 1"
                )
        elif not self.data:
            raise GvslInputError("no input volumes given; pass DATA (folders, files, globs) or --synth RECIPE")

    def model_config(self) -> ModelConfig:
        return ModelConfig(
            widths=tuple(self.widths),
            affine_width=self.affine_width,
            deform_width=self.deform_width,
            restore_width=self.restore_width,
            affine_convention=self.affine_convention,
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["patch_size"] = list(self.patch_size)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """A saved run config; one saved before ``affine_convention`` existed trained with the quirk."""
        return cls(**{"affine_convention": "official", **d})


@dataclass
class TrainResult:
    step: int
    interrupted: bool
    model_dir: Path | None
    last_metrics: dict[str, float]
    bad_files: list[tuple[str, str]]


# ----------------------------------------------------------------------------- helpers
def _checkpoint_path(out: Path) -> Path:
    return out / "checkpoints" / "last.pt"


def _rng_to_json(state: dict[str, Any]) -> str:
    # numpy's bit-generator state holds ints beyond 64 bits: JSON keeps them exact
    # and weights_only loading accepts plain strings.
    return json.dumps(state)


# ----------------------------------------------------------------------------- the loop
def train(
    cfg: TrainConfig,
    resume: bool = False,
    progress: Callable[[int, int, dict[str, float]], None] | None = None,
    scan_progress: Callable[[int, int, str], None] | None = None,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Run (or continue) GVSL pre-training as ``cfg`` says.

    ``progress(step, total, metrics)`` is called after every step on rank 0;
    ``log`` receives one-line notices. Raises GvslInputError for bad data or
    options (the CLI prints it as one line).
    """
    out = Path(cfg.out)
    ckpt_path = _checkpoint_path(out)
    state: dict[str, Any] | None = None
    if resume:
        if not ckpt_path.is_file():
            raise GvslInputError(f"{ckpt_path}: no checkpoint to resume; start without --resume")
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        saved = TrainConfig.from_dict(json.loads(state["config"]))
        # the run's identity comes from the checkpoint; only the length may change
        saved.iterations = max(cfg.iterations, int(state["step"]))
        cfg = saved
    elif ckpt_path.is_file():
        raise GvslInputError(f"{out}: already holds a run; pass --resume to continue it or pick another --out")

    device = resolve_device(cfg.device)
    ddp = Distributed(device)
    try:
        result = _train(cfg, state, device, ddp, out, progress, scan_progress, log)
        # rank 0 is still writing the model when the others finish: leave together, because
        # gloo torn down on one rank while another is busy has aborted a rank ("terminate
        # called without an active exception"). Not on errors: a failed rank never arrives.
        ddp.barrier()
        return result
    finally:
        ddp.close()


def _warm_start(model: GVSL, path: str, device: torch.device) -> None:
    """Copy the weights of a saved model into ``model`` (same architecture; no pickle)."""
    from gvsl.io import WeightsError, load_model

    try:
        source, _ = load_model(path)
    except WeightsError as e:
        raise GvslInputError(f"--init-weights: {e}") from None
    mine = model.state_dict()
    theirs = source.state_dict()
    wrong = [k for k in mine if k not in theirs or theirs[k].shape != mine[k].shape]
    if wrong:
        raise GvslInputError(
            f"--init-weights {path}: its architecture differs from this run's ({len(wrong)} tensors, e.g. {wrong[0]}); "
            "use the same --widths and head widths"
        )
    model.load_state_dict({k: v.to(device) for k, v in theirs.items()})


@dataclass
class _Session:
    """The state a run advances and a checkpoint saves: weights, optimiser, data stream, RNG, step."""

    model: GVSL
    optim: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    dataset: Any  # PairDataset, SynthPairSource, or None when there is neither
    aug_gen: torch.Generator
    step: int = 0


def _train(
    cfg: TrainConfig,
    state: dict[str, Any] | None,
    device: torch.device,
    ddp: Distributed,
    out: Path,
    progress: Callable[[int, int, dict[str, float]], None] | None,
    scan_progress: Callable[[int, int, str], None] | None,
    log: Callable[[str], None],
) -> TrainResult:
    """The run on this rank: data, session, optional restore, the loop, the last checkpoint and the model."""
    pre = PreprocessConfig.from_dict(cfg.preprocess)
    cache, good, bad = _scan_data(cfg, pre, ddp, out, scan_progress, log)
    amp_dtype = _amp_dtype(device, cfg.amp)
    session = _new_session(cfg, pre, cache, good, device, ddp, amp_dtype)
    if state is None:
        _apply_init_weights(session, cfg, device, ddp, log)
    else:
        _restore(session, state, ddp, out, log)
    train_step, rank_losses = _train_step(session, cfg, device, ddp, amp_dtype)
    last, interrupted = _loop(session, cfg, device, ddp, out, train_step, rank_losses, progress)
    _save_checkpoint(session, cfg, ddp, out)
    model_dir = None
    if ddp.main and not interrupted:
        model_dir = _save_final_model(session, cfg, pre, good, last, out)
    return TrainResult(session.step, interrupted, model_dir, last, [(str(p), w) for p, w in bad])


def _scan_data(
    cfg: TrainConfig,
    pre: PreprocessConfig,
    ddp: Distributed,
    out: Path,
    scan_progress: Callable[[int, int, str], None] | None,
    log: Callable[[str], None],
) -> tuple[VolumeCache, list[Path], list[tuple[Path, str]]]:
    """List, check and cache the input volumes; rank 0 also writes ``config.json`` and names the skipped ones.

    Rank 0 fills the cache first, so the other ranks only read it.
    """
    files = list_volumes(cfg.data) if cfg.data else []
    cache = VolumeCache(Path(cfg.cache_dir) if cfg.cache_dir else out / "cache")
    if ddp.main:
        good, bad = scan_volumes(files, pre, cache, skip_bad=cfg.skip_bad, progress=scan_progress)
    ddp.barrier()
    if not ddp.main:
        good, bad = scan_volumes(files, pre, cache, skip_bad=cfg.skip_bad)
    good, too_small = _check_sizes(good, pre, cache, cfg.patch_size, cfg.skip_bad)
    bad = list(bad) + too_small
    if files and not good:
        raise GvslInputError(f"{', '.join(cfg.data)}: no usable volume left (all {len(bad)} were bad)")
    if ddp.main:
        out.mkdir(parents=True, exist_ok=True)
        save_text(out / "config.json", json.dumps(cfg.to_dict(), indent=2))
        for path, why in bad:
            log(f"skipped {path}: {why}")
    return cache, good, bad


def _new_session(
    cfg: TrainConfig,
    pre: PreprocessConfig,
    cache: VolumeCache,
    good: list[Path],
    device: torch.device,
    ddp: Distributed,
    amp_dtype: torch.dtype | None,
) -> _Session:
    """A fresh, seeded model, optimiser, loss scaler, data stream and augmentation generator at step 0."""
    torch.manual_seed(cfg.seed)
    model = GVSL(cfg.model_config()).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    optim = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    dataset = (
        PairDataset.from_cache(good, pre, cache, cfg.patch_size, seed=cfg.seed, rank=ddp.rank, world_size=ddp.world)
        if good
        else None
    )
    if cfg.synth is not None:  # on-the-fly synthetic pairs, mixed with the real ones
        from gvsl.synth_source import SynthPairSource

        dataset = SynthPairSource.from_recipe(
            cfg.synth, cfg.synth_ratio, dataset, pre, cfg.patch_size, seed=cfg.seed, rank=ddp.rank
        )
    aug_gen = torch.Generator(device=device)
    aug_gen.manual_seed(cfg.seed * 1000 + ddp.rank)
    return _Session(model, optim, scaler, dataset, aug_gen)


def _apply_init_weights(
    session: _Session, cfg: TrainConfig, device: torch.device, ddp: Distributed, log: Callable[[str], None]
) -> None:
    """A new run's warm start: the weights of ``cfg.init_weights`` when it names a model."""
    if not cfg.init_weights:
        return
    _warm_start(session.model, cfg.init_weights, device)
    if ddp.main:
        log(f"weights from {cfg.init_weights}")


def _restore(session: _Session, state: dict[str, Any], ddp: Distributed, out: Path, log: Callable[[str], None]) -> None:
    """Put a checkpoint back into ``session``: weights, optimiser, loss scaler, step and this rank's random states."""
    session.model.load_state_dict(state["model"])
    session.optim.load_state_dict(state["optimizer"])
    if "scaler" in state and session.scaler.is_enabled():
        session.scaler.load_state_dict(state["scaler"])
    session.step = int(state["step"])
    ranks = json.loads(state["rng"])
    if len(ranks) != ddp.world:
        raise GvslInputError(
            f"{_checkpoint_path(out)}: saved with {len(ranks)} process(es); resume with the same number"
        )
    mine = ranks[ddp.rank]
    session.dataset.load_state_dict(mine["data"])
    torch.set_rng_state(torch.tensor(mine["torch"], dtype=torch.uint8))
    session.aug_gen.set_state(torch.tensor(mine["aug"], dtype=torch.uint8))
    if ddp.main:
        log(f"resumed {out} at step {session.step}")


def _train_step(
    session: _Session, cfg: TrainConfig, device: torch.device, ddp: Distributed, amp_dtype: torch.dtype | None
) -> tuple[Callable[[torch.Tensor, torch.Tensor, torch.Generator], Any], list[float]]:
    """The run's step (DDP-wrapped under ``torchrun``) and the list it fills with every rank's loss.

    The list stays empty until a step where some rank's loss is not finite; then
    every rank skips that update and the loop stops.
    """
    net: torch.nn.Module = session.model
    if ddp.enabled:
        net = torch.nn.parallel.DistributedDataParallel(
            session.model, device_ids=[device.index] if device.type == "cuda" else None
        )
    criterion = GVSLLoss(LossWeights(**cfg.loss))
    augmenter = Augmenter(AugmentConfig.from_dict(cfg.augment), affine_convention=cfg.affine_convention)
    rank_losses: list[float] = []

    def any_rank_nonfinite(loss: torch.Tensor) -> bool:
        # every rank votes before any backward: all skip the update and stop together
        value = float(loss.detach())
        if not ddp.any(not math.isfinite(value)):
            return False
        rank_losses[:] = ddp.gather(value)
        return True

    train_step = make_train_step(
        net,
        session.optim,
        criterion,
        augmenter,
        amp_dtype,
        session.scaler,
        channels_last=cfg.channels_last,
        compile=cfg.compile,
        skip_update=any_rank_nonfinite,
    )
    return train_step, rank_losses


def _save_checkpoint(session: _Session, cfg: TrainConfig, ddp: Distributed, out: Path) -> None:
    """Gather every rank's random states; rank 0 writes them with the weights to ``last.pt`` atomically."""
    ranks = ddp.gather(
        {
            "data": session.dataset.state_dict(),
            "torch": torch.get_rng_state().tolist(),
            "aug": session.aug_gen.get_state().tolist(),
        }
    )
    if not ddp.main:
        return
    payload = {
        "model": session.model.state_dict(),
        "optimizer": session.optim.state_dict(),
        "step": session.step,
        "config": json.dumps(cfg.to_dict()),
        "rng": _rng_to_json(ranks),
        "gvsl_version": __version__,
    }
    if session.scaler.is_enabled():
        payload["scaler"] = session.scaler.state_dict()
    atomic_write(_checkpoint_path(out), lambda p: torch.save(payload, p))


def _loop(
    session: _Session,
    cfg: TrainConfig,
    device: torch.device,
    ddp: Distributed,
    out: Path,
    train_step: Callable[[torch.Tensor, torch.Tensor, torch.Generator], Any],
    rank_losses: list[float],
    progress: Callable[[int, int, dict[str, float]], None] | None,
) -> tuple[dict[str, float], bool]:
    """Step until ``cfg.iterations`` or a stop signal; returns the last logged metrics and whether it was stopped.

    Rank 0 logs metrics (:class:`MetricsLog`); checkpoints are written every
    ``cfg.checkpoint_every`` steps. A non-finite loss saves the weights from
    before that step and raises GvslInputError.
    """
    batches = _batches(iter(session.dataset), cfg.batch_size, device)
    metrics = MetricsLog(out, session.step) if ddp.main else None
    interrupted = False
    session.model.train()
    with StopFlag() as stop:
        while session.step < cfg.iterations:
            if ddp.any(stop.set):
                interrupted = True
                break
            x1, x2 = next(batches)
            terms = train_step(x1, x2, session.aug_gen)
            if rank_losses:
                _save_checkpoint(session, cfg, ddp, out)  # the model as it was before this step: the update was skipped
                ddp.barrier()  # all ranks leave together, after rank 0 has written it
                raise GvslInputError(_nonfinite_message(out, session.step + 1, rank_losses))
            session.step += 1
            step = session.step
            if metrics is not None:
                metrics.count_step()
                if step % cfg.log_every == 0 or step == cfg.iterations or step == 1:
                    metrics.record(step, {**terms.as_floats(), "lr": session.optim.param_groups[0]["lr"]})
                if progress is not None:
                    progress(step, cfg.iterations, metrics.last or terms.as_floats())
            if step % cfg.checkpoint_every == 0 and step < cfg.iterations:
                _save_checkpoint(session, cfg, ddp, out)
    if metrics is None:
        return {}, interrupted
    metrics.close()
    return metrics.last, interrupted


def _save_final_model(
    session: _Session, cfg: TrainConfig, pre: PreprocessConfig, good: list[Path], last: dict[str, float], out: Path
) -> Path:
    """Write the trained model to ``RUN/model`` with its preprocessing, patch size and training summary."""
    return save_model(
        session.model,
        out / "model",
        preprocess=pre.to_dict(),
        extra={
            "patch_size": list(cfg.patch_size),
            "train": {
                "steps": session.step,
                "data": [str(p) for p in good],
                "final": last,
                **({"synth": cfg.synth, "synth_ratio": cfg.synth_ratio} if cfg.synth is not None else {}),
            },
        },
    )


def make_train_step(
    net: torch.nn.Module,
    optim: torch.optim.Optimizer,
    criterion: GVSLLoss,
    augmenter: Augmenter,
    amp_dtype: torch.dtype | None,
    scaler: torch.amp.GradScaler,
    channels_last: bool = False,
    compile: bool = False,
    skip_update: Callable[[torch.Tensor], bool] | None = None,
) -> Callable[[torch.Tensor, torch.Tensor, torch.Generator], Any]:
    """One optimisation step ``(x1, x2, generator) -> loss terms``: augmentation on the
    batch's device, forward + loss under autocast, backward, optimiser step.

    The training loop and ``gvsl bench --train`` both run this function, so the
    benchmark measures the real step. ``channels_last`` feeds the network
    channels-last-3d inputs (the model must have been converted too), which
    lets cuDNN / oneDNN pick their NDHWC kernels; ``compile`` wraps the network
    in ``torch.compile`` (first steps compile; each new input shape recompiles).
    ``skip_update(loss)`` is asked after the forward pass; when it answers True
    the step ends there, with no backward pass and no parameter update (the
    training loop uses it to stop on a non-finite loss with the weights intact).
    """
    model = torch.compile(net) if compile else net

    def step(x1: torch.Tensor, x2: torch.Tensor, gen: torch.Generator) -> Any:
        with torch.no_grad():
            x1a, x1d, x2a = augmenter(x1, x2, gen)
        if channels_last:
            x1d = x1d.contiguous(memory_format=torch.channels_last_3d)
            x2a = x2a.contiguous(memory_format=torch.channels_last_3d)
        device_type = x1.device.type
        with torch.autocast(device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            o = model(x1d, x2a)
            terms = criterion(x1a, o.warped, o.restored, o.local_dvf)
        if skip_update is not None and skip_update(terms.total):
            return terms
        optim.zero_grad(set_to_none=True)
        scaler.scale(terms.total).backward()
        scaler.step(optim)
        scaler.update()
        return terms

    return step


def _nonfinite_message(out: Path, step: int, rank_losses: list[float]) -> str:
    """One line: which rank's loss was not finite at ``step``, where the last finite state is, what to do."""
    bad = [(rank, loss) for rank, loss in enumerate(rank_losses) if not math.isfinite(loss)]
    where = "" if len(rank_losses) == 1 else " on " + ", ".join(f"rank {rank}" for rank, _ in bad)
    return (
        f"{out}: loss became {bad[0][1]}{where} at step {step}; the weights before it (step {step - 1}) are in "
        f"{_checkpoint_path(out)} (continue with --resume); if it recurs, use a lower --lr or check the data"
    )


def _amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """bf16 autocast on GPUs that have it, fp16 (+ loss scaling) on older ones; fp32 on CPU."""
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _check_sizes(
    files: list[Path], pre: PreprocessConfig, cache: VolumeCache, patch: tuple[int, ...], skip_bad: bool
) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Volumes smaller than the patch are zero-padded, but one smaller than half
    the patch along an axis would be mostly padding: refuse it by name."""
    good, bad = [], []
    for f in files:
        shape = cache.get(f, pre).shape
        if any(s * 2 < p for s, p in zip(shape, patch, strict=True)):
            why = (
                f"volume is {'x'.join(map(str, shape))} after preprocessing, under half the patch "
                f"{'x'.join(map(str, patch))}; lower --patch-size or use a finer --spacing"
            )
            if not skip_bad:
                raise GvslInputError(f"{f}: {why}")
            bad.append((f, why))
        else:
            good.append(f)
    return good, bad


def _batches(
    it: Iterator[dict[str, torch.Tensor]], batch: int, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    while True:
        b = make_batch(it, batch)
        yield b["x1"].to(device, non_blocking=True), b["x2"].to(device, non_blocking=True)
