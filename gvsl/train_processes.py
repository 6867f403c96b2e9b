"""The processes of a training run: device, process group, collectives and stop signals.

``gvsl train`` runs as one process or as one rank per GPU under ``torchrun``
(DistributedDataParallel; gloo on CPU). Every call the loop makes to
``torch.distributed`` goes through :class:`Distributed`, so which device each
collective uses is decided in one place (:func:`process_group_backend`), and
SIGINT/SIGTERM become a flag the loop checks between steps (:class:`StopFlag`),
so a stopped run still writes its checkpoint.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import torch
import torch.distributed as dist

from gvsl.runtime.errors import GvslInputError

__all__ = ["Distributed", "StopFlag", "process_group_backend", "resolve_device"]


def resolve_device(name: str) -> torch.device:
    """``auto`` -> the local rank's GPU when CUDA exists, else CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise GvslInputError("--device cuda: no CUDA GPU is visible to torch; use --device cpu")
        if name == "cuda":
            name = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return torch.device(name)


def process_group_backend(device: torch.device) -> str:
    """The backend of the run's process group: ``cpu:gloo,cuda:nccl`` on GPUs, ``gloo`` on CPU.

    DDP's gradient all-reduce works on CUDA tensors and goes through NCCL; the
    run's own collectives (stop and finite flags, barriers, the gather of each
    rank's random state for the checkpoint) hold CPU data, which an NCCL-only
    group rejects, so they go through gloo in the same group.
    """
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


class Distributed:
    """Rank/world bookkeeping and every collective of the loop; a no-op outside ``torchrun``.

    The loop calls ``torch.distributed`` only through this class, so the
    devices its collectives use are decided here (:func:`process_group_backend`).
    """

    def __init__(self, device: torch.device) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.enabled = self.world > 1
        if self.enabled and not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group(backend=process_group_backend(device))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank (Ctrl-C on one rank stops all)."""
        if not self.enabled:
            return flag
        votes = torch.tensor([1.0 if flag else 0.0], device="cpu")  # CPU data: gloo carries it
        dist.all_reduce(votes, op=dist.ReduceOp.MAX)
        return bool(votes.item() > 0)

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


class StopFlag:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint and stops between steps."""

    def __init__(self) -> None:
        self.set = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "StopFlag":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.set:  # second Ctrl-C: give up at once
            raise KeyboardInterrupt
        self.set = True

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
