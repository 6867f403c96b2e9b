"""``gvsl embed``: global embeddings (and dense features) of many volumes with the torch-free runtime.

No torch is imported unless ``--backend torch`` is chosen, so the command runs
on inference servers that have only ONNX Runtime / TensorRT. A batch goes on
past bad files, lists them at the end and exits 1; bad options or a bad model
stop at once with one line and exit 2. Outputs that exist are skipped, so a
stopped run resumes; ``--shard i/n`` splits a batch over array jobs and
``--merge`` joins their outputs into one table.
"""

from __future__ import annotations

import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from gvsl.cli.app import MODALITY_HELP, app, err, progress_bar, user_errors
from gvsl.cli.runtime_options import (
    BACKEND_HELP,
    DEVICE_HELP,
    FALLBACK_HELP,
    MAX_VOXELS,
    MAX_VOXELS_HELP,
    SERVER_HELP,
    THREADS_HELP,
    choose_model,
    failure_line,
    modality_option,
)


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
    max_voxels: Annotated[int, typer.Option(help=MAX_VOXELS_HELP)] = MAX_VOXELS,
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
    from gvsl.runtime.cpu_pool import check_threads

    _check_options(backend, format, grid, int8, int8_calibration, server)
    check_threads(threads)
    if merge:
        _merge_embeddings(paths, out, overwrite, quiet)
        return
    model = choose_model(model, server, backend, device)
    if out.exists() and not out.is_dir():
        raise typer.BadParameter(f"--out {out}: exists and is not a folder")
    items, failures = _inputs(paths, shard)
    if not items:
        if failures:
            _embed_summary(0, 0, 0, failures, 0.0, quiet)
            raise typer.Exit(1)
        err.print(f"nothing to do: shard {shard or '0/1'} holds no inputs")
        return
    layout = _Outputs(out, format, dense)
    todo = [it for it in items if overwrite or not layout.exist(it.key)]
    t0 = time.perf_counter()
    done, modalities = 0, {}
    if todo:
        if server:
            embedder = _client(server, grid, max_voxels, raw_embedding)
        else:
            embedder = _local_embedder(
                model, backend, device, overlap, window_batch, max_voxels, threads, modality,
                allow_cpu_fallback, raw_embedding, int8, int8_calibration,
            )  # fmt: skip
        if dense and not embedder.has_dense:
            raise typer.BadParameter(
                f"{server or model}: this encoder has no dense features output; drop --dense or re-export"
            )
        done, modalities = _embed_all(embedder, todo, layout, grid, failures, quiet)
        embedder.close()
    _embed_summary(done, len(items) - len(todo), len(items), failures, time.perf_counter() - t0, quiet, modalities)
    if failures:
        raise typer.Exit(1)


