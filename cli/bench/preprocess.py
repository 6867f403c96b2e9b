"""The preprocessing benchmark: gvsl's read + RAS+ + 1 mm + CT window against SimpleITK.

SimpleITK's linear ``Resample`` is the peer (benchmark only: ``gvsl[bench]``);
gvsl's chain is timed as ``Embedder.prepare`` and the training cache run it
(:func:`gvsl.runtime.preprocess.load_preprocessed`), and, for ``.nii.gz``,
without the overlapped read and with zlib instead of ISA-L, so the table shows
what each of the two buys.
"""

from __future__ import annotations

import importlib.util
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gvsl.cli.bench.machine import summarize

__all__ = ["bench_preprocess"]


def _ct_volume(shape: Sequence[int], seed: int = 0) -> np.ndarray:
    """A CT-like int16 HU volume: smooth structures plus noise (content does not change
    the speed of resampling; it sets how well gzip compresses)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    coarse = rng.normal(0.0, 400.0, size=tuple(max(2, s // 8) for s in shape)).astype(np.float32)
    vol = ndimage.zoom(coarse, [s / c for s, c in zip(shape, coarse.shape, strict=True)], order=1)
    vol = vol[: shape[0], : shape[1], : shape[2]] + rng.normal(0.0, 20.0, size=tuple(shape)).astype(np.float32)
    return np.clip(vol, -1024, 3000).astype(np.int16)


def bench_preprocess(
    shape: Sequence[int] = (512, 512, 300),
    spacing: Sequence[float] = (0.7, 0.7, 1.0),
    repeats: int = 5,
    formats: Sequence[str] = ("nii", "nii.gz"),
    workdir: Path | None = None,
) -> list[dict[str, Any]]:
    """gvsl's read + RAS+ reorientation + 1 mm resampling + CT normalisation of a
    NIfTI against SimpleITK's linear resampling of the same volume, interleaved.

    The file is stored LPS like DICOM-derived NIfTIs (x and y flipped), so
    reorientation is real work. SimpleITK rows: ``Resample`` alone (image
    already in memory) and ``ReadImage`` + ``Resample``.
    """
    import nibabel as nib

    from gvsl.runtime.preprocess import (
        PreprocessConfig,
        load_preprocessed,
        load_volume,
        preprocess,
        resample,
        to_canonical,
    )

    workdir = Path(workdir or tempfile.mkdtemp(prefix="gvsl-bench-pre-"))
    workdir.mkdir(parents=True, exist_ok=True)
    data = _ct_volume(shape)
    affine = np.diag([-float(spacing[0]), -float(spacing[1]), float(spacing[2]), 1.0])
    affine[:3, 3] = (0.5 * shape[0] * spacing[0], 0.5 * shape[1] * spacing[1], -0.5 * shape[2] * spacing[2])
    files = {}
    for fmt in formats:
        files[fmt] = workdir / f"ct.{fmt}"
        nib.save(nib.Nifti1Image(data, affine), files[fmt])
    del data
    cfg = PreprocessConfig(spacing=(1.0, 1.0, 1.0), modality="ct")
    cases: dict[str, Callable[[], Any]] = {}
    for fmt, p in files.items():
        # as Embedder.prepare and the training cache read files (load_preprocessed)
        cases[f"gvsl read+reorient+resample+normalise (.{fmt})"] = lambda p=p: load_preprocessed(p, cfg)
    if "nii.gz" in files:
        # what the overlap buys (read, then preprocess: load_preprocessed's plain path) and what ISA-L
        # buys (the same chain with nibabel's zlib reader)
        gz = files["nii.gz"]
        cases["gvsl read+reorient+resample+normalise (.nii.gz, ISA-L, no overlap)"] = lambda: preprocess(
            load_volume(gz, keep_dtype=True), cfg
        )
        cases["gvsl read+reorient+resample+normalise (.nii.gz, zlib inflate)"] = lambda: preprocess(
            load_volume(gz, keep_dtype=True, isal=False), cfg
        )
    canon = to_canonical(load_volume(files[formats[0]]))
    cases["gvsl resample only (in memory)"] = lambda: resample(canon, 1.0)
    sitk_note = None
    if importlib.util.find_spec("SimpleITK") is not None:
        import SimpleITK as sitk

        def sitk_resample(img: Any) -> Any:
            sp, sz = img.GetSpacing(), img.GetSize()
            new = [int(round(s * p)) for s, p in zip(sz, sp, strict=True)]
            return sitk.Resample(img, new, sitk.Transform(), sitk.sitkLinear, img.GetOrigin(), (1.0, 1.0, 1.0),
                                 img.GetDirection(), 0.0, sitk.sitkFloat32)  # fmt: skip

        img = sitk.ReadImage(str(files[formats[0]]), sitk.sitkFloat32)
        cases["SimpleITK Resample, linear (in memory)"] = lambda: sitk_resample(img)
        for fmt, p in files.items():
            cases[f"SimpleITK ReadImage+Resample (.{fmt})"] = lambda p=p: sitk_resample(
                sitk.ReadImage(str(p), sitk.sitkFloat32)
            )
        sitk_note = f"SimpleITK threads: {sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()}"
    times: dict[str, list[float]] = {k: [] for k in cases}
    for fn in cases.values():  # warm the page cache and the code paths
        fn()
    names = list(cases)
    for r in range(repeats):
        # rotate the order each round: no case always runs right after the same other one
        for k in names[r % len(names) :] + names[: r % len(names)]:
            t = time.perf_counter()
            cases[k]()
            times[k].append(time.perf_counter() - t)
    ref_key = "SimpleITK Resample, linear (in memory)"
    ref = statistics.median(times[ref_key]) if ref_key in times else None
    out = []
    for k in cases:
        st = summarize(times[k])
        rec = {"kind": "preprocess", "case": k, "shape": list(shape), "spacing": list(spacing), "time_s": st}
        if ref is not None:
            rec["x_sitk_resample"] = st["median"] / ref
        # the like-for-like peer: SimpleITK reading the same file and resampling it
        fmt = "nii.gz" if ".nii.gz" in k else "nii" if ".nii)" in k else None
        peer = f"SimpleITK ReadImage+Resample (.{fmt})"
        if fmt and peer in times:
            rec["x_sitk_read_resample"] = st["median"] / statistics.median(times[peer])
        if sitk_note:
            rec["note"] = sitk_note
        out.append(rec)
    for p in files.values():
        p.unlink(missing_ok=True)
    return out
