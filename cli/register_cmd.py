"""``gvsl register``: one pair, registered with the torch-free runtime or a running ``gvsl serve``.

The network's transform is refined for the pair (``refine.onnx``) unless
``--refine 0``; the command writes the warped image on the fixed grid and, on
request, the displacement field (ITK/ANTs convention), warped label maps, an
overview PNG and the quality figures as JSON, and prints those figures with
the seconds of every stage. No torch is imported unless ``--backend torch``
is chosen. Bad options, inputs or models stop with one line and exit 2,
before anything is written.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from gvsl.cli.app import MODALITY_HELP, app, err, user_errors
from gvsl.cli.runtime_options import (
    BACKEND_HELP,
    DEVICE_HELP,
    FALLBACK_HELP,
    MAX_VOXELS,
    MAX_VOXELS_HELP,
    SERVER_HELP,
    THREADS_HELP,
    choose_model,
    register_modality_option,
)
from gvsl.runtime.refine_options import RefineOptions, format_levels, parse_levels

#: the refinement defaults every front end shares (``gvsl register``, ``gvsl serve``, ``Registrar``)
REFINE_DEFAULTS = RefineOptions()


def _nifti_out(path: Path, what: str) -> Path:
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        raise typer.BadParameter(f"{what} {path}: give a .nii or .nii.gz file name")
    return path


def _stem(path: Path) -> str:
    name = path.name
    for suf in (".nii.gz", ".nii"):
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return path.stem


@app.command()
@user_errors
def register(
    fixed: Annotated[
        str, typer.Argument(help="Fixed image: NIfTI file or DICOM series folder (outputs use its grid).")
    ],
    moving: Annotated[str, typer.Argument(help="Moving image: NIfTI file or DICOM series folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Warped moving image on the fixed grid (.nii.gz).")],
    model: Annotated[
        Path | None,
        typer.Option(
            "--model",
            "-m",
            help="Export folder (gvsl export) or registration.onnx; model folder for torch. "
            "Default: the small model shipped with gvsl.",
        ),
    ] = None,
    server: Annotated[str | None, typer.Option(help=SERVER_HELP)] = None,
    dvf: Annotated[
        Path | None, typer.Option(help="Write the displacement field (ITK/ANTs convention, LPS mm, 5-D vector NIfTI).")
    ] = None,
    labels: Annotated[
        list[str] | None,
        typer.Option(help="Label map(s) of the moving image to warp (nearest neighbour); repeatable."),
    ] = None,
    labels_out: Annotated[
        list[Path] | None,
        typer.Option(help="Where to write each warped label map (default: LABELNAME_warped.nii.gz beside --out)."),
    ] = None,
    png: Annotated[
        Path | None, typer.Option(help="Overview PNG: fixed, moving, warped, checkerboard in three planes.")
    ] = None,
    metrics: Annotated[Path | None, typer.Option(help="Write the quality figures as JSON.")] = None,
    fixed_labels: Annotated[
        list[str] | None,
        typer.Option(
            help="Label map(s) of the fixed image, one per --labels in the same order: report the Dice of each "
            "warped moving label against them."
        ),
    ] = None,
    init: Annotated[
        str,
        typer.Option(
            help="Initial alignment: auto (world when the fields of view overlap by half or more, else moments), "
            "world (scanner frames), center (FOV centres) or moments (intensity centres of mass)."
        ),
    ] = "auto",
    refine: Annotated[
        int,
        typer.Option(
            help="Instance-refinement iterations at the coarsest pyramid level after the network, half as many at "
            "each finer level (greedy diffeomorphic local-CC ascent, refine.onnx); 0 = the network alone."
        ),
    ] = REFINE_DEFAULTS.iterations,
    refine_levels: Annotated[
        str,
        typer.Option(
            help="Refinement pyramid: spacings in mm, coarse to fine, e.g. 6,3 or 6,3,1.5 (along thick "
            "slices a level keeps half the slice spacing)."
        ),
    ] = format_levels(REFINE_DEFAULTS.levels),
    refine_affine: Annotated[
        int,
        typer.Option(
            help="Affine refinement iterations (local-CC ascent, refine_affine.onnx) on the coarsest level, "
            "before the network; 0 = none. Runs only when --refine is above 0."
        ),
    ] = REFINE_DEFAULTS.affine_iterations,
    network: Annotated[
        bool,
        typer.Option(
            help="Start the refinement from the registration network's prediction; --no-network starts it from "
            "the initial (and affine) alignment alone and skips the network: training-free, about 2x faster "
            "on a CPU for a chest CT, within 0.003 Dice after refinement (EVALUATION.md). Needs --refine above 0."
        ),
    ] = REFINE_DEFAULTS.network,
    similarity: Annotated[
        str,
        typer.Option(
            help="Refinement similarity: ncc (local normalised cross-correlation, one modality), mi (mutual "
            "information, refine_mi.onnx: two modalities, e.g. a CT onto an MR) or auto (mi when the two images are "
            "normalised as different modalities, by --modality auto or FIXED,MOVING; else ncc)."
        ),
    ] = REFINE_DEFAULTS.similarity,
    regularisation: Annotated[
        float,
        typer.Option(
            help="Refinement smoothness in [0, 1]: how far the field is pulled towards its smoothed self each "
            "iteration (higher = smoother, less detail)."
        ),
    ] = REFINE_DEFAULTS.regularisation,
    modality: Annotated[
        str,
        typer.Option(
            help=MODALITY_HELP + " FIXED,MOVING (e.g. mr,ct) sets each image's own, for a cross-modal pair; "
            "with --server the server's setting applies."
        ),
    ] = "auto",
    backend: Annotated[str, typer.Option(help=BACKEND_HELP)] = "auto",
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
    max_voxels: Annotated[int, typer.Option(help=MAX_VOXELS_HELP)] = MAX_VOXELS,
    threads: Annotated[int | None, typer.Option(help=THREADS_HELP)] = None,
    allow_cpu_fallback: Annotated[bool, typer.Option(help=FALLBACK_HELP)] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")] = False,
) -> None:
    """Register MOVING onto FIXED with a gvsl registration model.

    Writes the warped image on the fixed grid, and on request the displacement
    field, warped label maps, an overview PNG and the quality figures (NCC
    before/after, Jacobian determinant, folding).
    """
    import gvsl.torch_backend  # noqa: F401 - registers the torch backend for trained models (imports no torch)
    from gvsl.runtime import cpu_pool

    cpu_pool.set_threads(cpu_pool.check_threads(threads))
    options = RefineOptions(
        iterations=refine,
        levels=parse_levels(refine_levels),
        similarity=similarity,
        regularisation=regularisation,
        affine_iterations=refine_affine,
        network=network,
    )
    if fixed_labels and len(fixed_labels) != len(labels or []):
        raise typer.BadParameter(f"--fixed-labels: {len(fixed_labels)} given for {len(labels or [])} --labels")
    model = choose_model(model, server, backend, device)
    label_paths = list(labels or [])
    targets = _check_outputs(out, dvf, png, label_paths, list(labels_out or []))
    t0 = time.perf_counter()
    if server:
        res, backend_name = _register_on_server(
            server, fixed, moving, label_paths, fixed_labels, init, options, max_voxels
        )
    else:
        res, backend_name = _register_locally(
            model, backend, device, fixed, moving, label_paths, fixed_labels, init, options, max_voxels,
            threads, allow_cpu_fallback, modality,
        )  # fmt: skip
    seconds = time.perf_counter() - t0
    written = _write_results(res, fixed, moving, out, dvf, targets, png)
    if metrics is not None:
        written.append(_write_metrics(metrics, res, fixed, moving, seconds, backend_name))
    if not quiet:
        _print_report(res, backend_name, seconds, written)


def _check_outputs(out: Path, dvf: Path | None, png: Path | None, labels: list[str], targets: list[Path]) -> list[Path]:
    """Every output name checked before any work; returns where each warped label map goes
    (``--labels-out``, or ``LABELNAME_warped.nii.gz`` beside ``--out``)."""
    _nifti_out(out, "--out")
    if dvf is not None:
        _nifti_out(dvf, "--dvf")
    if png is not None and png.suffix.lower() != ".png":
        raise typer.BadParameter(f"--png {png}: give a .png file name")
    if targets and len(targets) != len(labels):
        raise typer.BadParameter(f"--labels-out: {len(targets)} given for {len(labels)} --labels")
    if not targets:
        targets = [out.parent / f"{_stem(Path(lab))}_warped.nii.gz" for lab in labels]
    for t in targets:
        _nifti_out(t, "--labels-out")
    return targets


def _register_on_server(
    server: str, fixed: str, moving: str, labels: list[str], fixed_labels: list[str] | None, init: str,
    options: RefineOptions, max_voxels: int,
) -> tuple[Any, str]:  # fmt: skip
    """The pair registered by a running ``gvsl serve``; returns the result and the server's backend."""
    from gvsl.runtime.client import GvslClient

    with GvslClient(server, max_voxels=max_voxels) as client:
        client.check([client.register_model])
        res = client.register(
            fixed, moving, labels=labels or None, fixed_labels=fixed_labels or None, init=init, refine=options
        )
    return res, client.name


