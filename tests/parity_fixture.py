"""The deterministic weights behind ``tests/data/official_parity_32.npz``, rebuilt from their names.

``official_parity_32.npz`` holds what the authors' PyTorch GVSL code computes for one pair of
32³ inputs; ``tests/test_parity.py`` loads the same weights into a default-width gvsl model and
checks gvsl's outputs against it. The weights are not stored (32 M parameters): they follow
from each tensor's name and shape alone, as ``tests/data/official_parity_32.md`` (the fixture's
spec, a copy of shared/parity/README.md) prescribes. For every tensor of the official
state_dict (``tests/data/gvsl_official_state_dict.tsv``), with
``rng = numpy.random.default_rng(zlib.crc32(name.encode()))``:

* a ``weight`` with two or more dimensions: ``rng.normal(0, sqrt(2 / fan_in), shape)``,
  fan_in being the product of all dimensions but the first;
* any other ``weight`` (a GroupNorm scale): ``1 + 0.1 * rng.normal(size=shape)``;
* a ``bias``: ``0.05 * rng.normal(size=shape)``;

each cast to float32. ``python tests/parity_fixture.py OUT.pth`` writes them as the authors'
release would (``{"state_dict": ...}``), so the fixture's arrays can be recomputed by running
the authors' code on that checkpoint and ``fixed`` / ``moving`` of the ``.npz``.
"""

from __future__ import annotations

import sys
import zlib
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parent / "data"


def official_keys() -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of the official state_dict (default widths)."""
    rows = {}
    for line in (DATA / "gvsl_official_state_dict.tsv").read_text(encoding="utf-8").splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, shape, _dtype = line.split("\t")
        rows[name] = tuple(int(s) for s in shape.split("x"))
    return rows


def deterministic_arrays() -> dict[str, np.ndarray]:
    """The fixture's weights as float32 numpy arrays, by official tensor name."""
    state = {}
    for name, shape in official_keys().items():
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        if name.endswith("weight") and len(shape) >= 2:
            arr = rng.normal(0, np.sqrt(2 / np.prod(shape[1:])), shape)
        elif name.endswith("weight"):
            arr = 1 + 0.1 * rng.normal(size=shape)
        else:
            arr = 0.05 * rng.normal(size=shape)
        state[name] = arr.astype(np.float32)
    return state


def deterministic_state() -> dict:
    """The fixture's weights as a torch state_dict (what an official checkpoint holds)."""
    import torch

    return {name: torch.from_numpy(arr) for name, arr in deterministic_arrays().items()}


def write_checkpoint(path: str | Path) -> Path:
    """Write the weights as the authors' release stores them: ``{"state_dict": ...}``."""
    import torch

    path = Path(path)
    torch.save({"state_dict": deterministic_state()}, path)
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/parity_fixture.py OUT.pth")
    print(write_checkpoint(sys.argv[1]))
