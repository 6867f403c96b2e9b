"""``gvsl bench``: inference, training and preprocessing speed on this machine.

Every backend the machine can run is measured side by side (rounds
interleaved, medians), against torch eager fp32 in the same run; a table goes
to the screen and everything (machine, versions, command, every timing) to a
JSON file. torch is imported only when a torch backend or ``--train`` needs it.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from gvsl.cli.app import app, err, parse_triple, user_errors
from gvsl.runtime.atomic import save_text


def _ints(text: str, what: str) -> list[int]:
    try:
        out = [int(x) for x in text.replace("x", ",").split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"{what}: give comma-separated numbers, got {text!r}") from None
    if not out or any(v < 1 for v in out):
        raise typer.BadParameter(f"{what}: give positive numbers, got {text!r}")
    return out


def _table(title: str, head: list[str], rows: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title, show_lines=False, header_style="bold")
    for h in head:
        t.add_column(h, overflow="fold")
    for r in rows:
        t.add_row(*r)
    Console(stderr=False, width=max(160, len(head) * 14)).print(t)


@app.command()
@user_errors
def bench(
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="Trained model folder / .pth (torch + exported ONNX), or an export folder (ONNX/TensorRT only). "
            "Default: random weights of --widths (speed does not depend on weights).",
        ),
    ] = None,
    widths: Annotated[str, typer.Option(help="Width preset or nine numbers when no --model is given.")] = "default",
    kind: Annotated[str, typer.Option(help="encoder, registration or both (comma-separated).")] = "encoder",
    sizes: Annotated[str | None, typer.Option(help="Cube edges, e.g. 64,128 (default 64 on CPU, 128 on GPU).")] = None,
    batch: Annotated[str, typer.Option(help="Batch sizes, e.g. 1,8.")] = "1,8",
    backend: Annotated[
        str,
        typer.Option(
            help="all (every backend this device can run; torch-compile is opt-in on CPU) or a comma-separated "
            "list of: torch, torch-bf16, torch-fp16, torch-compile, torch-cudagraph, onnxruntime, "
            "onnxruntime-int8, ort-cuda, ort-cuda-fp16, ort-tensorrt, tensorrt-fp16, tensorrt-bf16. "
            "`tensorrt` means both native TensorRT precisions."
        ),
    ] = "all",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    repeats: Annotated[int, typer.Option(help="Timed rounds (every backend once per round).")] = 5,
    warmup: Annotated[int, typer.Option(help="Untimed calls per backend before the rounds.")] = 1,
    memory: Annotated[
        bool, typer.Option(help="Peak host/device memory from a fresh process per case (costs two more calls).")
    ] = True,
    threads: Annotated[int, typer.Option(help="CPU threads for torch and ONNX Runtime (0 = library default).")] = 0,
    int8_calibration: Annotated[
        list[str] | None,
        typer.Option(help="Volumes to calibrate the int8 mode on (default: nilearn's MNI T1 template)."),
    ] = None,
    eval_volume: Annotated[
        list[str] | None,
        typer.Option(help="Volumes the inputs are cut from (default: nilearn's MNI GM/WM maps, held out)."),
    ] = None,
    train: Annotated[bool, typer.Option("--train", help="Also measure training samples/s.")] = False,
    train_only: Annotated[bool, typer.Option("--train-only", help="Training only (no inference).")] = False,
    train_sizes: Annotated[str | None, typer.Option(help="Training patch edges (default: --sizes).")] = None,
    train_batch: Annotated[int, typer.Option(help="Batch of gvsl's training step.")] = 4,
    compile: Annotated[bool, typer.Option(help="torch.compile gvsl's training step.")] = False,
    preprocess: Annotated[
        bool, typer.Option("--preprocess", help="Also time CT preprocessing against SimpleITK.")
    ] = False,
    preprocess_only: Annotated[bool, typer.Option("--preprocess-only", help="Preprocessing only.")] = False,
    ct_shape: Annotated[str, typer.Option(help="Preprocessing: the CT's voxel grid.")] = "512,512,300",
    ct_spacing: Annotated[str, typer.Option(help="Preprocessing: the CT's voxel size in mm.")] = "0.7,0.7,1.0",
    time_limit: Annotated[
        float, typer.Option(help="Seconds; cases that would start later are skipped (0 = none).")
    ] = 0.0,
    json_out: Annotated[Path, typer.Option("--json", help="Where to write the results.")] = Path("gvsl-bench.json"),
    markdown: Annotated[Path | None, typer.Option(help="Also write the tables as Markdown here.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No tables on screen.")] = False,
) -> None:
    """Benchmark inference backends, training and preprocessing on this machine."""
    from gvsl.cli import bench as benchmark

    started = time.monotonic()
    deadline = started + time_limit if time_limit > 0 else None
    dev = device.lower()
    if dev == "auto":
        dev = "cuda" if _has_cuda() else "cpu"
    gpu = dev.startswith("cuda")
    size_list = _ints(sizes, "--sizes") if sizes else [128 if gpu else 64]
    batch_list = _ints(batch, "--batch")
    kinds = [k.strip() for k in kind.split(",") if k.strip()]
    for k in kinds:
        if k not in ("encoder", "registration"):
            raise typer.BadParameter(f"--kind: encoder or registration, got {k!r}")
    if any(s % 16 for s in size_list):
        raise typer.BadParameter(f"--sizes must be multiples of 16, got {size_list}")
    if backend == "all":
        names = list(benchmark.GPU_DEFAULT if gpu else benchmark.CPU_DEFAULT)
    else:
        names = []
        for n in (x.strip() for x in backend.split(",") if x.strip()):
            names += ["tensorrt-fp16", "tensorrt-bf16"] if n == "tensorrt" else [n]
        unknown = [n for n in names if n not in benchmark.INFERENCE_BACKENDS]
        if unknown:
            choices = ", ".join(benchmark.INFERENCE_BACKENDS)
            raise typer.BadParameter(f"--backend: unknown {', '.join(unknown)}; choose from {choices}")
    if model and not Path(model).exists():
        raise typer.BadParameter(f"--model {model}: not found")
    onnx_only = model is not None and benchmark.BenchSetup.is_export(Path(model))
    if benchmark.BASELINE not in names and not onnx_only:
        names = [benchmark.BASELINE, *names]  # every ratio is to torch eager in the same run

    result: dict[str, Any] = {
        "machine": benchmark.machine_info(),
        "command": "gvsl " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "config": {"model": model or f"random init, widths {widths}", "device": dev, "sizes": size_list,
                   "batches": batch_list, "kinds": kinds, "backends": names, "repeats": repeats, "warmup": warmup},
        "inference": [], "train": [], "preprocess": [],
    }  # fmt: skip

    def save() -> None:
        result["machine"]["load_avg_end"] = list(__import__("os").getloadavg())
        save_text(json_out, json.dumps(result, indent=2, default=str))

    def log(s: str) -> None:
        if not quiet:
            err.print(s, soft_wrap=True, highlight=False)

    if not (train_only or preprocess_only):
        patch = max(size_list)
        setup = benchmark.BenchSetup(
            model=model, widths=widths, device=dev, patch=patch, threads=threads, log=log,
            calibration=tuple(int8_calibration or ()), eval_volumes=tuple(eval_volume or ()),
        )  # fmt: skip

        def on_record(r: dict[str, Any]) -> None:
            result["inference"].append(r)
            save()
            if r.get("status") == "ok":
                log(
                    f"{r['kind']} {r['size']}³ batch {r['batch']} {r['backend']}: "
                    f"{1000 * r['latency_s']['median']:.1f} ms, ×{r.get('x_baseline', float('nan')):.2f} eager"
                )
            else:
                log(f"{r['kind']} {r['size']}³ batch {r['batch']} {r['backend']}: {r.get('status')}")

        try:
            benchmark.bench_inference(
                setup, names, kinds, size_list, batch_list, repeats, warmup, memory, deadline, on_record
            )
        except benchmark.Unavailable as e:
            err.print(f"[bold red]error:[/] {e}")
            raise typer.Exit(2) from None
        result["machine"] = {**benchmark.machine_info(), "load_avg_start": result["machine"]["load_avg"]}
    if train or train_only:
        tsizes = _ints(train_sizes, "--train-sizes") if train_sizes else size_list
        result["train"] = benchmark.bench_train(tsizes, widths, dev, train_batch, repeats, max(warmup, 2), compile,
                                        deadline=deadline)  # fmt: skip
        save()
    if preprocess or preprocess_only:
        shape = parse_triple(ct_shape, "--ct-shape")
        spacing = parse_triple(ct_spacing, "--ct-spacing", float)
        result["preprocess"] = benchmark.bench_preprocess(shape=shape, spacing=spacing, repeats=repeats)
        save()
    save()
    if not quiet:
        if result["inference"]:
            _table("inference", *benchmark.inference_rows(result["inference"]))
        if result["train"]:
            _table("training", *benchmark.train_rows(result["train"]))
        if result["preprocess"]:
            title = f"preprocessing ({ct_shape} CT at {ct_spacing} mm → 1 mm)"
            _table(title, *benchmark.preprocess_rows(result["preprocess"]))
    if markdown:
        save_text(markdown, benchmark.markdown_tables(result))
    err.print(f"results: {json_out}" + (f", {markdown}" if markdown else ""))


def _has_cuda() -> bool:
    """CUDA without importing torch when it is absent (ONNX-only machines)."""
    import importlib.util

    if importlib.util.find_spec("torch") is not None:
        import torch

        return bool(torch.cuda.is_available())
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime as ort

        return "CUDAExecutionProvider" in ort.get_available_providers()
    return False
