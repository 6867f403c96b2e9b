"""Rank 0's record of a training run: ``metrics.csv``, TensorBoard scalars, the speed.

A module of its own so that the loop in :mod:`gvsl.train` reads as steps; the
CSV is the record users plot and resume from, so on resume the rows logged
after the checkpoint's step are dropped before new ones are appended.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any

from gvsl.io import atomic_write

__all__ = ["METRIC_FIELDS", "MetricsLog"]

#: columns of ``metrics.csv``
METRIC_FIELDS = ["step", "total", "ncc", "mse", "smooth", "lr", "it_per_s", "elapsed_s"]


class MetricsLog:
    """Rank 0's record of the run: rows of ``metrics.csv``, TensorBoard scalars when installed, and the speed.

    ``it_per_s`` is the speed since the previous row; on resume the rows logged
    after the checkpoint's step are dropped first.
    """

    def __init__(self, out: Path, step: int) -> None:
        self.path = out / "metrics.csv"
        _truncate_metrics(self.path, step)
        self.writer = _tensorboard(out)
        self.last: dict[str, float] = {}
        self.start = time.perf_counter()
        self.window_start, self.window_steps = self.start, 0

    def count_step(self) -> None:
        self.window_steps += 1

    def record(self, step: int, values: dict[str, float]) -> None:
        """Log ``values`` (loss terms and learning rate) at ``step`` with the speed and the elapsed time."""
        now = time.perf_counter()
        self.last = {**values, "it_per_s": self.window_steps / max(now - self.window_start, 1e-9)}
        self.last["elapsed_s"] = now - self.start
        self.window_start, self.window_steps = now, 0
        _append_metrics(self.path, step, self.last)
        if self.writer is not None:
            for k, v in self.last.items():
                self.writer.add_scalar(f"train/{k}", v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume drop rows logged after the checkpoint, so the CSV tells one story."""
    if not path.is_file():
        return
    with path.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]

    def write(p: str) -> None:
        with open(p, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, METRIC_FIELDS)
            w.writeheader()
            w.writerows(rows)

    atomic_write(path, write)


def _append_metrics(path: Path, step: int, m: dict[str, float]) -> None:
    new = not path.is_file()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, METRIC_FIELDS)
        if new:
            w.writeheader()
        w.writerow({"step": step, **{k: f"{m[k]:.6g}" for k in METRIC_FIELDS[1:]}})


def _tensorboard(out: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is an optional extra
        return None
    return SummaryWriter(str(out / "tensorboard"))
