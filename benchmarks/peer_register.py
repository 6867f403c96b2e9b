"""One registration by a peer method, run in the peers' own venv (no gvsl import).

``benchmarks/eval_registration.py`` starts this script once per pair and
peer, in a separate interpreter (the peers pin numpy/scipy versions the
project does not use, see EVALUATION.md), and passes file paths only:

    python benchmarks/peer_register.py METHOD FIXED MOVING MOVING_LABELS OUT_DIR [--threads N]

Every method writes the same three files on the fixed grid, so the harness
scores them all in one way:

* ``OUT_DIR/warped.nii.gz``: the moving image resampled onto the fixed grid;
* ``OUT_DIR/warped_labels.nii.gz``: the moving labels, nearest neighbour;
* ``OUT_DIR/dvf.nii.gz``: the whole transform (affine part included) as one
  ITK displacement field (LPS mm, ``moving_point = fixed_point + d``), the
  convention of ANTs' ``*Warp.nii.gz`` and of ``gvsl register --dvf``;

and ``OUT_DIR/result.json`` with the method's settings, the library versions
and ``seconds``: wall clock from before the inputs are read to after the
outputs are written (reading, registering, resampling, writing; interpreter
start-up and library import are not in it, the harness times those
separately as the whole process).

Methods (library defaults unless stated):

* ``ants``: ``ants.registration(type_of_transform="SyN")``: antspyx's
  default affine (Mattes MI) then SyN (Mattes MI, ``reg_iterations=(40, 20, 0)``);
* ``ants_quick``: ``type_of_transform="antsRegistrationSyNQuick[s]"``:
  rigid + affine + SyN as ANTs' ``antsRegistrationSyNQuick.sh`` does;
* ``elastix``: itk-elastix's default ``affine`` then ``bspline`` parameter maps;
* ``fireants``: FireANTs' quick-start recipe (documented defaults): affine
  (scales 4, 2, 1; 200, 100, 50 iterations; Adam lr 3e-3; CC kernel 5) then
  greedy compositive diffeomorphic CC (scales 4, 2, 1; 200, 100, 25
  iterations; CC kernel 5; gradient smoothing sigma 1; Adam lr 0.5), on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

METHODS = ("ants", "ants_quick", "elastix", "fireants")


def _versions(*dists: str) -> dict[str, str]:
    out = {}
    for d in dists:
        try:
            out[d] = metadata.version(d)
        except metadata.PackageNotFoundError:
            out[d] = "not installed"
    return out


def register_ants(fixed: str, moving: str, labels: str, out: Path, quick: bool) -> dict[str, Any]:
    """ANTs SyN (antspyx); the forward transforms are composed into one displacement field."""
    import ants

    kind = "antsRegistrationSyNQuick[s]" if quick else "SyN"
    f, m, lab = ants.image_read(fixed), ants.image_read(moving), ants.image_read(labels)
    tx = ants.registration(fixed=f, moving=m, type_of_transform=kind, outprefix=str(out / "ants_"))
    ants.image_write(tx["warpedmovout"], str(out / "warped.nii.gz"))
    warped_lab = ants.apply_transforms(f, lab, tx["fwdtransforms"], interpolator="nearestNeighbor")
    ants.image_write(warped_lab, str(out / "warped_labels.nii.gz"))
    composed = ants.apply_transforms(f, m, tx["fwdtransforms"], compose=str(out / "composed_"))
    os.replace(composed, out / "dvf.nii.gz")
    return {"type_of_transform": kind, "transforms": [Path(t).name for t in tx["fwdtransforms"]]}


def register_elastix(fixed: str, moving: str, labels: str, out: Path) -> dict[str, Any]:
    """elastix default affine + B-spline maps; transformix for the labels and the field."""
    import itk

    f, m = itk.imread(fixed, itk.F), itk.imread(moving, itk.F)
    params = itk.ParameterObject.New()
    params.AddParameterMap(params.GetDefaultParameterMap("affine"))
    params.AddParameterMap(params.GetDefaultParameterMap("bspline"))
    warped, tp = itk.elastix_registration_method(f, m, parameter_object=params, log_to_console=False)
    itk.imwrite(warped, str(out / "warped.nii.gz"))
    for i in range(tp.GetNumberOfParameterMaps()):
        tp.SetParameter(i, "FinalBSplineInterpolationOrder", "0")
        tp.SetParameter(i, "ResultImagePixelType", "float")
    lab = itk.imread(labels, itk.F)
    itk.imwrite(itk.transformix_filter(lab, tp), str(out / "warped_labels.nii.gz"))
    itk.imwrite(itk.transformix_deformation_field(m, tp), str(out / "dvf.nii.gz"))
    return {"parameter_maps": ["affine (default)", "bspline (default)"]}


def register_fireants(fixed: str, moving: str, labels: str, out: Path) -> dict[str, Any]:
    """FireANTs' quick-start affine + greedy recipe on the CPU; its own ANTs-format field writer."""
    import SimpleITK as sitk
    from fireants.interpolator import fireants_interpolator
    from fireants.io import BatchedImages, Image
    from fireants.registration.affine import AffineRegistration
    from fireants.registration.greedy import GreedyRegistration

    fixed_batch = BatchedImages([Image.load_file(fixed, device="cpu")])
    moving_batch = BatchedImages([Image.load_file(moving, device="cpu")])
    labels_batch = BatchedImages([Image.load_file(labels, device="cpu")])
    affine_settings = {"scales": [4, 2, 1], "iterations": [200, 100, 50], "optimizer": "Adam", "optimizer_lr": 3e-3}
    affine = AffineRegistration(
        affine_settings["scales"], affine_settings["iterations"], fixed_batch, moving_batch,
        optimizer="Adam", optimizer_lr=3e-3, cc_kernel_size=5,
    )  # fmt: skip
    affine.optimize()
    greedy_settings = {
        "scales": [4, 2, 1], "iterations": [200, 100, 25], "cc_kernel_size": 5, "deformation_type": "compositive",
        "smooth_grad_sigma": 1, "optimizer": "adam", "optimizer_lr": 0.5,
    }  # fmt: skip
    reg = GreedyRegistration(
        fixed_images=fixed_batch, moving_images=moving_batch,
        init_affine=affine.get_affine_matrix().detach(), **greedy_settings,
    )  # fmt: skip
    reg.optimize()
    moved = reg.evaluate(fixed_batch, moving_batch)
    coords = reg.get_warp_parameters(fixed_batch, labels_batch)
    moved_labels = fireants_interpolator(labels_batch(), **coords, mode="nearest", align_corners=True)
    reference = fixed_batch.images[0].itk_image
    for tensor, name in ((moved, "warped.nii.gz"), (moved_labels, "warped_labels.nii.gz")):
        img = sitk.GetImageFromArray(tensor[0, 0].detach().cpu().numpy())
        img.CopyInformation(reference)
        sitk.WriteImage(img, str(out / name))
    reg.save_as_ants_transforms(str(out / "dvf.nii.gz"))
    return {"affine": {**affine_settings, "cc_kernel_size": 5}, "greedy": greedy_settings, "device": "cpu"}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("method", choices=METHODS)
    ap.add_argument("fixed")
    ap.add_argument("moving")
    ap.add_argument("moving_labels")
    ap.add_argument("out", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    threads = str(args.threads)
    for var in ("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = threads
    args.out.mkdir(parents=True, exist_ok=True)
    args.out = args.out.resolve()
    args.fixed, args.moving, args.moving_labels = (str(Path(f).resolve()) for f in (args.fixed, args.moving,
                                                                                  args.moving_labels))  # fmt: skip
    os.chdir(args.out)  # transformix writes deformationField.nii into the working directory
    if args.method == "fireants":
        import torch

        torch.set_num_threads(args.threads)
        versions = _versions("fireants", "torch", "SimpleITK")
    elif args.method == "elastix":
        import itk  # noqa: F401 - imported before the clock starts, like the others

        versions = _versions("itk-elastix", "itk")
    else:
        import ants  # noqa: F401

        versions = _versions("antspyx")
    t0 = time.perf_counter()
    if args.method in ("ants", "ants_quick"):
        settings = register_ants(args.fixed, args.moving, args.moving_labels, args.out, args.method == "ants_quick")
    elif args.method == "elastix":
        settings = register_elastix(args.fixed, args.moving, args.moving_labels, args.out)
    else:
        settings = register_fireants(args.fixed, args.moving, args.moving_labels, args.out)
    seconds = time.perf_counter() - t0
    result = {"method": args.method, "seconds": seconds, "threads": args.threads, "versions": versions, **settings}
    (args.out / "result.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result), file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