def _register_locally(
    model: Path | None, backend: str, device: str, fixed: str, moving: str, labels: list[str],
    fixed_labels: list[str] | None, init: str, options: RefineOptions, max_voxels: int, threads: int | None,
    allow_cpu_fallback: bool, modality: str,
) -> tuple[Any, str]:  # fmt: skip
    """The pair registered in process by a :class:`~gvsl.runtime.register.Registrar`; returns the
    result and the backend's name."""
    from gvsl.runtime.register import Registrar

    with Registrar(
        model,
        backend,
        device,
        init=init,
        refine=options,
        max_voxels=max_voxels,
        threads=threads or 0,
        allow_cpu_fallback=allow_cpu_fallback,
        modality=register_modality_option(modality),
    ) as reg:
        res = reg.register(fixed, moving, labels=labels or None, fixed_labels=fixed_labels or None)
    return res, reg.backend.name


def _write_results(
    res: Any, fixed: str, moving: str, out: Path, dvf: Path | None, targets: list[Path], png: Path | None
) -> list[Path]:
    """The warped image, and on request the displacement field, the warped label maps and the
    overview PNG (each written atomically); returns the files written."""
    written = [res.save_warped(out)]
    if dvf is not None:
        written.append(res.save_dvf(dvf))
    if targets:
        written += res.save_labels(targets)
    if png is not None:
        written.append(res.save_png(png, title=f"{Path(moving).name} -> {Path(fixed).name}"))
    return written