def _check_options(
    backend: str, format: str, grid: str, int8: bool, int8_calibration: list[str] | None, server: str | None
) -> None:
    """Options that are wrong whatever the inputs: one line and exit 2 before any work."""
    from gvsl.runtime.backends import BACKENDS

    if backend not in BACKENDS:
        raise typer.BadParameter(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if format not in ("npy", "npz"):
        raise typer.BadParameter(f"--format must be npy or npz, got {format!r}")
    if grid not in ("input", "model"):
        raise typer.BadParameter(f"--grid must be input or model, got {grid!r}")
    if int8_calibration and not int8:
        raise typer.BadParameter("--int8-calibration only means something with --int8")
    if int8 and server is not None:
        raise typer.BadParameter("--int8 is a local ONNX Runtime CPU mode; it cannot be set on a --server")
    if int8 and backend not in ("auto", "onnxruntime"):
        raise typer.BadParameter(f"--int8 runs on ONNX Runtime, not --backend {backend}")


def _shard(text: str | None) -> tuple[int, int]:
    """``--shard i/n`` as (i, n); no shard is (0, 1)."""
    if not text:
        return 0, 1
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise typer.BadParameter(f"--shard must look like i/n (e.g. 0/8), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise typer.BadParameter(f"--shard i/n needs 0 <= i < n, got {text!r}")
    return i, n


def _inputs(paths: list[str], shard: str | None) -> tuple[list[Any], list[tuple[str, str]]]:
    """This shard's inputs under ``paths`` and the (path, why) of those that cannot be listed."""
    from gvsl.runtime.io import list_inputs

    index, count = _shard(shard)
    items, problems = list_inputs(paths)
    return items[index::count], list(problems)


@dataclass(frozen=True)
class _Outputs:
    """Where one input's results go under ``out`` (keys mirror the input folders) and how
    they are written: ``npy`` (embedding, + ``_features.nii.gz`` with ``dense``) or ``npz``
    (embedding, embedding_raw, modality, + features and affine with ``dense``)."""

    out: Path
    format: str
    dense: bool

    def paths(self, key: str) -> list[Path]:
        if self.format == "npz":
            return [self.out / f"{key}.npz"]
        return [self.out / f"{key}.npy"] + ([self.out / f"{key}_features.nii.gz"] if self.dense else [])

    def exist(self, key: str) -> bool:
        return all(p.is_file() for p in self.paths(key))

    def write(self, key: str, res: Any) -> None:
        from gvsl.runtime.io import save_npy, save_npz
        from gvsl.runtime.preprocess import save_nifti

        outs = self.paths(key)
        if self.format == "npz":
            extra = {"features": res.features, "affine": res.affine} if self.dense else {}
            if res.embedding_raw is not None:
                extra["embedding_raw"] = res.embedding_raw
            save_npz(outs[0], embedding=res.embedding, modality=res.modality or "", **extra)
            return
        if self.dense:
            save_nifti(outs[1], res.features.transpose(1, 2, 3, 0), res.affine)
        save_npy(outs[0], res.embedding)


def _client(server: str, grid: str, max_voxels: int, raw_embedding: bool) -> Any:
    """A :class:`~gvsl.runtime.client.GvslClient` on a running ``gvsl serve``, checked to serve embeddings."""
    from gvsl.runtime.client import GvslClient

    if grid != "input":
        raise typer.BadParameter("--grid model is not available with --server (features come on the input grid)")
    client = GvslClient(server, max_voxels=max_voxels, embedding="raw" if raw_embedding else None)
    client.check([client.embed_model])
    return client


def _local_embedder(
    model: Path | None, backend: str, device: str, overlap: float, window_batch: int, max_voxels: int,
    threads: int | None, modality: str, allow_cpu_fallback: bool, raw_embedding: bool, int8: bool,
    int8_calibration: list[str] | None,
) -> Any:  # fmt: skip
    """The in-process :class:`~gvsl.runtime.embed.Embedder`; its warnings (e.g. a model without
    embedding statistics) become one plain line each."""
    from gvsl.runtime.embed import Embedder

    extra: dict[str, Any] = {}
    if int8:
        from gvsl.runtime.default_model import sample_volume

        extra["int8_calibration"] = list(int8_calibration or [sample_volume()])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        embedder = Embedder(
            model, "onnxruntime" if int8 else backend, "cpu" if int8 and device == "auto" else device,
            overlap=overlap, window_batch=window_batch, max_voxels=max_voxels, threads=threads,
            modality=modality_option(modality), allow_cpu_fallback=allow_cpu_fallback,
            embedding="raw" if raw_embedding else "standardised", **extra,
        )  # fmt: skip
    for w in caught:
        err.print(f"warning: {w.message}")
    return embedder


def _embed_all(
    embedder: Any, todo: list[Any], layout: _Outputs, grid: str, failures: list[tuple[str, str]], quiet: bool
) -> tuple[int, dict[str, int]]:
    """Embed and write every input of ``todo``, reading and preprocessing the next one while
    the current one runs; a failing input is added to ``failures`` and the batch goes on.
    Returns how many were written and how many of each modality."""
    done = 0
    modalities: dict[str, int] = {}
    with progress_bar(quiet) as progress, ThreadPoolExecutor(1) as reader:
        task = progress.add_task("embed", total=len(todo), info="")
        nxt: Future | None = reader.submit(embedder.prepare, todo[0].path)
        for k, item in enumerate(todo):
            progress.update(task, info=item.key)
            fut, nxt = nxt, (reader.submit(embedder.prepare, todo[k + 1].path) if k + 1 < len(todo) else None)
            try:
                vol, pre = fut.result()
                res = embedder.embed_prepared(vol, pre, dense=layout.dense, grid=grid)
                kind = res.modality or "server"
                modalities[kind] = modalities.get(kind, 0) + 1
                layout.write(item.key, res)
                done += 1
            except MemoryError:
                failures.append((str(item.path), "out of memory; lower --window-batch or --max-voxels"))
            except Exception as e:  # noqa: BLE001 - batch mode: record and go on
                failures.append((str(item.path), failure_line(e)))
            progress.advance(task)
    return done, modalities


def _merge_embeddings(folders: list[str], out: Path, overwrite: bool, quiet: bool) -> None:
    """One table from the ``.npy`` / ``.npz`` embeddings under ``folders`` (keys = paths
    relative to each folder, without suffix, as `gvsl embed` wrote them): CSV (key, e0..eC-1)
    or NPZ (keys, embeddings [N, C]), written atomically."""
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
    rows = _read_embeddings(folders)
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


def _read_embeddings(folders: list[str]) -> dict[str, tuple[Any, Path]]:
    """Every embedding under ``folders``: key -> (float32 vector, file). Files of a run still
    writing (hidden temporaries) are passed over; an unreadable file, a non-embedding array or
    two different vectors for one key stop the merge with one line naming the file."""
    import numpy as np

    from gvsl.runtime.errors import GvslInputError

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
    return rows


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
