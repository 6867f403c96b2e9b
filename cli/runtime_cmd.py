"""``gvsl embed`` and ``gvsl register``: the torch-free runtime from the command line.

Neither command imports torch unless ``--backend torch`` is chosen, so they
run on inference servers that only have ONNX Runtime / TensorRT. Batch
embedding goes on past bad files, lists them at the end and exits 1; bad
options or a bad model stop at once with one line and exit 2.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from gvsl.cli.app import MODALITY_HELP, app, err, progress_bar, user_errors
from gvsl.runtime.refine_options import RefineOptions, format_levels, parse_levels

F = TypeVar("F", bound=Callable[..., Any])

#: the refinement defaults every front end shares (``gvsl register``, ``gvsl serve``, ``Registrar``)
REFINE_DEFAULTS = RefineOptions()

BACKEND_HELP = "auto (ONNX Runtime for exports, torch for trained models), onnxruntime, tensorrt or torch."
SERVER_HELP = (
    "Use a running `gvsl serve` instead of --model: http://HOST:8000 or grpc://HOST:8001 "
    "(the server's backend and settings apply)."
)
DEVICE_HELP = "auto, cpu, cuda or cuda:N (ONNX Runtime tries TensorRT EP, then CUDA EP; cuda fails if neither loads)."
THREADS_HELP = "CPU threads for inference and preprocessing, 1 or more (default: every core, up to 16)."
FALLBACK_HELP = "With --device cuda: warn and run on the CPU when ONNX Runtime cannot use the GPU (default: fail)."


def _shard(text: str | None) -> tuple[int, int]:
    if not text:
        return 0, 1
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise typer.BadParameter(f"--shard must look like i/n (e.g. 0/8), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise typer.BadParameter(f"--shard i/n needs 0 <= i < n, got {text!r}")
    return i, n


def _short(e: BaseException) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg if len(msg) <= 300 else msg[:297] + "..."


# ----------------------------------------------------------------------------- embed
@app.command()
@user_errors
def embed(
    paths: Annotated[
        list[str],
        typer.Argument(
            help="NIfTI files, DICOM series folders, folders (searched recursively) or globs; "
            "with --merge: output folders of earlier runs."
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out", "-o", help="Output folder (mirrors the input folders' structure); with --merge: a .csv or .npz."
        ),
    ],
    model: Annotated[
        Path | None,
        typer.Option(
            "--model",
            "-m",
            help="Export folder (gvsl export) or encoder.onnx; a model folder for torch. "
            "Default: the small model shipped with gvsl.",
        ),
    ] = None,
    server: Annotated[str | None, typer.Option(help=SERVER_HELP)] = None,
    merge: Annotated[
        bool,
        typer.Option(
            "--merge",
            help="Combine the embeddings under PATHS (e.g. one output folder per --shard) into one table at --out: "
            "CSV (key, e0..eC-1) or NPZ (keys, embeddings [N, C]). No model needed.",
        ),
    ] = False,
    dense: Annotated[bool, typer.Option(help="Also write dense features on each input's own grid.")] = False,
    format: Annotated[
        str,
        typer.Option(
            "--format",
            help="npy: NAME.npy embedding (+ NAME_features.nii.gz with --dense); "
            "npz: NAME.npz with embedding and embedding_raw (+ features [F,X,Y,Z] and affine).",
        ),
    ] = "npy",
    grid: Annotated[
        str, typer.Option(help="Grid of dense features: input (the file's own) or model (preprocessed, cheaper).")
    ] = "input",
    backend: Annotated[str, typer.Option(help=BACKEND_HELP)] = "auto",
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
    shard: Annotated[
        str | None, typer.Option(help="i/n: process only every n-th input starting at i (0-based), for array jobs.")
    ] = None,
    overlap: Annotated[float, typer.Option(help="Sliding-window overlap for volumes larger than the patch.")] = 0.5,
    window_batch: Annotated[int, typer.Option(help="Windows per inference call (more = faster, more memory).")] = 1,
    max_voxels: Annotated[int, typer.Option(help="Refuse inputs with more voxels than this.")] = 512 * 512 * 2048,
    threads: Annotated[int | None, typer.Option(help=THREADS_HELP)] = None,
    allow_cpu_fallback: Annotated[bool, typer.Option(help=FALLBACK_HELP)] = False,
    int8: Annotated[
        bool,
        typer.Option(
            "--int8",
            help="Opt-in CPU speed mode: run an int8 copy of the encoder (ONNX Runtime, quantised once and cached; "
            "2-3x faster on x86, embedding cosine to fp32 >= 0.999 measured on MNI; see BENCHMARKS.md). "
            "Needs the fp32 ONNX export and --device cpu.",
        ),
    ] = False,
    int8_calibration: Annotated[
        list[str] | None,
        typer.Option(
            help="With --int8: volumes (NIfTI or DICOM folders, repeatable) whose activations set the int8 ranges; "
            "use a few of your own scans. Default: the MNI sample shipped with gvsl.",
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Recompute outputs that already exist (default: skip them).")] = False,
    modality: Annotated[str, typer.Option(help=MODALITY_HELP)] = "auto",
    raw_embedding: Annotated[
        bool,
        typer.Option(
            "--raw-embedding",
            help="Write the raw pooled bottleneck as the embedding instead of the standardised one "
            "((raw - mean) / std with the model's statistics; npz files always hold both).",
        ),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary; errors only.")] = False,
) -> None:
    """Embed volumes with a gvsl encoder: one global embedding per volume (optionally dense features).

    The embedding is standardised per channel with the statistics the model carries
    (`gvsl embed-stats`), so cosine similarity separates scans; a model without them
    gives the raw pooled bottleneck, with one warning.

    Resumable: inputs whose outputs exist are skipped. Bad inputs do not stop the
    batch; they are listed at the end and the exit code is 1. `--merge` joins the
    outputs of several runs or shards into one table.
    """
    import gvsl.torch_backend  # noqa: F401 - registers the torch backend for trained models (imports no torch)
    from gvsl.runtime.backends import BACKENDS
    from gvsl.runtime.cpu_pool import check_threads
    from gvsl.runtime.embed import Embedder
    from gvsl.runtime.io import list_inputs, save_npy, save_npz
    from gvsl.runtime.preprocess import save_nifti

    if backend not in BACKENDS:
        raise typer.BadParameter(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if format not in ("npy", "npz"):
        raise typer.BadParameter(f"--format must be npy or npz, got {format!r}")
    if grid not in ("input", "model"):
        raise typer.BadParameter(f"--grid must be input or model, got {grid!r}")
    check_threads(threads)
    if merge:
        _merge_embeddings(paths, out, overwrite, quiet)
        return
    if int8_calibration and not int8:
        raise typer.BadParameter("--int8-calibration only means something with --int8")
    if int8 and server is not None:
        raise typer.BadParameter("--int8 is a local ONNX Runtime CPU mode; it cannot be set on a --server")
    if int8 and backend not in ("auto", "onnxruntime"):
        raise typer.BadParameter(f"--int8 runs on ONNX Runtime, not --backend {backend}")
    if model is None and server is None:  # neither given: the small model shipped with gvsl
        from gvsl.runtime.default_model import default_model_dir

        model = default_model_dir()
    _model_or_server(model, server, backend, device)
    if out.exists() and not out.is_dir():
        raise typer.BadParameter(f"--out {out}: exists and is not a folder")
    index, count = _shard(shard)
    items, problems = list_inputs(paths)
    failures: list[tuple[str, str]] = list(problems)
    items = items[index::count]
    if not items and not failures:
        err.print(f"nothing to do: shard {index}/{count} holds no inputs")
        return
    if not items:
        _embed_summary(0, 0, 0, failures, 0.0, quiet)
        raise typer.Exit(1)

    def outputs_for(key: str) -> list[Path]:
        if format == "npz":
            return [out / f"{key}.npz"]
        return [out / f"{key}.npy"] + ([out / f"{key}_features.nii.gz"] if dense else [])

    todo = [it for it in items if overwrite or not all(p.is_file() for p in outputs_for(it.key))]
    modalities: dict[str, int] = {}
    skipped = len(items) - len(todo)
    done = 0
    t0 = time.perf_counter()
    if todo:
        if server:
            from gvsl.runtime.client import GvslClient

            if grid != "input":
                raise typer.BadParameter(
                    "--grid model is not available with --server (features come on the input grid)"
                )
            embedder: Any = GvslClient(server, max_voxels=max_voxels, embedding="raw" if raw_embedding else None)
            embedder.check([embedder.embed_model])
        else:
            extra: dict[str, Any] = {}
            if int8:
                from gvsl.runtime.default_model import sample_volume

                extra["int8_calibration"] = list(int8_calibration or [sample_volume()])
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                embedder = Embedder(
                    model, "onnxruntime" if int8 else backend, "cpu" if int8 and device == "auto" else device,
                    overlap=overlap, window_batch=window_batch, max_voxels=max_voxels, threads=threads,
                    modality=_modality(modality), allow_cpu_fallback=allow_cpu_fallback,
                    embedding="raw" if raw_embedding else "standardised", **extra,
                )  # fmt: skip
            for w in caught:  # e.g. no embedding statistics: one plain line each
                err.print(f"warning: {w.message}")
        if dense and not embedder.has_dense:
            raise typer.BadParameter(
                f"{server or model}: this encoder has no dense features output; drop --dense or re-export"
            )
        with progress_bar(quiet) as progress, ThreadPoolExecutor(1) as reader:
            task = progress.add_task("embed", total=len(todo), info="")
            # read + preprocess the next input while the current one runs
            nxt: Future | None = reader.submit(embedder.prepare, todo[0].path)
            for k, item in enumerate(todo):
                progress.update(task, info=item.key)
                fut, nxt = nxt, (reader.submit(embedder.prepare, todo[k + 1].path) if k + 1 < len(todo) else None)
                try:
                    vol, pre = fut.result()
                    res = embedder.embed_prepared(vol, pre, dense=dense, grid=grid)
                    outs = outputs_for(item.key)
                    modalities[res.modality or "server"] = modalities.get(res.modality or "server", 0) + 1
                    if format == "npz":
                        extra = {"features": res.features, "affine": res.affine} if dense else {}
                        if res.embedding_raw is not None:
                            extra["embedding_raw"] = res.embedding_raw
                        save_npz(outs[0], embedding=res.embedding, modality=res.modality or "", **extra)
                    else:
                        if dense:
                            save_nifti(outs[1], res.features.transpose(1, 2, 3, 0), res.affine)
                        save_npy(outs[0], res.embedding)
                    done += 1
                except MemoryError:
                    failures.append((str(item.path), "out of memory; lower --window-batch or --max-voxels"))
                except Exception as e:  # noqa: BLE001 - batch mode: record and go on
                    from gvsl.runtime.errors import GvslInputError

                    why = _short(e) if isinstance(e, GvslInputError) else f"{type(e).__name__}: {_short(e)}"
                    failures.append((str(item.path), why))
                progress.advance(task)
        embedder.close()
    _embed_summary(done, skipped, len(items), failures, time.perf_counter() - t0, quiet, modalities)
    if failures:
        raise typer.Exit(1)


def _model_or_server(model: Path | None, server: str | None, backend: str, device: str) -> None:
    """At most one of --model / --server; the local backend options mean nothing with a server."""
    if model is not None and server is not None:
        raise typer.BadParameter("give --model DIR (run locally) or --server URL (a running `gvsl serve`), not both")
    if server and (backend != "auto" or device != "auto"):
        raise typer.BadParameter("--backend/--device are set on `gvsl serve`, not with --server; drop them")


def _merge_embeddings(folders: list[str], out: Path, overwrite: bool, quiet: bool) -> None:
    """One table from the ``.npy`` / ``.npz`` embeddings under ``folders`` (keys = paths
    relative to each folder, without suffix, as `gvsl embed` wrote them)."""
    import csv
    import io

    import numpy as np

    from gvsl.runtime.errors import GvslInputError
    from gvsl.runtime.io import atomic_write, save_npz

    kind = "csv" if out.name.lower().endswith(".csv") else "npz" if out.name.lower().endswith(".npz") else ""
    if not kind:
        raise typer.BadParameter(f"--out {out}: with --merge give a .csv or .npz file name")
    if out.exists() and not overwrite:
        raise typer.BadParameter(f"--out {out}: exists; add --overwrite to replace it")
    rows: dict[str, tuple[np.ndarray, Path]] = {}
    for folder in folders:
        root = Path(folder)
        if not root.is_dir():
            raise typer.BadParameter(f"--merge {folder}: not a folder; give the --out folders of `gvsl embed` runs")
        for p in sorted(root.rglob("*")):
            rel = p.relative_to(root).as_posix()
            if not p.is_file() or any(part.startswith(".") for part in p.relative_to(root).parts):
                continue  # temporary files of a run still writing
            low = p.name.lower()
            if not low.endswith((".npy", ".npz")):
                continue
            try:
                if low.endswith(".npy"):
                    vec = np.load(p, allow_pickle=False)
                else:
                    with np.load(p, allow_pickle=False) as z:
                        if "embedding" not in z.files:
                            raise ValueError("no 'embedding' array")
                        vec = z["embedding"]
            except (OSError, ValueError, EOFError) as e:
                raise GvslInputError(
                    f"{p}: not a readable gvsl embedding ({e}); delete it and embed again", p
                ) from None
            if vec.ndim != 1 or vec.dtype.kind != "f":
                raise GvslInputError(f"{p}: not a gvsl embedding (array {vec.dtype} {vec.shape}); move it away", p)
            key = rel[:-4]
            if key in rows:
                if not np.array_equal(rows[key][0], vec):
                    raise GvslInputError(
                        f"{p}: differs from {rows[key][1]} for the same input {key!r}; merge outputs of one model only",
                        p,
                    )
                continue
            rows[key] = (vec.astype(np.float32), p)
    if not rows:
        raise GvslInputError(f"--merge: no embeddings (.npy / .npz) under {', '.join(folders)}")
    dims = {v.shape[0] for v, _ in rows.values()}
    if len(dims) > 1:
        first = next(iter(rows.values()))
        odd = next(p for v, p in rows.values() if v.shape[0] != first[0].shape[0])
        raise GvslInputError(
            f"{odd}: {dims} embedding sizes in one merge ({first[1]} differs); merge outputs of one model only", odd
        )
    keys = sorted(rows)
    table = np.stack([rows[k][0] for k in keys])
    if kind == "npz":
        save_npz(out, keys=np.array(keys), embeddings=table)
    else:

        def write(tmp: str) -> None:
            buf = io.StringIO()
            w = csv.writer(buf, lineterminator="\n")
            w.writerow(["key", *(f"e{i}" for i in range(table.shape[1]))])
            for k, row in zip(keys, table, strict=True):
                w.writerow([k, *(f"{float(x):.9g}" for x in row)])  # 9 digits: float32 round-trips exactly
            Path(tmp).write_text(buf.getvalue(), encoding="utf-8")

        atomic_write(out, write)
    if not quiet:
        err.print(
            f"merged {len(keys)} embeddings ({table.shape[1]} values each) from {len(folders)} folder(s) into {out}",
            highlight=False,
            markup=False,
        )


def _modality(text: str) -> str | None:
    """``--modality``: auto, ct, mr, none, or ``model`` (None: the model's own setting)."""
    from gvsl.runtime.preprocess import MODALITIES

    if text == "model":
        return None
    if text not in MODALITIES:
        raise typer.BadParameter(f"--modality must be one of {', '.join(MODALITIES)} or model, got {text!r}")
    return text


def _embed_summary(
    done: int, skipped: int, total: int, failures: list[tuple[str, str]], seconds: float, quiet: bool,
    modalities: dict[str, int] | None = None,
) -> None:  # fmt: skip
    from rich.table import Table

    if not quiet:
        table = Table(title="gvsl embed", show_header=True, header_style="bold")
        for col in ("inputs", "embedded", "skipped (exist)", "failed", "modality", "time", "s / volume"):
            table.add_column(col, justify="right")
        per = f"{seconds / done:.2f}" if done else "-"
        kinds = ", ".join(f"{k} {n}" for k, n in sorted((modalities or {}).items())) or "-"
        table.add_row(str(total), str(done), str(skipped), str(len(failures)), kinds, f"{seconds:.1f} s", per)
        err.print(table)
    if failures:
        err.print(f"[bold red]{len(failures)} input(s) failed:[/]")
        for path, why in failures:
            err.print(f"  {path}: {why}", soft_wrap=True, highlight=False, markup=False)


# ----------------------------------------------------------------------------- register
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
        str, typer.Option(help="Refinement pyramid: isotropic spacings in mm, coarse to fine, e.g. 6,3 or 6,3,1.5.")
    ] = format_levels(REFINE_DEFAULTS.levels),
    refine_affine: Annotated[
        int,
        typer.Option(
            help="Affine refinement iterations (local-CC ascent, refine_affine.onnx) on the coarsest level, "
            "before the network; 0 = none. Runs only when --refine is above 0."
        ),
    ] = REFINE_DEFAULTS.affine_iterations,
    similarity: Annotated[
        str, typer.Option(help="Refinement similarity: ncc (local normalised cross-correlation).")
    ] = REFINE_DEFAULTS.similarity,
    regularisation: Annotated[
        float,
        typer.Option(
            help="Refinement smoothness in [0, 1]: how far the field is pulled towards its smoothed self each "
            "iteration (higher = smoother, less detail)."
        ),
    ] = REFINE_DEFAULTS.regularisation,
    modality: Annotated[str, typer.Option(help=MODALITY_HELP)] = "auto",
    backend: Annotated[str, typer.Option(help=BACKEND_HELP)] = "auto",
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
    max_voxels: Annotated[int, typer.Option(help="Refuse inputs with more voxels than this.")] = 512 * 512 * 2048,
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
    from gvsl.runtime.register import Registrar

    cpu_pool.set_threads(cpu_pool.check_threads(threads))

    levels = parse_levels(refine_levels)
    options = RefineOptions(
        iterations=refine,
        levels=levels,
        similarity=similarity,
        regularisation=regularisation,
        affine_iterations=refine_affine,
    )
    if fixed_labels and len(fixed_labels) != len(labels or []):
        raise typer.BadParameter(f"--fixed-labels: {len(fixed_labels)} given for {len(labels or [])} --labels")
    if model is None and server is None:  # neither given: the small model shipped with gvsl
        from gvsl.runtime.default_model import default_model_dir

        model = default_model_dir()
    _model_or_server(model, server, backend, device)
    _nifti_out(out, "--out")
    if dvf is not None:
        _nifti_out(dvf, "--dvf")
    if png is not None and png.suffix.lower() != ".png":
        raise typer.BadParameter(f"--png {png}: give a .png file name")
    label_paths = list(labels or [])
    targets = list(labels_out or [])
    if targets and len(targets) != len(label_paths):
        raise typer.BadParameter(f"--labels-out: {len(targets)} given for {len(label_paths)} --labels")
    if not targets:
        targets = [out.parent / f"{_stem(Path(lab))}_warped.nii.gz" for lab in label_paths]
    for t in targets:
        _nifti_out(t, "--labels-out")
    t0 = time.perf_counter()
    if server:
        from gvsl.runtime.client import GvslClient

        with GvslClient(server, max_voxels=max_voxels) as client:
            client.check([client.register_model])
            res = client.register(
                fixed, moving, labels=label_paths or None, fixed_labels=fixed_labels or None, init=init, refine=options
            )
        backend_name = client.name
    else:
        with Registrar(
            model,
            backend,
            device,
            init=init,
            refine=options,
            max_voxels=max_voxels,
            threads=threads or 0,
            allow_cpu_fallback=allow_cpu_fallback,
            modality=_modality(modality),
        ) as reg:
            res = reg.register(fixed, moving, labels=label_paths or None, fixed_labels=fixed_labels or None)
        backend_name = reg.backend.name
    seconds = time.perf_counter() - t0
    written = [res.save_warped(out)]
    if dvf is not None:
        written.append(res.save_dvf(dvf))
    if label_paths:
        written += res.save_labels(targets)
    if png is not None:
        written.append(res.save_png(png, title=f"{Path(moving).name} -> {Path(fixed).name}"))
    if metrics is not None:
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
            "affine_network": res.matrix.tolist(),
            "affine_world_ras": res.world_matrix.tolist(),
            "backend": backend_name,
            "modality_fixed": res.modalities[0],
            "modality_moving": res.modalities[1],
        }
        written.append(save_text(metrics, json.dumps(payload, indent=2) + "\n"))
    if not quiet:
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
        if res.affine_refinement:
            a = res.affine_refinement
            kept = "kept" if a.get("kept") else "not kept"
            table.add_row(
                f"refine affine {a['spacing_mm']:g} mm",
                f"local CC {a['local_cc_before']:.4f} -> {a['local_cc_after']:.4f} ({kept})",
            )
        for level in res.refinement:
            table.add_row(f"refine {level['spacing_mm']:g} mm", f"local CC {level['local_cc']:.4f}")
        for name, scores in res.dice.items():
            for label, value in scores.items():
                table.add_row(f"Dice {Path(name).name} [{label}]", f"{value:.4f}")
        for stage, secs in res.stages.items():
            table.add_row(f"time: {stage}", f"{secs:.2f} s")
        err.print(table)
        for p in written:
            err.print(f"wrote {p}", highlight=False, markup=False)
