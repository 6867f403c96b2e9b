"""CPU time of the label-map generator: one subject draw and one training pair, per source.

    OMP_NUM_THREADS=1 python benchmarks/generator_speed.py [RECIPE] [--shapes 64,80,96] [--n 6]

Reports process CPU seconds (not wall time, which a shared machine inflates) per draw
of each source of the recipe at each grid size, and the median pair over all sources as
``gvsl train --synth`` draws them (source chosen by the recipe's probabilities).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from gvsl.generator import SynthGenerator, load_recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", nargs="?", default="default")
    parser.add_argument("--shapes", default="64,80,96")
    parser.add_argument("--n", type=int, default=6)
    parser.add_argument("--root", default=None)
    args = parser.parse_args()
    t = time.process_time()
    gen = SynthGenerator(load_recipe(args.recipe, root=args.root))
    print(f"recipe {args.recipe}: label maps built in {time.process_time() - t:.2f} s CPU")
    rng = np.random.default_rng(0)
    for n in (int(s) for s in args.shapes.split(",")):
        shape = (n, n, n)
        gen.draw_pair(rng, shape)  # warm-up (interpolation matrices, caches)
        per_source: dict[str, list[float]] = {}
        pairs = []
        for _ in range(args.n * len(gen.sources)):
            t = time.process_time()
            a, _b = gen.draw_pair(rng, shape)
            dt = time.process_time() - t
            pairs.append(dt)
            per_source.setdefault(a.params["source"], []).append(dt / 2)
        rows = ", ".join(f"{k} {np.median(v):.3f}" for k, v in sorted(per_source.items()))
        print(f"{n}^3: median pair {np.median(pairs):.3f} s CPU; median draw per source (s): {rows}")


if __name__ == "__main__":
    main()
