"""``gvsl export`` end to end: source -> ONNX (+ engines) -> verification -> manifest (+ Triton repo).

Everything is built in a temporary folder beside ``--out`` and renamed into
place only when every artifact has been written and verified, so a failure
(bad option, parity failure, TensorRT error, Ctrl-C) leaves nothing half
written. Options are checked before any slow work starts.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gvsl.config import SIZE_MULTIPLE
from gvsl.export import onnx_export
from gvsl.export.errors import ExportError
from gvsl.export.manifest import file_entry, new_manifest, write_manifest
from gvsl.export.source import Source, load_source
from gvsl.export.trt_check import TrtIssue, check_tensorrt
from gvsl.export.verify import DEFAULT_VERIFY_SHAPES, ParityResult, compare, raise_on_failure, reference, verify_onnx
from gvsl.runtime import artifact
from gvsl.runtime.atomic import published_mode

FORMATS = ("onnx", "engine", "all")
#: What ``gvsl export`` and ``gvsl info`` say about a registration graph with the identity affine.
AFFINE_IDENTITY_NOTE = (
    "registration uses the identity affine (the official release's affine head never trained); "
    "the dvf is the deformable head's alone. `gvsl export --official-affine` applies the released head"
)
KINDS = (artifact.ENCODER, artifact.REGISTRATION)

Progress = Callable[[str, int, int], None]  # (step label, steps done, steps total)
Log = Callable[[str], None]


@dataclass
class ExportOptions:
    """Everything ``gvsl export`` can be told (see the CLI's --help for each)."""

    format: str = "onnx"
    precisions: tuple[str, ...] = ("fp32",)
    opset: int = onnx_export.DEFAULT_OPSET
    warp: str = "gather"
    dense: bool = True
    verify: bool = True
    verify_shapes: tuple[tuple[int, int, int, int], ...] = DEFAULT_VERIFY_SHAPES
    verify_data: tuple[str, ...] = ()
    simplify: bool = True
    widths: str | None = None
    official_affine: bool = False  # official .pth: apply the released affine head instead of the identity
    # TensorRT
    min_shapes: tuple[str, ...] = ()
    opt_shapes: tuple[str, ...] = ()
    max_shapes: tuple[str, ...] = ()
    workspace_gib: float = 4.0
    timing_cache: str | None = None
    # Triton
    triton_repo: str | None = None
    triton_backend: str = "auto"
    triton_max_batch: int = 4
    force: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def manifest_view(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("extra")
        d["verify_shapes"] = [list(s) for s in self.verify_shapes]
        return d


def onnx_name(kind: str, precision: str) -> str:
    """``encoder.onnx`` / ``registration.fp16.onnx``."""
    return f"{kind}.onnx" if precision == "fp32" else f"{kind}.{precision}.onnx"


def _check_options(opt: ExportOptions, out: Path) -> dict[str, Any]:
    """Validate everything cheap before any export work; returns derived settings."""
    if opt.format not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, got {opt.format!r}")
    if not opt.precisions:
        raise ExportError("--precision: give at least one of fp32, fp16, bf16")
    for p in opt.precisions:
        if p not in onnx_export.ALL_PRECISIONS:
            raise ExportError(f"--precision {p!r}: choose from {', '.join(onnx_export.ALL_PRECISIONS)}")
    want_onnx = opt.format in ("onnx", "all")
    want_engine = opt.format in ("engine", "all")
    if want_onnx and not want_engine and "bf16" in opt.precisions:
        raise ExportError(
            "--precision bf16 is for TensorRT engines only (ONNX has no bf16 InstanceNormalization and ONNX "
            "Runtime CPU cannot run it); use --format engine or all, or --precision fp16"
        )
    onnx_export.check_opset(opt.opset, opt.warp)
    if want_engine and opt.warp != "gather":
        raise ExportError(
            "--warp grid_sample cannot build in TensorRT (its GridSample is 2-D only); use --warp gather for engines"
        )
    for shp in opt.verify_shapes:
        if len(shp) != 4 or shp[0] < 1 or any(s <= 0 or s % SIZE_MULTIPLE for s in shp[1:]):
            raise ExportError(f"--verify-shape {shp}: give N,D,H,W with D, H, W positive multiples of {SIZE_MULTIPLE}")
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not opt.force:
        raise ExportError(f"{out}: folder exists and is not empty; choose a new --out or pass --force to replace it")
    derived: dict[str, Any] = {"want_onnx": want_onnx, "want_engine": want_engine}
    if opt.triton_repo:
        repo = Path(opt.triton_repo)
        if repo.resolve() == out.resolve() or out.resolve() in repo.resolve().parents:
            raise ExportError(f"--triton-repo {repo}: must be outside --out {out}")
        if repo.is_dir() and any(repo.iterdir()) and not opt.force:
            raise ExportError(f"{repo}: Triton repository exists and is not empty; choose another or pass --force")
        backend = opt.triton_backend
        if backend == "auto":
            backend = "tensorrt" if want_engine else "onnxruntime"
        if backend not in ("onnxruntime", "tensorrt"):
            raise ExportError(f"--triton-backend must be auto, onnxruntime or tensorrt, got {opt.triton_backend!r}")
        if backend == "tensorrt" and not want_engine:
            raise ExportError("--triton-backend tensorrt needs engines: add --format engine or all")
        if backend == "onnxruntime" and not want_onnx:
            raise ExportError("--triton-backend onnxruntime needs ONNX files: use --format onnx or all")
        derived["triton_backend"] = backend
    if want_engine and (opt.min_shapes or opt.opt_shapes or opt.max_shapes):
        from gvsl.export.tensorrt_build import make_profiles

        make_profiles(opt.min_shapes, opt.opt_shapes, opt.max_shapes, (16, 16, 16))  # validate before TensorRT
    return derived


def _load_volumes(paths: Sequence[str], source: Source) -> list[tuple[str, Any]]:
    from gvsl.runtime.preprocess import load_volume, preprocess

    return [(Path(p).name, preprocess(load_volume(p), source.preprocess).data) for p in paths]


@dataclass
class _Plan:
    """What one export builds, decided from the options before any slow work."""

    want_onnx: bool
    want_engine: bool
    onnx_precisions: list[str]  # the ONNX graphs shipped
    engine_precisions: list[str]
    build_precisions: list[str]  # the ONNX graphs built: those shipped and those engines are built from
    triton_backend: str | None  # None without --triton-repo
    trt_info: dict[str, Any]  # TensorRT version and GPU target; empty without engines

    def steps_total(self) -> int:
        """The progress steps: each graph and engine, the refinement graphs, the Triton repository, the manifest."""
        graphs = len(KINDS) * (len(self.build_precisions) + len(self.engine_precisions))
        return graphs + 1 + (self.triton_backend is not None) + self.want_onnx


class _Steps:
    """Reports each labelled step to ``progress`` as (label, steps done, steps total)."""

    def __init__(self, progress: Progress | None, total: int) -> None:
        self.progress = progress
        self.total = total
        self.done = 0

    def __call__(self, label: str) -> None:
        if self.progress:
            self.progress(label, self.done, self.total)
        self.done += 1

    def finish(self) -> None:
        if self.progress:
            self.progress("done", self.total, self.total)


def run_export(
    source_path: str | Path,
    out: str | Path,
    opt: ExportOptions | None = None,
    *,
    progress: Progress | None = None,
    log: Log | None = None,
) -> dict[str, Any]:
    """Export ``source_path`` into ``out``; returns the manifest. Raises :class:`ExportError`."""
    opt = opt or ExportOptions()
    out = Path(out)
    say = log or (lambda s: None)
    plan = _plan(opt, _check_options(opt, out))
    source = load_source(source_path, opt.widths, opt.official_affine)
    profiles = _engine_profiles(opt, plan, source)
    _note_source(source, say)
    volumes = _load_volumes(opt.verify_data, source) if opt.verify_data and opt.verify else []
    steps = _Steps(progress, plan.steps_total())

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    triton_tmp: Path | None = None
    try:
        build_dir = tmp if plan.want_onnx else tmp / ".onnx-build"
        build_dir.mkdir(exist_ok=True)
        manifest = new_manifest(source, opt.manifest_view())
        onnx_files = _export_graphs(build_dir, source, opt, plan, volumes, manifest, steps)
        if plan.want_onnx:
            steps("export refine.onnx, refine_mi.onnx, refine_affine.onnx")
            manifest["artifacts"] += _export_refine(tmp, opt.verify)
        engine_files = _build_engines(tmp, source, opt, plan, profiles, onnx_files, manifest, steps, say)
        if not plan.want_onnx:
            shutil.rmtree(build_dir)  # the engines are built; their ONNX sources are not shipped
        if opt.triton_repo:
            steps("write Triton repository")
            repo = Path(opt.triton_repo)
            repo.parent.mkdir(parents=True, exist_ok=True)
            triton_tmp = Path(tempfile.mkdtemp(dir=repo.parent, prefix=f".{repo.name}.tmp-"))
            manifest["triton"] = _write_triton(triton_tmp, repo, source, opt, plan, onnx_files, engine_files)
        steps("write manifest")
        manifest = json.loads(json.dumps(manifest))  # what readers of manifest.json will see
        write_manifest(tmp, manifest)
        _commit(tmp, out)
        tmp = None  # type: ignore[assignment]
        if triton_tmp is not None:
            _commit(triton_tmp, Path(opt.triton_repo))  # type: ignore[arg-type]
            triton_tmp = None
        steps.finish()
        return manifest
    finally:
        for t in (tmp, triton_tmp):
            if t is not None and Path(t).exists():
                shutil.rmtree(t, ignore_errors=True)


def _plan(opt: ExportOptions, derived: dict[str, Any]) -> _Plan:
    """The precisions to build and ship; with engines, TensorRT is looked up first so a missing one fails fast."""
    want_onnx, want_engine = derived["want_onnx"], derived["want_engine"]
    trt_info: dict[str, Any] = {}
    if want_engine:
        from gvsl.export import tensorrt_build

        trt = tensorrt_build.require_tensorrt()
        trt_info = {"tensorrt_version": str(trt.__version__), **tensorrt_build.gpu_target()}
    onnx_precisions = [p for p in opt.precisions if p in onnx_export.ONNX_PRECISIONS] if want_onnx else []
    engine_precisions = list(opt.precisions) if want_engine else []
    build_precisions = sorted(
        set(onnx_precisions) | {("fp16" if p == "fp16" else "fp32") for p in engine_precisions},
        key=onnx_export.ALL_PRECISIONS.index,
    )
    return _Plan(
        want_onnx,
        want_engine,
        onnx_precisions,
        engine_precisions,
        build_precisions,
        derived.get("triton_backend"),
        trt_info,
    )


def _engine_profiles(opt: ExportOptions, plan: _Plan, source: Source) -> list[Any]:
    """The engines' optimisation profiles (the training patch when none is given); none without engines."""
    if not plan.want_engine:
        return []
    from gvsl.export import tensorrt_build

    return tensorrt_build.make_profiles(opt.min_shapes, opt.opt_shapes, opt.max_shapes, source.patch_size)


def _note_source(source: Source, say: Log) -> None:
    """Tell the user what the source leaves to defaults: its patch size, the identity affine."""
    if source.patch_size_from == "default":
        say(f"note: {source.path} records no training patch size; metadata says {list(source.patch_size)} (default)")
    if source.config.affine_head == "identity":
        say(f"note: {AFFINE_IDENTITY_NOTE}")


def _export_graphs(
    build_dir: Path,
    source: Source,
    opt: ExportOptions,
    plan: _Plan,
    volumes: list[tuple[str, Any]],
    manifest: dict[str, Any],
    steps: _Steps,
) -> dict[tuple[str, str], Path]:
    """Export, verify and check each network graph at each build precision; the shipped ones join the manifest.

    Returns every graph written, by (kind, precision), for the engines to build from.
    """
    onnx_files: dict[tuple[str, str], Path] = {}
    for prec in plan.build_precisions:
        for kind in KINDS:
            steps(f"export {onnx_name(kind, prec)}")
            path = build_dir / onnx_name(kind, prec)
            parity, issues = _export_graph(path, source, kind, prec, opt, volumes)
            if plan.want_engine and issues:
                raise ExportError(f"{path.name}: TensorRT's ONNX parser would reject it: {issues[0]}")
            onnx_files[(kind, prec)] = path
            if plan.want_onnx and prec in plan.onnx_precisions:
                manifest["artifacts"].append(
                    file_entry(
                        path,
                        kind=kind,
                        format="onnx",
                        precision=prec,
                        opset=opt.opset,
                        **({"warp": opt.warp} if kind == artifact.REGISTRATION else {"dense": opt.dense}),
                        **onnx_export.graph_io(path),
                        tensorrt_compatible=not issues,
                        parity=[r.to_dict() for r in parity],
                    )
                )
    return onnx_files


def _export_graph(
    path: Path, source: Source, kind: str, prec: str, opt: ExportOptions, volumes: list[tuple[str, Any]]
) -> tuple[list[ParityResult], list[TrtIssue]]:
    """Write one graph to ``path``; returns its parity with PyTorch (empty without --verify) and TensorRT's issues.

    Raises ExportError when the parity check fails.
    """
    meta = onnx_export.build_metadata(source, kind, prec, warp=opt.warp, dense=opt.dense)
    onnx_export.export_graph(
        source.model,
        kind,
        path,
        metadata=meta,
        precision=prec,
        opset=opt.opset,
        warp=opt.warp,
        dense=opt.dense,
        example_shape=(1, 1, 16, 16, 16),
        simplify=opt.simplify,
    )
    parity: list[ParityResult] = []
    if opt.verify:
        parity = verify_onnx(path, source.model, kind, prec, dense=opt.dense, shapes=opt.verify_shapes, volumes=volumes)
        raise_on_failure(parity)
    return parity, check_tensorrt(path)


def _build_engines(
    tmp: Path,
    source: Source,
    opt: ExportOptions,
    plan: _Plan,
    profiles: list[Any],
    onnx_files: dict[tuple[str, str], Path],
    manifest: dict[str, Any],
    steps: _Steps,
    say: Log,
) -> dict[str, Path]:
    """Build, verify and list each engine in the manifest; returns the first engine of each kind."""
    if not plan.engine_precisions:
        return {}
    from gvsl.export import tensorrt_build

    trt_info = plan.trt_info
    engine_files: dict[str, Path] = {}
    for prec in plan.engine_precisions:
        for kind in KINDS:
            name = tensorrt_build.engine_name(kind, prec, trt_info["sm"], trt_info["tensorrt_version"])
            steps(f"build {name}")
            src_onnx = onnx_files[(kind, "fp16" if prec == "fp16" else "fp32")]
            cache = opt.timing_cache or tensorrt_build.default_timing_cache(
                trt_info["sm"], trt_info["tensorrt_version"]
            )
            info = tensorrt_build.build_engine(
                src_onnx,
                tmp / name,
                precision=prec,
                profiles=profiles,
                workspace_gib=opt.workspace_gib,
                timing_cache=cache,
                log=say,
            )
            parity = _verify_engine(tmp / name, source, kind, prec, opt, profiles) if opt.verify else []
            raise_on_failure(parity)
            engine_files.setdefault(kind, tmp / name)
            manifest["artifacts"].append(
                file_entry(
                    tmp / name,
                    kind=kind,
                    format="engine",
                    precision=prec,
                    gpu=trt_info["gpu"],
                    compute_capability=trt_info["compute_capability"],
                    built_from=src_onnx.name,
                    built_from_sha256=file_entry(src_onnx)["sha256"],
                    **info,
                    parity=[r.to_dict() for r in parity],
                )
            )
    return engine_files


def _write_triton(
    folder: Path,
    repo: Path,
    source: Source,
    opt: ExportOptions,
    plan: _Plan,
    onnx_files: dict[tuple[str, str], Path],
    engine_files: dict[str, Path],
) -> dict[str, Any]:
    """Write the Triton repository for ``repo`` into ``folder``; returns its manifest entry.

    The TensorRT backend serves the first engine of each kind, ONNX Runtime the
    graphs of the first ONNX precision.
    """
    from gvsl.export.triton import write_repo

    backend = plan.triton_backend
    if backend == "tensorrt":
        models = engine_files
    else:
        first = plan.onnx_precisions[0]
        models = {k: onnx_files[(k, first)] for k in KINDS}
    write_repo(folder, models, backend, source.config, dense=opt.dense, max_batch_size=opt.triton_max_batch)
    return {"repository": str(repo), "backend": backend, "models": {k: p.name for k, p in models.items()}}


def _export_refine(folder: Path, verify: bool) -> list[dict[str, Any]]:
    """Write ``refine.onnx``, ``refine_mi.onnx`` and ``refine_affine.onnx`` (the instance-refinement
    graphs, no learned weights) and return their manifest entries, each checked against PyTorch
    when ``verify``."""
    from gvsl.export.refine_graph import (
        REFINE_ATOL,
        check_refine_tensorrt,
        export_refine,
        verify_refine,
        verify_refine_affine,
    )
    from gvsl.refine import RefineSettings

    entries = []
    verifiers = {
        artifact.REFINE: verify_refine,
        artifact.REFINE_MI: verify_refine,
        artifact.REFINE_AFFINE: verify_refine_affine,
    }
    for kind in (artifact.REFINE, artifact.REFINE_MI, artifact.REFINE_AFFINE):
        settings = RefineSettings(similarity="mi") if kind == artifact.REFINE_MI else RefineSettings()
        path = export_refine(folder / f"{kind}.onnx", settings, kind=kind)
        parity = []
        if verify:
            result = verifiers[kind](path, settings)
            if not result["passed"]:
                raise ExportError(
                    f"{path.name}: parity with PyTorch failed (max |diff| {result['max_abs']:.2e} > {REFINE_ATOL:g} "
                    f"after {result['iterations']} iterations); nothing was written (report this with the command line)"
                )
            parity.append(result)
        issues = check_refine_tensorrt(path)
        entries.append(
            file_entry(
                path,
                kind=kind,
                format="onnx",
                precision="fp32",
                settings=settings.to_dict(),
                **onnx_export.graph_io(path),
                tensorrt_compatible=not issues,
                parity=parity,
            )
        )
    return entries


def _commit(tmp: Path, dest: Path) -> None:
    """Move the finished folder into place; an existing ``dest`` (allowed by --force) is replaced.

    Temporary folders are created owner-only; the published tree gets the usual
    umask-based permissions first (:func:`published_mode`).
    """
    for p in [tmp, *tmp.rglob("*")]:
        p.chmod(published_mode(directory=p.is_dir()))
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{tmp.name.rsplit('-', 1)[-1]}")
        dest.rename(old)
    try:
        tmp.rename(dest)
    except BaseException:
        if old is not None:
            old.rename(dest)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _verify_engine(
    path: Path, source: Source, kind: str, precision: str, opt: ExportOptions, profiles: Sequence[Any]
) -> list[ParityResult]:
    """Run an engine on the GPU at each verify shape inside its profiles and compare with PyTorch."""
    from gvsl.export.tensorrt_build import run_engine
    from gvsl.export.verify import random_inputs

    shapes = [
        s
        for s in opt.verify_shapes
        if any(all(a <= x <= b for a, x, b in zip(p.min, s, p.max, strict=True)) for p in profiles)
    ] or [p.min for p in profiles]  # no verify shape fits a profile: check at each profile's minimum
    results = []
    for i, shp in enumerate(shapes):
        inputs = random_inputs(kind, shp, seed=i)
        got = run_engine(path, inputs)
        ref = reference(source.model, kind, inputs, opt.dense)
        res = ParityResult(path.name, precision, "random", list(inputs[0].shape))
        names = onnx_export.io_names(kind, opt.dense)[1]
        for name, r in zip(names, ref, strict=True):
            g = got[name]
            par, why = compare(name, g, r, "fp16" if precision == "bf16" else precision)
            res.outputs[name] = par
            if why and res.passed:
                res.passed, res.failure = False, why
        results.append(res)
    return results


__all__ = ["ExportOptions", "FORMATS", "KINDS", "onnx_name", "run_export"]
