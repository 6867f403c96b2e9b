"""``gvsl export`` and ``gvsl info``: deployment artifacts and what they are."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from gvsl.cli.app import app, err, progress_bar, user_errors


def _shape4(text: str) -> tuple[int, int, int, int]:
    from gvsl.export.tensorrt_build import parse_shape

    return parse_shape(text, "--verify-shape")


@app.command()
@user_errors
def export(
    source: Annotated[
        Path, typer.Argument(help="A gvsl run folder, a model.safetensors (or its folder), or an official GVSL .pth.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (created atomically).")],
    format: Annotated[
        str, typer.Option("--format", help="onnx (ONNX Runtime), engine (TensorRT, needs a GPU) or all.")
    ] = "onnx",
    precision: Annotated[
        str, typer.Option(help="Comma-separated: fp32, fp16 (ONNX and engines), bf16 (engines only).")
    ] = "fp32",
    opset: Annotated[int, typer.Option(help="ONNX opset (11..20; 20+ for --warp grid_sample).")] = 17,
    warp: Annotated[
        str, typer.Option(help="Registration warp: gather (TensorRT-buildable, default) or grid_sample (opset 20).")
    ] = "gather",
    dense: Annotated[bool, typer.Option(help="Encoder also outputs dense local features [N,F,D,H,W].")] = True,
    verify: Annotated[bool, typer.Option(help="Check parity with PyTorch before writing anything.")] = True,
    verify_shape: Annotated[
        list[str] | None,
        typer.Option(help="N,D,H,W of random verification inputs (repeatable; default 2,32,32,32 and 1,16,32,48)."),
    ] = None,
    verify_data: Annotated[
        list[Path] | None, typer.Option(help="Real NIfTI volumes to verify on too (repeatable).")
    ] = None,
    simplify: Annotated[bool, typer.Option(help="Fold constants / drop redundant nodes (parity-checked).")] = True,
    widths: Annotated[
        str | None, typer.Option(help="Widths of a .pth checkpoint: default, small, tiny or nine numbers.")
    ] = None,
    official_affine: Annotated[
        bool,
        typer.Option(
            "--official-affine",
            help="Official .pth: register with the released affine head (never trained upstream) "
            "instead of the identity affine.",
        ),
    ] = False,
    min_shape: Annotated[
        list[str] | None, typer.Option(help="TensorRT profile minimum N,D,H,W (repeat for more profiles).")
    ] = None,
    opt_shape: Annotated[list[str] | None, typer.Option(help="TensorRT profile optimum N,D,H,W.")] = None,
    max_shape: Annotated[list[str] | None, typer.Option(help="TensorRT profile maximum N,D,H,W.")] = None,
    workspace: Annotated[float, typer.Option(help="TensorRT workspace limit in GiB.")] = 4.0,
    timing_cache: Annotated[
        Path | None, typer.Option(help="TensorRT timing cache file (default ~/.cache/gvsl/, per GPU and version).")
    ] = None,
    triton_repo: Annotated[
        Path | None, typer.Option(help="Also write a Triton model repository (gvsl_encoder, gvsl_registration).")
    ] = None,
    triton_backend: Annotated[
        str, typer.Option(help="auto (tensorrt when engines are built), onnxruntime or tensorrt.")
    ] = "auto",
    triton_max_batch: Annotated[int, typer.Option(help="Triton max_batch_size (dynamic batching).")] = 4,
    force: Annotated[bool, typer.Option(help="Replace a non-empty --out / --triton-repo.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress; errors only.")] = False,
) -> None:
    """Export a GVSL model to ONNX / TensorRT with metadata, verified against PyTorch.

    Writes encoder.onnx (image -> embedding, features) and registration.onnx
    (fixed, moving -> affine, dvf, warped), fp16 variants, engines and
    manifest.json. Examples:
    `gvsl export runs/ct -o export/ct`;
    `gvsl export GVSL_epoch_1000.pth -o export/official --precision fp32,fp16`;
    `gvsl export runs/ct -o export/trt --format all --precision fp16 --min-shape 1,64,64,64
    --opt-shape 1,128,128,128 --max-shape 4,128,128,128 --triton-repo models/`.
    """
    from gvsl.export.pipeline import ExportOptions, run_export

    opts = ExportOptions(
        format=format,
        precisions=tuple(p.strip() for p in precision.split(",") if p.strip()),
        opset=opset,
        warp=warp,
        dense=dense,
        verify=verify,
        simplify=simplify,
        widths=widths,
        official_affine=official_affine,
        min_shapes=tuple(min_shape or ()),
        opt_shapes=tuple(opt_shape or ()),
        max_shapes=tuple(max_shape or ()),
        workspace_gib=workspace,
        timing_cache=str(timing_cache) if timing_cache else None,
        triton_repo=str(triton_repo) if triton_repo else None,
        triton_backend=triton_backend,
        triton_max_batch=triton_max_batch,
        force=force,
        verify_data=tuple(str(p) for p in verify_data or ()),
    )
    if verify_shape:
        opts.verify_shapes = tuple(_shape4(s) for s in verify_shape)
    progress = progress_bar(quiet, elapsed=True)
    tasks: list[Any] = []  # the bar starts with the first step, so option errors print alone

    def on_step(label: str, done: int, total: int) -> None:
        if not tasks:
            progress.start()
            tasks.append(progress.add_task(label, total=total))
        progress.update(tasks[0], description=label, completed=done, total=total)

    try:
        manifest = run_export(
            source,
            out,
            opts,
            progress=on_step,
            log=(lambda s: None) if quiet else (lambda s: err.print(s, soft_wrap=True, highlight=False)),
        )
    finally:
        if tasks:
            progress.stop()
    if not quiet:
        for a in manifest["artifacts"]:
            worst = _worst(a.get("parity", []))
            err.print(
                f"  {a['file']}  {a['precision']}  {a['bytes'] / 2**20:.1f} MiB  {worst}",
                highlight=False,
                soft_wrap=True,
            )
        if manifest.get("triton"):
            err.print(
                f"  Triton repository: {manifest['triton']['repository']} ({manifest['triton']['backend']})",
                soft_wrap=True,
            )
        err.print(f"done: {len(manifest['artifacts'])} artifact(s) in {out}", soft_wrap=True)


def _affine_head_line(model: dict[str, Any]) -> str:
    from gvsl.export.pipeline import AFFINE_IDENTITY_NOTE

    return AFFINE_IDENTITY_NOTE if model.get("affine_head") == "identity" else "the affine head's output (trained)"


def _worst(parity: list[dict[str, Any]]) -> str:
    if not parity:
        return "not verified"
    if "max_abs" in parity[0]:  # the refinement graph: its field after N iterations against torch
        return f"parity ok: field max |diff| {parity[0]['max_abs']:.1e} after {parity[0]['iterations']} iterations"
    rel = max(o["rel"] for r in parity for o in r["outputs"].values())
    cos = min(o["cosine"] for r in parity for o in r["outputs"].values())
    return f"parity ok: max rel err {rel:.1e}, min cosine {cos:.6f}"


@app.command()
@user_errors
def info(
    artifact: Annotated[
        Path, typer.Argument(help="An .onnx, .engine/.plan, Triton config.pbtxt, or a gvsl export folder.")
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
) -> None:
    """Print what an exported artifact is: inputs, outputs, metadata, sha256."""
    from gvsl.export.manifest import describe

    d = describe(artifact)
    if as_json:
        typer.echo(json.dumps(d, indent=2))
        return
    typer.echo(f"{d['type']}: {d['path']}")
    if d["type"] == "export folder":
        m = d["manifest"]
        typer.echo(f"  source: {m['source']['path']} ({m['source']['kind']}, sha256 {m['source']['weights_sha256']})")
        typer.echo(f"  model widths: {m['model']['widths']}  patch: {m['patch_size']} ({m['patch_size_from']})")
        typer.echo(f"  preprocess: {json.dumps(m['preprocess'])}")
        typer.echo(f"  registration affine: {_affine_head_line(m['model'])}")
        for a in m["artifacts"]:
            typer.echo(f"  {a['file']}: {a['kind']} {a['format']} {a['precision']} sha256 {a['sha256']}")
        if m.get("triton"):
            typer.echo(f"  triton: {m['triton']['repository']} ({m['triton']['backend']})")
        return
    for key in ("sha256", "bytes", "opset", "nodes", "name", "backend", "max_batch_size"):
        if key in d:
            typer.echo(f"  {key}: {d[key]}")
    for key in ("inputs", "outputs"):
        if key in d:
            typer.echo(f"  {key}:")
            for name, shape in d[key].items():
                typer.echo(f"    {name}: {shape}")
    from gvsl.runtime import artifact

    model_meta = d.get("metadata", {}).get(artifact.META_MODEL)
    if d.get("metadata", {}).get(artifact.META_KIND) == artifact.REGISTRATION and isinstance(model_meta, dict):
        typer.echo(f"  registration affine: {_affine_head_line(model_meta)}")
    if "metadata" in d:
        typer.echo("  metadata:")
        for k, v in d["metadata"].items():
            typer.echo(f"    {k}: {json.dumps(v) if not isinstance(v, str) else v}")
    if "tensorrt_compatible" in d:
        typer.echo(f"  tensorrt compatible: {d['tensorrt_compatible']}")
        for issue in d["tensorrt_issues"]:
            typer.echo(f"    {issue}")
    for key in ("manifest", "warning", "note"):
        if key in d:
            typer.echo(f"  {key}: {json.dumps(d[key]) if not isinstance(d[key], str) else d[key]}")
