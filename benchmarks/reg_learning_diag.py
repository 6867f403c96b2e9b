"""Diagnostic behind EVALUATION.md §1 "why the first default model did not register":
does GVSL's Z-matching head learn to register within a CPU budget, and what stops it?

Trains a small GVSL (the default model's widths) with gvsl's own training step
(``gvsl.train.make_train_step``: augmentation, GVSL loss, Adam) on whole 4 mm brains
(one 48x64x48 patch per volume) and every EVERY steps registers held-out pairs with
``GVSL.register``, printing the global NCC inside the brain before (identity) and after.
Variants differ only in the JSON OPTIONS (augmentation keys of gvsl.augment.AugmentConfig,
loss weights, lr ...). Data (made first, as in EVALUATION.md):

    gvsl synth -o /tmp/rx/train4 --n 24 --seed 0 --spacing 4 --prefix s
    gvsl synth -o /tmp/rx/eval4 --n 8 --seed 1000 --spacing 4 --prefix e
    python benchmarks/reg_learning_diag.py A 300                      # the spec's recipe
    python benchmarks/reg_learning_diag.py D 300 '{"aug":{"p_damage":0.5}}'
    python benchmarks/reg_learning_diag.py B 300 '{"aug":{"p_shuffle":0,"p_nonlinear":0,"p_inpaint":0}}'
    python benchmarks/reg_learning_diag.py C 300 '{"aug":{"spatial":false,"p_shuffle":0,"p_nonlinear":0,"p_inpaint":0}}'

NT=1 in the environment runs torch on one thread (two variants side by side on 2 cores).
The same held-out evaluation of a `gvsl train` checkpoint (the default model's curve in
gvsl/assets/default/PROVENANCE.md):

    python benchmarks/reg_learning_diag.py ckpt 0 '{"checkpoint":"RUN/checkpoints/last.pt"}'
"""

from __future__ import annotations

import glob
import json
import os
import sys
import time

import numpy as np
import torch

from gvsl.augment import AugmentConfig, Augmenter
from gvsl.config import LossWeights, ModelConfig
from gvsl.losses import GVSLLoss
from gvsl.model import GVSL
from gvsl.runtime.preprocess import PreprocessConfig, load_volume, pad_to_shape, preprocess
from gvsl.train import make_train_step


def load(pattern: str, pre: PreprocessConfig, shape: tuple[int, ...]) -> list[np.ndarray]:
    """Preprocessed images (labels skipped), zero-padded to ``shape``."""
    files = [f for f in sorted(glob.glob(pattern)) if "labels" not in f]
    return [pad_to_shape(preprocess(load_volume(f), pre).data, shape)[0] for f in files]


def tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))[None, None].float()


def global_ncc(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    a, b = a[mask] - a[mask].mean(), b[mask] - b[mask].mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def main(name: str, iters: int, opts: dict) -> None:
    torch.set_num_threads(int(os.environ.get("NT", "2")))
    pre = PreprocessConfig.from_dict({"spacing": [opts.get("spacing", 4.0)] * 3, "modality": "mr"})
    shape = tuple(opts.get("shape", [48, 64, 48]))
    train = load(opts.get("train", "/tmp/rx/train4/*.nii.gz"), pre, shape)
    held = load(opts.get("eval", "/tmp/rx/eval4/*.nii.gz"), pre, shape)
    print(name, "train", len(train), train[0].shape, "eval", len(held), flush=True)
    torch.manual_seed(opts.get("seed", 0))
    widths = opts.get("widths", [16, 32, 48, 64, 96, 48, 48, 32, 16])
    net = GVSL(ModelConfig(widths=tuple(widths), affine_width=opts.get("aw", 32), deform_width=16, restore_width=16))
    step0 = 0
    if opts.get("checkpoint"):  # evaluate a gvsl train checkpoint (weights_only: no pickled code)
        from gvsl.train import TrainConfig

        ckpt = torch.load(opts["checkpoint"], weights_only=True, map_location="cpu")
        cfg = ckpt["config"]
        net = GVSL(TrainConfig.from_dict(json.loads(cfg) if isinstance(cfg, str) else cfg).model_config())
        net.load_state_dict(ckpt["model"])
        step0 = int(ckpt["step"])
    optim = torch.optim.Adam(net.parameters(), lr=opts.get("lr", 5e-4))
    crit = GVSLLoss(LossWeights(**opts.get("loss", {"ncc": 1, "mse": 1, "smooth": 1})))
    aug = Augmenter(AugmentConfig.from_dict(opts.get("aug", {})))
    step = make_train_step(net, optim, crit, aug, None, torch.amp.GradScaler(enabled=False))
    gen = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)

    def evaluate() -> np.ndarray:
        """Mean over held-out pairs (0,1), (2,3) ...: NCC identity, NCC registered, mean |DVF|, local NCC loss."""
        net.eval()
        rows = []
        with torch.no_grad():
            for k in range(0, len(held), 2):
                f, m = tensor(held[k]), tensor(held[k + 1])
                _, dvf, warped = net.register(f, m)
                mask = (held[k] > 0.05) | (held[k + 1] > 0.05)
                rows.append((
                    global_ncc(held[k], held[k + 1], mask), global_ncc(held[k], warped[0, 0].numpy(), mask),
                    float(dvf.abs().mean()), float(crit(f, warped, f, dvf).ncc),
                ))  # fmt: skip
        net.train()
        return np.array(rows).mean(0)

    e = evaluate()
    print(f"{name} it {step0} eval ncc id {e[0]:.4f} reg {e[1]:.4f} |dvf| {e[2]:.3f}", flush=True)
    t0, hist = time.time(), []
    for it in range(1, iters + 1):
        i, j = rng.choice(len(train), 2, replace=False)
        terms = step(tensor(train[i]), tensor(train[j]), gen)
        hist.append([float(terms.ncc.detach()), float(terms.mse.detach()), float(terms.smooth.detach())])
        if it % opts.get("every", 50) == 0:
            e, h = evaluate(), np.mean(hist[-50:], 0)
            print(
                f"{name} it {it} {time.time() - t0:.0f}s train ncc {h[0]:.4f} mse {h[1]:.4f} sm {h[2]:.5f} | "
                f"eval ncc id {e[0]:.4f} reg {e[1]:.4f} |dvf| {e[2]:.3f} lncc {e[3]:.4f}",
                flush=True,
            )


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]) if len(sys.argv) > 3 else {})
