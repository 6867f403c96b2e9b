"""``gvsl serve``: the torch-free runtime behind a real Triton Inference Server (PyTriton).

The server has to run in an interpreter whose libpython is the one Triton's
Python-backend stub loads (see :func:`gvsl.runtime.serve_interpreter.interpreter_problem`),
which is usually not the training environment: ``--python`` /
``GVSL_SERVE_PYTHON`` name that interpreter (a venv with ``gvsl[cpu,serve]``)
and the command re-executes itself there, so the pid stays the same and
signals reach the server directly. Without them the current interpreter is
checked and refused with one line that says what to do.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

from gvsl.cli.app import MODALITY_HELP, app, err, user_errors
from gvsl.runtime.refine_options import RefineOptions, format_levels, parse_levels

#: the refinement defaults every front end shares
REFINE_DEFAULTS = RefineOptions()

_CHILD = "_GVSL_SERVE_CHILD"  # set in the re-executed process: never re-execute twice
MODEL_CHOICES = {"embed": "gvsl_embed", "register": "gvsl_register"}


def _same_interpreter(python: str) -> bool:
    return os.path.abspath(python) == os.path.abspath(sys.executable)


def _reexec(python: str, argv: list[str]) -> None:
    """Replace this process with ``python -m gvsl.cli.main serve ...`` (after checking that
    interpreter has what the server needs, so a wrong path is one line, not a traceback)."""
    exe = Path(python)
    if not (exe.is_file() and os.access(exe, os.X_OK)):
        raise typer.BadParameter(f"--python {python}: no such interpreter (GVSL_SERVE_PYTHON or --python)")
    probe = subprocess.run(
        [str(exe), "-c", "import gvsl.runtime.serve, pytriton"], capture_output=True, text=True, timeout=120
    )
    if probe.returncode != 0:
        why = (probe.stderr.strip().splitlines() or ["import failed"])[-1]
        raise typer.BadParameter(
            f"--python {python}: cannot import gvsl and PyTriton there ({why}); install them with "
            f"`{python} -m pip install -e '.[cpu,serve]'` from the gvsl checkout"
        )
    env = {**os.environ, _CHILD: "1"}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(str(exe), [str(exe), "-m", "gvsl.cli.main", "serve", *argv], env)


@app.command()
@user_errors
def serve(
    model: Annotated[
        Path, typer.Option("--model", "-m", help="Export folder from `gvsl export` (encoder.onnx, registration.onnx).")
    ],
    host: Annotated[
        str, typer.Option(help="Address for HTTP, gRPC and metrics; 0.0.0.0 to accept other machines.")
    ] = "127.0.0.1",
    http_port: Annotated[int, typer.Option(help="Triton HTTP/REST port (KServe v2 protocol).")] = 8000,
    grpc_port: Annotated[int, typer.Option(help="Triton gRPC port.")] = 8001,
    metrics_port: Annotated[int, typer.Option(help="Prometheus metrics port (/metrics).")] = 8002,
    models: Annotated[str, typer.Option(help="Models to serve: embed, register or embed,register.")] = "embed,register",
    instances: Annotated[
        int, typer.Option(help="Triton instances per model (requests run in parallel; they share one session).")
    ] = 1,
    max_batch: Annotated[
        int, typer.Option(help="Triton max_batch_size (dynamic batching of same-shaped requests).")
    ] = 4,
    queue_delay_us: Annotated[int, typer.Option(help="Dynamic batcher: longest wait to fill a batch (µs).")] = 2000,
    max_request_mb: Annotated[
        float, typer.Option(help="Refuse requests whose tensors add up to more than this many MiB.")
    ] = 1024.0,
    max_voxels: Annotated[int, typer.Option(help="Refuse volumes with more voxels than this.")] = 512 * 512 * 2048,
    backend: Annotated[str, typer.Option(help="onnxruntime, tensorrt or auto.")] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    threads: Annotated[
        int | None,
        typer.Option(help="CPU threads for inference and preprocessing, 1 or more (default: every core, up to 16)."),
    ] = None,
    allow_cpu_fallback: Annotated[
        bool, typer.Option(help="With --device cuda: warn and serve on the CPU when ONNX Runtime cannot use the GPU.")
    ] = False,
    ready_file: Annotated[
        Path | None,
        typer.Option(
            help="Write this file once every served model is loaded and ready (remove it when stopping): the "
            "readiness signal for an exec probe (`test -f FILE`)."
        ),
    ] = None,
    overlap: Annotated[float, typer.Option(help="Sliding-window overlap for volumes larger than the patch.")] = 0.5,
    window_batch: Annotated[int, typer.Option(help="Encoder windows per inference call.")] = 1,
    init: Annotated[
        str,
        typer.Option(
            help="Default initial alignment for gvsl_register: auto, world, center or moments (per request: 'init')."
        ),
    ] = "auto",
    refine: Annotated[
        int,
        typer.Option(
            help="Default refinement iterations per level for gvsl_register; 0 = network only (per request: 'refine')."
        ),
    ] = REFINE_DEFAULTS.iterations,
    refine_levels: Annotated[
        str, typer.Option(help="Refinement pyramid spacings in mm, coarse to fine.")
    ] = format_levels(REFINE_DEFAULTS.levels),
    regularisation: Annotated[
        float, typer.Option(help="Default refinement smoothness in [0, 1] (per request: 'regularisation').")
    ] = REFINE_DEFAULTS.regularisation,
    network: Annotated[
        bool,
        typer.Option(
            help="Default start of gvsl_register's refinement: the network's prediction, or (--no-network) the "
            "initial alignment alone, the network not run (per request: 'network')."
        ),
    ] = REFINE_DEFAULTS.network,
    modality: Annotated[str, typer.Option(help=MODALITY_HELP)] = "auto",
    exit_timeout: Annotated[int, typer.Option(help="Seconds Triton waits for in-flight requests when stopping.")] = 10,
    log_file: Annotated[Path | None, typer.Option(help="Write Triton's log here instead of the console.")] = None,
    log_verbose: Annotated[int, typer.Option(help="Triton verbose log level (0 = off).")] = 0,
    python: Annotated[
        str | None,
        typer.Option(
            help="Run the server with this interpreter (a venv with gvsl[cpu,serve]); default $GVSL_SERVE_PYTHON, "
            "else the current one if it can run Triton's Python backend."
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print errors only (Triton's log too).")] = False,
) -> None:
    """Serve gvsl_embed and gvsl_register on a real Triton Inference Server (HTTP, gRPC, metrics).

    Triton's own endpoints: /v2/health/live, /v2/models/NAME/ready (readiness: true once
    that model is loaded; Triton's /v2/health/ready turns true before the models are),
    /v2/models/NAME/config, metrics on --metrics-port; --ready-file for all models at once.
    Ctrl-C or SIGTERM stops it cleanly (exit 0).
    Call it with `gvsl embed --server URL`, `gvsl register --server URL` or
    gvsl.runtime.client.GvslClient.
    """
    from gvsl.runtime.cpu_pool import check_threads
    from gvsl.runtime.serve import ServeOptions, serve

    check_threads(threads)
    wanted = [m.strip() for m in models.split(",") if m.strip()]
    bad = [m for m in wanted if m not in MODEL_CHOICES]
    if bad or not wanted:
        raise typer.BadParameter(f"--models must list embed and/or register, got {models!r}")
    target = python or os.environ.get("GVSL_SERVE_PYTHON")
    if target and not _same_interpreter(target) and not os.environ.get(_CHILD):
        argv = [
            "--model", str(model.absolute()), "--host", host, "--http-port", str(http_port),
            "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port), "--models", models,
            "--instances", str(instances), "--max-batch", str(max_batch), "--queue-delay-us", str(queue_delay_us),
            "--max-request-mb", str(max_request_mb), "--max-voxels", str(max_voxels), "--backend", backend,
            "--device", device, "--overlap", str(overlap),
            "--window-batch", str(window_batch), "--init", init, "--modality", modality,
            "--exit-timeout", str(exit_timeout),
            "--refine", str(refine), "--refine-levels", refine_levels, "--regularisation", str(regularisation),
            "--log-verbose", str(log_verbose),
        ]  # fmt: skip
        if threads is not None:
            argv += ["--threads", str(threads)]
        if allow_cpu_fallback:
            argv.append("--allow-cpu-fallback")
        if not network:
            argv.append("--no-network")
        if ready_file is not None:
            argv += ["--ready-file", str(ready_file.absolute())]
        if log_file is not None:
            argv += ["--log-file", str(log_file.absolute())]
        if quiet:
            argv.append("--quiet")
        _reexec(target, argv)
    if not model.exists():
        raise typer.BadParameter(f"--model {model}: not found; give the folder written by `gvsl export`")
    log_path = log_file
    tmp_log: Path | None = None
    if quiet and log_file is None:
        import tempfile

        fd, name = tempfile.mkstemp(prefix="gvsl-serve-", suffix=".log")
        os.close(fd)
        log_path = tmp_log = Path(name)
    opts = ServeOptions(
        model=model,
        host=host,
        http_port=http_port,
        grpc_port=grpc_port,
        metrics_port=metrics_port,
        instances=instances,
        max_batch=max_batch,
        queue_delay_us=queue_delay_us,
        max_request_mb=max_request_mb,
        max_voxels=max_voxels,
        backend=backend,
        device=device,
        threads=threads or 0,
        allow_cpu_fallback=allow_cpu_fallback,
        ready_file=ready_file,
        overlap=overlap,
        window_batch=window_batch,
        init=init,
        refine=refine,
        refine_levels=parse_levels(refine_levels),
        regularisation=regularisation,
        network=network,
        modality=None if modality == "model" else modality,
        exit_timeout=exit_timeout,
        log_verbose=log_verbose,
        log_file=log_path,
        models=tuple(MODEL_CHOICES[m] for m in wanted),
    )

    def ready(endpoints: dict[str, str]) -> None:
        if not quiet:
            err.print(
                f"[bold green]gvsl serve ready[/] ({', '.join(opts.models)}): HTTP {endpoints['http']}  "
                f"gRPC {endpoints['grpc']}  metrics {endpoints['metrics']}  (Ctrl-C to stop)",
                highlight=False,
                soft_wrap=True,
            )

    try:
        code = serve(opts, on_ready=ready)
    finally:
        if tmp_log is not None:
            tmp_log.unlink(missing_ok=True)
    if code:
        err.print("[bold red]error:[/] Triton Inference Server stopped unexpectedly; see its log above", soft_wrap=True)
        raise typer.Exit(code)
    if not quiet:
        err.print("gvsl serve stopped", highlight=False)
