"""Downstream evaluation of a GVSL backbone on labelled volumes: linear probe and fine-tuning.

Pre-training is only worth something if the features help a downstream task.
Two standard measurements (the paper's Table 1 "linear" and "ft" columns):

* :func:`linear_probe` - the backbone is **frozen**; a 1x1x1 convolution (a
  per-voxel linear classifier) is trained on its dense local features. The
  features of each volume are computed once (whole volume, padded to a
  multiple of 16), so the probe is cheap even on CPU.
* :func:`finetune` - the same 1x1x1 head on top of the backbone, and the
  backbone is trained too, on random patches.

Both report Dice per class on held-out volumes and save (``save_downstream``):
the GVSL model (``model.safetensors`` + ``model.json``, unchanged by a probe,
updated by fine-tuning), which ``gvsl export`` turns into encoder/registration
graphs, and the head as ``head.npz`` (``weight [C, F]``, ``bias [C]``). The
head is a 1x1x1 conv on the encoder's ``features`` output, so it also runs
without torch on the runtime's dense features: :func:`apply_head`.

Input rules (each violation is one :class:`GvslInputError` naming the file):
every image needs a label map on the same grid; label values must be whole
numbers in ``0..num_classes-1``; a split needs at least one training and
one validation volume.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gvsl.runtime.errors import GvslInputError
from gvsl.runtime.io import load_labels
from gvsl.runtime.preprocess import (
    PreprocessConfig,
    Volume,
    load_volume,
    pad_to_multiple,
    preprocess,
    resample,
    to_canonical,
    unpad,
)

__all__ = [
    "Case",
    "DownstreamConfig",
    "DownstreamResult",
    "apply_head",
    "dice_scores",
    "find_pairs",
    "finetune",
    "linear_probe",
    "load_backbone",
    "load_cases",
    "save_downstream",
    "split_cases",
]

LABEL_SUFFIX = "_labels"


@dataclass
class Case:
    """One labelled volume on the model's preprocessed grid."""

    name: str
    image: np.ndarray  # [D, H, W] float32, normalised like training
    labels: np.ndarray  # [D, H, W] int64 in 0..C-1
    affine: np.ndarray


@dataclass
class DownstreamConfig:
    """Settings of a probe / fine-tuning run (saved beside the result).

    ``iterations`` optimiser steps; ``lr`` Adam learning rate (probe default
    1e-2: a linear layer; fine-tuning 1e-4 for the backbone, 10x for the
    head); ``voxels`` sampled voxels per probe step; ``patch_size`` of
    fine-tuning crops (multiples of 16); ``val_fraction`` of volumes held out
    when no explicit validation set is given.
    """

    num_classes: int
    iterations: int = 300
    lr: float | None = None
    voxels: int = 32768
    patch_size: tuple[int, int, int] = (48, 48, 48)
    batch_size: int = 1
    val_fraction: float = 0.25
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.num_classes < 2:
            raise GvslInputError(f"--classes {self.num_classes}: a segmentation needs at least 2 classes")
        if self.iterations < 1:
            raise GvslInputError(f"--iterations {self.iterations}: must be >= 1")
        self.patch_size = tuple(int(p) for p in self.patch_size)  # type: ignore[assignment]
        if len(self.patch_size) != 3 or any(p <= 0 or p % 16 for p in self.patch_size):
            raise GvslInputError(f"--patch-size {self.patch_size}: give multiples of 16")
        if not 0.0 < self.val_fraction < 1.0:
            raise GvslInputError(f"--val-fraction {self.val_fraction}: must be between 0 and 1")


@dataclass
class DownstreamResult:
    mode: str  # "probe" or "finetune"
    weight: np.ndarray  # [C, F]
    bias: np.ndarray  # [C]
    dice: dict[str, float]  # per class (1..C-1) and "mean", on the validation volumes
    per_case: list[dict[str, Any]]
    train_cases: list[str]
    val_cases: list[str]
    losses: list[float]
    seconds: float
    config: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- data
def _label_path(image: Path, suffix: str) -> Path:
    name = image.name
    for ext in (".nii.gz", ".nii"):
        if name.lower().endswith(ext):
            return image.with_name(name[: -len(ext)] + suffix + ext)
    return image.with_name(image.stem + suffix + image.suffix)


