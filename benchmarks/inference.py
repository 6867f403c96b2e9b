"""Inference benchmark: every backend of this machine side by side (= ``gvsl bench``).

    python benchmarks/inference.py --widths default --sizes 64 --batch 1,8 --device cpu
    python benchmarks/inference.py --kind encoder,registration --sizes 128 --device cuda

Takes exactly the options of ``gvsl bench`` (``--help``); the code lives in
:mod:`gvsl.cli.bench` so the command and this script measure the same thing.
"""

from __future__ import annotations

import sys

from gvsl.cli.main import app

if __name__ == "__main__":
    app(["bench", *sys.argv[1:]], prog_name="benchmarks/inference.py")