def _write_metrics(path: Path, res: Any, fixed: str, moving: str, seconds: float, backend_name: str) -> Path:
    """The quality figures, transforms and stage times of the registration as JSON at ``path``."""
    from gvsl.runtime.io import save_text

    payload = {
        "fixed": str(fixed),
        "moving": str(moving),
        **res.metrics,
        "init": res.init,
        "dice": res.dice,
        "stages_seconds": res.stages,
        "refinement": res.refinement,
        "affine_refinement": res.affine_refinement,
        "initial_matrix": [[float(v) for v in row] for row in res.initial_matrix],
        "seconds": seconds,
        "network": res.network,
        "affine_network": res.matrix.tolist() if res.network else None,
        "affine_world_ras": res.world_matrix.tolist(),
        "backend": backend_name,
        "modality_fixed": res.modalities[0],
        "modality_moving": res.modalities[1],
    }
    return save_text(path, json.dumps(payload, indent=2) + "\n")


def _print_report(res: Any, backend_name: str, seconds: float, written: list[Path]) -> None:
    """The figures a user checks first (NCC, Jacobian, folding, alignment, refinement per level,
    Dice per label, seconds per stage) as a table on stderr, then the files written."""
    from rich.table import Table

    table = Table(title=f"gvsl register ({backend_name}, {seconds:.1f} s)", header_style="bold")
    table.add_column("figure")
    table.add_column("value", justify="right")
    m = res.metrics
    table.add_row("NCC before", f"{m['ncc_before']:.4f}")
    table.add_row("NCC after", f"{m['ncc_after']:.4f}")
    table.add_row("Jacobian det min", f"{m['jacobian_min']:.4f}")
    table.add_row("folding voxels", f"{m['folding_percent']:.4f} %")
    table.add_row("max displacement", f"{m['max_displacement_mm']:.2f} mm")
    if res.modalities[0] is not None:
        table.add_row("modality fixed / moving", f"{res.modalities[0]} / {res.modalities[1]}")
    table.add_row("initial alignment", res.init)
    if not res.network:
        table.add_row("network", "not run (--no-network)")
    if res.affine_refinement:
        a = res.affine_refinement
        kept = "kept" if a.get("kept") else "not kept"
        table.add_row(
            f"refine affine {a['spacing_mm']:g} mm",
            f"local CC {a['local_cc_before']:.4f} -> {a['local_cc_after']:.4f} ({kept})",
        )
    for level in res.refinement:
        figure = ("local CC", level["local_cc"]) if "local_cc" in level else ("MI", level["mutual_information"])
        table.add_row(f"refine {level['spacing_mm']:g} mm", f"{figure[0]} {figure[1]:.4f}")
    for name, scores in res.dice.items():
        for label, value in scores.items():
            table.add_row(f"Dice {Path(name).name} [{label}]", f"{value:.4f}")
    for stage, secs in res.stages.items():
        table.add_row(f"time: {stage}", f"{secs:.2f} s")
    err.print(table)
    for p in written:
        err.print(f"wrote {p}", highlight=False, markup=False)
