"""Preprocessing benchmark: gvsl's read + RAS+ + 1 mm + CT window vs SimpleITK (= ``gvsl bench --preprocess-only``).

    python benchmarks/preprocess.py                           # 512x512x300 CT at 0.7x0.7x1.0 mm
    python benchmarks/preprocess.py --ct-shape 256,256,200 --repeats 3

SimpleITK is a benchmark-only peer (``pip install "gvsl[bench]"``). Options are
those of ``gvsl bench``; the code is :func:`gvsl.cli.bench.bench_preprocess`.
"""

from __future__ import annotations

import sys

from gvsl.cli.main import app

if __name__ == "__main__":
    app(["bench", "--preprocess-only", *sys.argv[1:]], prog_name="benchmarks/preprocess.py")