def find_pairs(
    images: Sequence[str | os.PathLike[str]],
    labels: Sequence[str | os.PathLike[str]] | None = None,
    suffix: str = LABEL_SUFFIX,
) -> list[tuple[Path, Path]]:
    """Pair images with label maps: explicitly (same count, same order) or, without
    ``labels``, by name (``X.nii.gz`` -> ``X{suffix}.nii.gz`` beside it). Files whose
    name already ends with the suffix are label maps, not images."""
    from gvsl.data import list_volumes

    files = [p for p in list_volumes(images) if not _stem(p).endswith(suffix)]
    if labels:
        lab = list_volumes(labels)
        if len(lab) != len(files):
            raise GvslInputError(
                f"{len(files)} images but {len(lab)} label maps; give one label map per image, in the same order"
            )
        return list(zip(files, lab, strict=True))
    pairs = []
    for f in files:
        lp = _label_path(f, suffix)
        if not lp.is_file():
            raise GvslInputError(
                f"{f}: no label map {lp.name} beside it; add it, or pass the label maps with --labels", str(f)
            )
        pairs.append((f, lp))
    return pairs


def _stem(p: Path) -> str:
    name = p.name
    for ext in (".nii.gz", ".nii"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return p.stem


def load_cases(
    pairs: Sequence[tuple[str | os.PathLike[str], str | os.PathLike[str]]], pre: PreprocessConfig, num_classes: int
) -> list[Case]:
    """Preprocess images exactly as the model's training did and bring each label map
    onto the same grid (RAS+, nearest-neighbour resampling), checking it fits."""
    cases = []
    for img_path, lab_path in pairs:
        vol = load_volume(img_path)
        lab, lab_aff, _ = load_labels(str(lab_path))
        if lab.shape != vol.data.shape or not np.allclose(lab_aff, vol.affine, atol=1e-3):
            raise GvslInputError(
                f"{lab_path}: label map is not on the grid of {img_path} (shape {lab.shape} vs {vol.data.shape}, "
                "or a different affine); resample it onto the image",
                str(lab_path),
            )
        values = np.unique(lab)
        bad = values[(values < 0) | (values >= num_classes)]
        if bad.size:
            raise GvslInputError(
                f"{lab_path}: label values {bad.tolist()[:8]} are outside the declared classes 0..{num_classes - 1}; "
                "fix the labels or pass --classes with the right number of classes",
                str(lab_path),
            )
        img = preprocess(vol, pre)
        lv = Volume(lab.astype(np.float32), vol.affine, str(lab_path))
        if pre.canonical:
            lv = to_canonical(lv)
        if pre.spacing is not None:
            lv = resample(lv, pre.spacing, order=0)
        if lv.data.shape != img.data.shape:  # cannot happen with the shared resampler; guard anyway
            raise GvslInputError(f"{lab_path}: labels resampled to {lv.data.shape}, image to {img.data.shape}")
        cases.append(Case(_stem(Path(img_path)), img.data, np.rint(lv.data).astype(np.int64), img.affine))
    return cases


def split_cases(
    cases: Sequence[Case], val_fraction: float, seed: int, val: Sequence[Case] | None = None
) -> tuple[list[Case], list[Case]]:
    """(train, validation): the explicit validation set, or a seeded random hold-out."""
    if val:
        if not cases:
            raise GvslInputError("no training volumes; give at least one labelled image to train on")
        return list(cases), list(val)
    if len(cases) < 2:
        raise GvslInputError(
            f"{len(cases)} labelled volume(s): too few for a train/validation split; give at least 2 "
            "(or pass --val volumes)"
        )
    order = np.random.default_rng(seed).permutation(len(cases))
    n_val = min(len(cases) - 1, max(1, int(round(val_fraction * len(cases)))))
    vi = set(order[:n_val].tolist())
    return [c for i, c in enumerate(cases) if i not in vi], [c for i, c in enumerate(cases) if i in vi]


# ----------------------------------------------------------------------------- model
def load_backbone(model: str | os.PathLike[str] | None, widths: str = "small", seed: int = 0) -> tuple[Any, dict]:
    """A GVSL model to probe: a trained folder / .safetensors / official .pth, or
    ``None`` / ``"random"`` for a randomly initialised one (the scratch baseline)."""
    import torch

    from gvsl.config import ModelConfig
    from gvsl.io import WeightsError, load_model
    from gvsl.model import GVSL

    if model is None or str(model) == "random":
        torch.manual_seed(seed)
        net = GVSL(ModelConfig.from_preset(widths))
        return net, {"model": net.config.to_dict(), "preprocess": {}, "source": "random"}
    try:
        net, meta = load_model(model)
    except WeightsError as e:
        raise GvslInputError(str(e), str(model)) from None
    return net, {**meta, "source": str(model)}


def _features(net: Any, image: np.ndarray, device: Any) -> Any:
    """Dense local features ``[F, D, H, W]`` of a whole volume (padded to 16, cropped back)."""
    import torch

    padded, pads = pad_to_multiple(image, 16)
    x = torch.from_numpy(np.ascontiguousarray(padded, dtype=np.float32))[None, None].to(device)
    return unpad(net.encode(x)[1][0], pads)


# ----------------------------------------------------------------------------- metrics
def dice_scores(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> dict[str, float]:
    """Dice of every foreground class (1..C-1) and their mean; a class absent from
    both counts as 1 (nothing to find, nothing found)."""
    out = {}
    for c in range(1, num_classes):
        a, b = pred == c, truth == c
        tot = int(a.sum()) + int(b.sum())
        out[str(c)] = 1.0 if tot == 0 else 2.0 * int((a & b).sum()) / tot
    out["mean"] = float(np.mean([out[str(c)] for c in range(1, num_classes)]))
    return out


def apply_head(features: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Torch-free segmentation from dense features ``[F, ...]`` (e.g. the runtime's
    ``Embedder.embed(x, dense=True).features``): argmax of ``W f + b`` per voxel."""
    logits = np.einsum("cf,f...->c...", np.asarray(weight, np.float32), np.asarray(features, np.float32))
    logits += np.asarray(bias, np.float32).reshape(-1, *([1] * (logits.ndim - 1)))
    return np.argmax(logits, axis=0).astype(np.uint8)


def _evaluate(net: Any, head: Any, cases: Sequence[Case], num_classes: int, device: Any) -> tuple[dict, list]:
    import torch

    per_case = []
    with torch.no_grad():
        for c in cases:
            f = _features(net, c.image, device)
            pred = head(f[None])[0].argmax(0).cpu().numpy()
            per_case.append({"case": c.name, **dice_scores(pred, c.labels, num_classes)})
    keys = [str(k) for k in range(1, num_classes)] + ["mean"]
    return {k: float(np.mean([p[k] for p in per_case])) for k in keys}, per_case


def _seg_loss(logits: Any, target: Any, num_classes: int) -> Any:
    """Cross-entropy + soft Dice over foreground classes (logits ``[N, C, ...]``)."""
    import torch
    import torch.nn.functional as functional

    ce = functional.cross_entropy(logits, target)
    prob = logits.softmax(1)
    onehot = functional.one_hot(target, num_classes).movedim(-1, 1).to(prob.dtype)
    dims = tuple(d for d in range(prob.ndim) if d != 1)
    inter = (prob * onehot).sum(dims)
    den = prob.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + 1e-5) / (den + 1e-5)
    return ce + (1 - dice[1:]).mean() if num_classes > 1 else ce + torch.zeros(())


# ----------------------------------------------------------------------------- training
Log = Callable[[str], None]


def linear_probe(
    net: Any, train: Sequence[Case], val: Sequence[Case], cfg: DownstreamConfig, log: Log | None = None
) -> DownstreamResult:
    """Frozen backbone + 1x1x1 conv: logistic regression on dense features, trained
    on ``cfg.voxels`` random voxels of the training volumes per step."""
    import torch

    t0 = time.perf_counter()
    dev = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    net = net.to(dev).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        feats = [_features(net, c.image, dev).reshape(net.config.feature_dim, -1) for c in train]
    X = torch.cat(feats, dim=1).T.contiguous()  # [V, F]
    y = torch.from_numpy(np.concatenate([c.labels.reshape(-1) for c in train])).to(dev)
    mu, sd = X.mean(0), X.std(0).clamp_min(1e-6)  # standardise for a well-conditioned problem, fold back later
    Xs = (X - mu) / sd
    lin = torch.nn.Linear(X.shape[1], cfg.num_classes).to(dev)
    opt = torch.optim.Adam(lin.parameters(), lr=cfg.lr or 1e-2)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    losses = []
    for step in range(cfg.iterations):
        idx = torch.randint(0, Xs.shape[0], (min(cfg.voxels, Xs.shape[0]),), generator=gen).to(dev)
        loss = _seg_loss(lin(Xs[idx]), y[idx], cfg.num_classes)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if log and (step + 1) % max(1, cfg.iterations // 5) == 0:
            log(f"probe step {step + 1}/{cfg.iterations} loss {losses[-1]:.4f}")
    with torch.no_grad():
        w = lin.weight / sd[None, :]
        b = lin.bias - (lin.weight * (mu / sd)[None, :]).sum(1)
    return _finish("probe", net, _conv_head(w, b), train, val, cfg, losses, t0)


def _conv_head(w: Any, b: Any) -> Any:
    import torch

    conv = torch.nn.Conv3d(w.shape[1], w.shape[0], 1).to(w.device)
    with torch.no_grad():
        conv.weight.copy_(w.reshape(*w.shape, 1, 1, 1))
        conv.bias.copy_(b)
    return conv


def _cfg_dict(cfg: DownstreamConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d["patch_size"] = list(cfg.patch_size)
    return d


def _patch(case: Case, size: tuple[int, int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random crop (zero / background padded where the volume is smaller)."""
    img, lab = case.image, case.labels
    sl = []
    for n, p in zip(img.shape, size, strict=True):
        start = int(rng.integers(0, n - p + 1)) if n > p else 0
        sl.append(slice(start, start + p))
    a, b = img[tuple(sl)], lab[tuple(sl)]
    pad = [(0, p - s) for s, p in zip(a.shape, size, strict=True)]
    return np.pad(a, pad), np.pad(b, pad)


def finetune(
    net: Any, train: Sequence[Case], val: Sequence[Case], cfg: DownstreamConfig, log: Log | None = None
) -> DownstreamResult:
    """Backbone + 1x1x1 head trained together on random patches (CE + Dice); the
    backbone at ``lr``, the new head at 10x."""
    import torch

    t0 = time.perf_counter()
    dev = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    net = net.to(dev).train()
    head = torch.nn.Conv3d(net.config.feature_dim, cfg.num_classes, 1).to(dev)
    lr = cfg.lr or 1e-4
    opt = torch.optim.Adam([{"params": net.unet.parameters(), "lr": lr}, {"params": head.parameters(), "lr": 10 * lr}])
    rng = np.random.default_rng(cfg.seed)
    losses = []
    for step in range(cfg.iterations):
        xs, ys = zip(
            *(_patch(train[int(rng.integers(len(train)))], cfg.patch_size, rng) for _ in range(cfg.batch_size)),
            strict=True,
        )
        x = torch.from_numpy(np.stack(xs)[:, None].astype(np.float32)).to(dev)
        y = torch.from_numpy(np.stack(ys)).to(dev)
        loss = _seg_loss(head(net.encode(x)[1]), y, cfg.num_classes)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            raise GvslInputError(f"fine-tuning loss became {losses[-1]} at step {step + 1}; lower --lr")
        if log and (step + 1) % max(1, cfg.iterations // 5) == 0:
            log(f"finetune step {step + 1}/{cfg.iterations} loss {losses[-1]:.4f}")
    net.eval()
    return _finish("finetune", net, head, train, val, cfg, losses, t0)


def _finish(
    mode: str, net: Any, head: Any, train: Sequence[Case], val: Sequence[Case], cfg: DownstreamConfig,
    losses: list[float], t0: float,
) -> DownstreamResult:  # fmt: skip
    """Validation Dice of backbone + 1x1x1 ``head`` and the result record both modes return."""
    import torch

    dice, per_case = _evaluate(net, head, val, cfg.num_classes, torch.device(cfg.device))
    w = head.weight.detach().reshape(cfg.num_classes, -1)
    return DownstreamResult(
        mode,
        w.cpu().numpy(),
        head.bias.detach().cpu().numpy(),
        dice,
        per_case,
        [c.name for c in train],
        [c.name for c in val],
        losses,
        time.perf_counter() - t0,
        _cfg_dict(cfg),
    )


# ----------------------------------------------------------------------------- saving
def save_downstream(
    out: str | os.PathLike[str],
    net: Any,
    meta: dict[str, Any],
    result: DownstreamResult,
    patch_size: Sequence[int],
    class_names: Sequence[str] | None = None,
) -> Path:
    """Write ``model.safetensors`` + ``model.json`` (exportable with ``gvsl export``),
    ``head.npz`` and ``metrics.json``; returns the folder."""
    from gvsl.io import save_model
    from gvsl.runtime.io import save_npz, save_text

    out = Path(out)
    save_model(
        net.cpu(),
        out,
        preprocess=meta.get("preprocess") or {},
        extra={"patch_size": list(patch_size), "downstream": {"mode": result.mode, "source": meta.get("source")}},
    )
    names = list(class_names) if class_names else [str(i) for i in range(result.weight.shape[0])]

    save_npz(
        out / "head.npz",
        weight=result.weight.astype(np.float32),
        bias=result.bias.astype(np.float32),
        classes=np.array(names),
    )
    payload = {
        "mode": result.mode,
        "source": meta.get("source"),
        "dice": result.dice,
        "per_case": result.per_case,
        "train_cases": result.train_cases,
        "val_cases": result.val_cases,
        "final_loss": result.losses[-1] if result.losses else None,
        "seconds": result.seconds,
        "config": result.config,
    }
    save_text(out / "metrics.json", json.dumps(payload, indent=2) + "\n")
    return out
