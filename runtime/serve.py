"""``gvsl serve``: the runtime behind a real Triton Inference Server (through PyTriton).

Two models are bound, both backed by the same :class:`~gvsl.runtime.embed.Embedder`
/ :class:`~gvsl.runtime.register.Registrar` code as in-process use, so a served
result is the in-process result, number for number:

* ``gvsl_embed``: ``image`` FP32 ``[X, Y, Z]`` + ``affine`` FP64 ``[4, 4]`` (voxel ->
  RAS mm, like NIfTI) -> ``embedding`` FP32 ``[C]`` (standardised with the model's
  statistics; raw, with one warning at start, for a model without them),
  ``embedding_raw`` FP32 ``[C]`` (the pooled bottleneck), and ``features`` FP32
  ``[F, X, Y, Z]`` on the image's own grid when the client asks for that output
  (dense features cost extra, so they are computed only on request);
* ``gvsl_register``: ``fixed``, ``moving`` FP32 ``[X, Y, Z]`` + ``fixed_affine``,
  ``moving_affine`` FP64 ``[4, 4]`` (+ optional ``init`` BYTES ``[1]``: ``world`` or
  ``center``) -> ``affine`` FP64 ``[4, 4]`` (fixed RAS mm -> moving RAS mm),
  ``matrix`` FP64 ``[3, 4]`` (the affine head, official convention), ``dvf`` FP32
  ``[3, X, Y, Z]`` (pull-back field in RAS mm on the fixed grid), ``warped`` FP32
  ``[X, Y, Z]`` (moving on the fixed grid), ``metrics`` FP64 ``[5]``
  (:data:`METRICS`).

Every tensor has Triton's batch dimension in front (``max_batch_size`` > 0,
dynamic batching). Triton itself refuses wrong dtypes and ranks before a request
reaches gvsl; gvsl refuses NaN/Inf, degenerate affines, volumes over
``max_voxels`` and requests over ``max_request_mb`` with one line that starts with
:data:`ERROR_PREFIX`. A batch where every request is bad fails as a Triton error;
in a batch that mixes good and bad requests (PyTriton cannot fail single requests
of a batch) the good ones get their results and the bad ones get only the
``error`` output (BYTES, empty on success), which :mod:`gvsl.runtime.client`
always asks for.

This module is torch-free and imports PyTriton only inside functions, so the
client can share its names without PyTriton installed.
"""

from __future__ import annotations

import abc
import json
import logging
import os
import re
import signal
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import GvslInputError
from .refine_options import RefineOptions
from .register import INITS
from .serve_interpreter import interpreter_problem, library_python_version
from .serve_options import EMBED_MODEL, REGISTER_MODEL, ServeError, ServeOptions

__all__ = [
    "EMBED_MODEL",
    "ERROR_OUTPUT",
    "ERROR_PREFIX",
    "METRICS",
    "REGISTER_MODEL",
    "ServeError",
    "ServeOptions",
    "interpreter_problem",
    "library_python_version",
    "serve",
]

ERROR_OUTPUT = "error"
#: every gvsl-side refusal starts with this, inside Triton's own error text too
ERROR_PREFIX = "gvsl-error: "
#: order of ``gvsl_register``'s ``metrics`` output (keys of ``Registration.metrics``)
METRICS = ("ncc_before", "ncc_after", "jacobian_min", "folding_percent", "max_displacement_mm")

LOG = logging.getLogger("gvsl.serve")
#: starts of Triton before a startup failure is final (only PyTriton's handshake timeout is retried)
STARTUP_ATTEMPTS = 3
#: what a model stub's failed config handshake with this process leaves in Triton's log: the
#: 1 s wait ran out, or the stub found the socket file but no one listening (seen under CI load)
_HANDSHAKE_FAILURES = (
    "Timeout occurred while waiting for config file",
    "in get_config_from_handshake_server",
)


def handshake_failed(text: str) -> bool:
    """Whether a failed Triton start is PyTriton's startup race: a model's stub could not fetch
    its config from this process in time. Nothing is wrong with the models then, and starting
    Triton again is all it takes; any other failure is final."""
    return any(marker in text for marker in _HANDSHAKE_FAILURES)


class RequestError(Exception):
    """One request is bad; the message is what its client reads."""

    def __init__(self, message: str) -> None:
        super().__init__(ERROR_PREFIX + " ".join(str(message).split()))


# ----------------------------------------------------------------------------- model handlers
def _request_bytes(req: Any) -> int:
    return int(sum(np.asarray(v).nbytes for v in req.data.values()))


def _volume(arr: np.ndarray, affine: np.ndarray, name: str, max_voxels: int) -> Any:
    from .io import read_volume

    try:
        return read_volume((arr, affine), max_voxels=max_voxels, name=name)
    except GvslInputError as e:
        raise RequestError(str(e)) from None


def _decode(value: Any) -> str:
    v = value.item() if isinstance(value, np.ndarray) else value
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


class _Handler(abc.ABC):
    """A PyTriton inference callable over a list of requests (one Triton batch).

    Each request may itself carry several volumes (its batch dimension); they are
    processed one at a time with the runtime, exactly as in-process calls.
    """

    model_name = "?"

    def __init__(self, opts: ServeOptions) -> None:
        self.max_voxels = int(opts.max_voxels)
        self.max_bytes = int(opts.max_request_mb * 1024 * 1024)

    @abc.abstractmethod
    def one(self, req: Any) -> dict[str, np.ndarray]:
        """Outputs for one request (subclasses: embed, register)."""

    def __call__(self, requests: list[Any]) -> list[dict[str, np.ndarray]]:
        results: list[dict[str, np.ndarray]] = []
        errors: list[str | None] = []
        for req in requests:
            try:
                size = _request_bytes(req)
                if size > self.max_bytes:
                    raise RequestError(
                        f"{self.model_name}: request is {size / 2**20:.1f} MiB, more than this server's limit of "
                        f"{self.max_bytes / 2**20:.0f} MiB (--max-request-mb); crop or downsample the volume"
                    )
                out = self.one(req)
                out[ERROR_OUTPUT] = np.full((len(next(iter(out.values()))), 1), b"", dtype=object)
                results.append(out)
                errors.append(None)
            except RequestError as e:
                results.append({})
                errors.append(str(e))
            except MemoryError:
                results.append({})
                errors.append(f"{ERROR_PREFIX}{self.model_name}: out of memory on the server; send a smaller volume")
            except Exception as e:  # noqa: BLE001 - one request must not take the others down
                LOG.error("%s: request failed:\n%s", self.model_name, traceback.format_exc())
                msg = " ".join(str(e).split())[:300]
                results.append({})
                errors.append(f"{ERROR_PREFIX}{self.model_name}: internal error ({type(e).__name__}: {msg})")
        if all(e is not None for e in errors):
            # a Triton error for every request (the usual case: a batch of one bad request)
            raise RuntimeError(" | ".join(dict.fromkeys(e for e in errors if e)))
        for k, e in enumerate(errors):
            if e is not None:  # mixed batch: PyTriton cannot fail one request alone
                n = max(1, len(next(iter(requests[k].data.values()))))
                results[k] = {ERROR_OUTPUT: np.full((n, 1), e.encode(), dtype=object)}
        return results


class EmbedHandler(_Handler):
    """``gvsl_embed``: :meth:`Embedder.embed` on ``(image, affine)``: ``embedding`` (standardised
    with the model's statistics when it has them), ``embedding_raw`` (the pooled bottleneck),
    dense features on request."""

    model_name = EMBED_MODEL

    def __init__(self, embedder: Any, opts: ServeOptions) -> None:
        super().__init__(opts)
        self.embedder = embedder

    def one(self, req: Any) -> dict[str, np.ndarray]:
        from .preprocess import preprocess

        images, affines = req["image"], req["affine"]
        dense = "features" in (req.requested_output_names or ())
        emb, raw, feats = [], [], []
        for k in range(images.shape[0]):
            vol = _volume(images[k], affines[k], f"{EMBED_MODEL} input 'image'", self.max_voxels)
            try:
                pre = preprocess(vol, self.embedder.preprocess)
                res = self.embedder.embed_prepared(vol, pre, dense=dense, grid="input")
            except GvslInputError as e:
                raise RequestError(f"{EMBED_MODEL}: {e}") from None
            emb.append(res.embedding)
            raw.append(res.embedding_raw)
            if dense:
                feats.append(res.features)
        out = {"embedding": np.stack(emb), "embedding_raw": np.stack(raw)}
        if dense:
            out["features"] = np.stack(feats)
        return out


class RegisterHandler(_Handler):
    """``gvsl_register``: :meth:`Registrar.register` on the fixed and moving volumes."""

    model_name = REGISTER_MODEL

    def __init__(self, registrar: Any, opts: ServeOptions) -> None:
        super().__init__(opts)
        self.registrar = registrar
        self.default_init = opts.init

    def one(self, req: Any) -> dict[str, np.ndarray]:
        fixed, moving = req["fixed"], req["moving"]
        faff, maff = req["fixed_affine"], req["moving_affine"]
        if fixed.shape[0] != moving.shape[0]:
            raise RequestError(f"{REGISTER_MODEL}: {fixed.shape[0]} fixed but {moving.shape[0]} moving volumes")
        from dataclasses import replace

        inits = req.data.get("init")
        iterations = req.data.get("refine")
        smoothness = req.data.get("regularisation")
        networks = req.data.get("network")
        keys = ("affine", "matrix", "dvf", "warped", "metrics", "shift", "network_used")
        out: dict[str, list[np.ndarray]] = {k: [] for k in keys}
        for k in range(fixed.shape[0]):
            init = _decode(inits[k]) if inits is not None else self.default_init
            if init not in INITS:
                raise RequestError(f"{REGISTER_MODEL}: init {init!r} is not one of {', '.join(INITS)}")
            options = self.registrar.refine_options
            try:
                if iterations is not None:
                    options = replace(options, iterations=int(np.asarray(iterations[k]).reshape(-1)[0]))
                if smoothness is not None:
                    options = replace(options, regularisation=float(np.asarray(smoothness[k]).reshape(-1)[0]))
                if networks is not None:
                    options = replace(options, network=bool(np.asarray(networks[k]).reshape(-1)[0]))
                f = _volume(fixed[k], faff[k], f"{REGISTER_MODEL} input 'fixed'", self.max_voxels)
                m = _volume(moving[k], maff[k], f"{REGISTER_MODEL} input 'moving'", self.max_voxels)
                res = self.registrar.register(f, m, init=init, refine=options)
            except GvslInputError as e:
                raise RequestError(f"{REGISTER_MODEL}: {e}") from None
            out["shift"].append(np.asarray(res.shift_mm, dtype=np.float64))
            out["affine"].append(res.world_matrix)
            out["matrix"].append(res.matrix)
            out["dvf"].append(res.dvf_mm)
            out["warped"].append(res.warped)
            out["metrics"].append(np.array([res.metrics[name] for name in METRICS], dtype=np.float64))
            out["network_used"].append(np.array([res.network], dtype=np.bool_))
        return {k: np.stack(v) for k, v in out.items()}


# ----------------------------------------------------------------------------- tensors
def _embed_tensors(has_dense: bool, embedding_dim: int, feature_dim: int) -> tuple[list, list]:
    from pytriton.model_config import Tensor

    inputs = [
        Tensor(name="image", dtype=np.float32, shape=(-1, -1, -1)),
        Tensor(name="affine", dtype=np.float64, shape=(4, 4)),
    ]
    outputs = [
        Tensor(name="embedding", dtype=np.float32, shape=(embedding_dim,)),
        Tensor(name="embedding_raw", dtype=np.float32, shape=(embedding_dim,)),
    ]
    if has_dense:
        outputs.append(Tensor(name="features", dtype=np.float32, shape=(feature_dim, -1, -1, -1)))
    outputs.append(Tensor(name=ERROR_OUTPUT, dtype=bytes, shape=(1,)))
    return inputs, outputs


def _register_tensors() -> tuple[list, list]:
    from pytriton.model_config import Tensor

    inputs = [
        Tensor(name="fixed", dtype=np.float32, shape=(-1, -1, -1)),
        Tensor(name="fixed_affine", dtype=np.float64, shape=(4, 4)),
        Tensor(name="moving", dtype=np.float32, shape=(-1, -1, -1)),
        Tensor(name="moving_affine", dtype=np.float64, shape=(4, 4)),
        Tensor(name="init", dtype=bytes, shape=(1,), optional=True),
        Tensor(name="refine", dtype=np.int32, shape=(1,), optional=True),
        Tensor(name="regularisation", dtype=np.float32, shape=(1,), optional=True),
        Tensor(name="network", dtype=np.bool_, shape=(1,), optional=True),
    ]
    outputs = [
        Tensor(name="affine", dtype=np.float64, shape=(4, 4)),
        Tensor(name="matrix", dtype=np.float64, shape=(3, 4)),
        Tensor(name="dvf", dtype=np.float32, shape=(3, -1, -1, -1)),
        Tensor(name="warped", dtype=np.float32, shape=(-1, -1, -1)),
        Tensor(name="metrics", dtype=np.float64, shape=(len(METRICS),)),
        Tensor(name="shift", dtype=np.float64, shape=(3,)),
        Tensor(name="network_used", dtype=np.bool_, shape=(1,)),
        Tensor(name=ERROR_OUTPUT, dtype=bytes, shape=(1,)),
    ]
    return inputs, outputs


# ----------------------------------------------------------------------------- server
class _RefusalFilter(logging.Filter):
    """PyTriton logs a full traceback for every failed batch; for gvsl's own refusals
    (bad input, not a server fault) one warning line is enough."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if ERROR_PREFIX in text:
            line = text[text.index(ERROR_PREFIX) :].splitlines()[0]
            record.msg, record.args, record.exc_info, record.levelno = "refused: %s", (line,), None, logging.WARNING
            record.levelname = "WARNING"
        return True


class _Stop(Exception):
    """Raised in the main thread by SIGTERM/SIGINT to leave the serving loop."""


_NOISE = ("NVML", "DCGM", "CudaDriverHelper", "pinned memory", "config modification time")


def _last_error_line(text: str) -> str:
    """The line of Triton's log that says why it did not start: its first error line
    (``E1130 ... file.cc:123] "failed to start HTTP service: ..."``), else the last
    Python exception line; GPU-less noise (NVML, DCGM, CUDA driver) is skipped."""
    lines = [ln.strip() for ln in text.replace("\\n", "\n").splitlines() if ln.strip()]
    lines = [ln for ln in lines if not any(n in ln for n in _NOISE)]
    for ln in lines:
        m = re.match(r'E\d{4} [\d:.]+ +\d+ [\w.]+:\d+\] "?(.*?)"?$', ln)
        if m and "Traceback" not in m.group(1):  # a Python traceback: its last line says more
            return m.group(1)[:300]
    for ln in reversed(lines):
        if re.search(r"(Error|Exception)\b.*:", ln) and "Traceback" not in ln:
            return ln[:300]
    return lines[-1][:300] if lines else "no log"


def build_handlers(opts: ServeOptions) -> dict[str, tuple[Callable, list, list]]:
    """``{model name: (handler, inputs, outputs)}`` with the runtime objects loaded once
    and shared by every instance (Embedder and Registrar are thread-safe)."""
    from . import cpu_pool
    from .embed import Embedder
    from .register import Registrar

    cpu_pool.set_threads(opts.threads)  # the one pool every request's preprocessing shares
    out: dict[str, tuple[Callable, list, list]] = {}
    backend_options: dict[str, Any] = {
        "threads": opts.threads,
        "allow_cpu_fallback": opts.allow_cpu_fallback,
        **opts.extra,
    }
    if EMBED_MODEL in opts.models:
        embedder = Embedder(
            opts.model,
            opts.backend,
            opts.device,
            overlap=opts.overlap,
            window_batch=opts.window_batch,
            max_voxels=opts.max_voxels,
            modality=opts.modality,
            **backend_options,
        )
        info = embedder.info
        ins, outs = _embed_tensors(embedder.has_dense, info.embedding_dim, info.feature_dim)
        out[EMBED_MODEL] = (EmbedHandler(embedder, opts), ins, outs)
    if REGISTER_MODEL in opts.models:
        options = RefineOptions(
            iterations=opts.refine, levels=opts.refine_levels, regularisation=opts.regularisation, network=opts.network
        )
        registrar = Registrar(
            opts.model,
            opts.backend,
            opts.device,
            init=opts.init,
            refine=options,
            max_voxels=opts.max_voxels,
            modality=opts.modality,
            **backend_options,
        )
        ins, outs = _register_tensors()
        out[REGISTER_MODEL] = (RegisterHandler(registrar, opts), ins, outs)
    return out


def serve(opts: ServeOptions, on_ready: Callable[[dict[str, str]], None] | None = None) -> int:
    """Start Triton with the gvsl models, block until SIGINT/SIGTERM, stop cleanly.

    Returns 0 after a requested stop, 1 when the server died on its own.
    ``on_ready`` receives the endpoints once every model is loaded.

    Readiness: Triton's server-level ``/v2/health/ready`` turns true before
    PyTriton has loaded the models (PyTriton waits for it, then loads them), so
    it is no readiness probe. The model-level ``/v2/models/NAME/ready`` are,
    and so is ``opts.ready_file``: written once every served model answers
    ready, removed as soon as the server starts stopping.
    """
    opts.check()
    for name, port in (("--http-port", opts.http_port), ("--grpc-port", opts.grpc_port),
                       ("--metrics-port", opts.metrics_port)):  # fmt: skip
        _check_port(opts.host, port, name)
    problem = interpreter_problem()
    if problem:
        raise ServeError(problem)
    from pytriton.model_config import DynamicBatcher, ModelConfig
    from pytriton.triton import Triton, TritonConfig

    handlers = build_handlers(opts)
    logging.getLogger("pytriton.proxy.inference").addFilter(_RefusalFilter())
    config = TritonConfig(
        http_address=opts.host,
        http_port=opts.http_port,
        grpc_address=opts.host,
        grpc_port=opts.grpc_port,
        metrics_address=opts.host,
        metrics_port=opts.metrics_port,
        exit_timeout_secs=opts.exit_timeout,
        log_verbose=opts.log_verbose,
        log_file=opts.log_file,
    )
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        if not stop.is_set():
            stop.set()
            raise _Stop(signal.Signals(signum).name)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    triton: Any = None
    died = False
    try:
        for attempt in range(1, STARTUP_ATTEMPTS + 1):
            triton = Triton(config=config)
            for name, (handler, ins, outs) in handlers.items():
                triton.bind(
                    model_name=name,
                    infer_func=[handler] * opts.instances,  # one Triton instance per entry, same shared runtime
                    inputs=ins,
                    outputs=outs,
                    config=ModelConfig(
                        max_batch_size=opts.max_batch,
                        batcher=DynamicBatcher(max_queue_delay_microseconds=opts.queue_delay_us),
                    ),
                    strict=False,
                )
            try:
                triton.run()
                break
            except _Stop:
                raise
            except Exception as e:  # noqa: BLE001 - startup failure: one line with the server's reason
                server = getattr(triton, "_triton_server", None)
                logs = server.logs() if server is not None else ""
                if opts.log_file is not None and Path(opts.log_file).is_file():
                    logs += Path(opts.log_file).read_text(errors="replace")
                why = _last_error_line(logs) if logs else " ".join(str(e).split())[:300]
                if attempt < STARTUP_ATTEMPTS and handshake_failed(logs + str(e)):
                    LOG.warning(
                        "Triton start %d: a model's config handshake failed (busy machine); starting again", attempt
                    )
                    triton.stop()
                    continue
                raise ServeError(f"Triton could not start the gvsl models: {why}") from None
        local = "127.0.0.1" if opts.host in ("0.0.0.0", "") else ("[::1]" if opts.host == "::" else opts.host)
        wait_ready(f"{local}:{opts.http_port}", opts.models, timeout=120, alive=triton.is_alive)
        if opts.ready_file is not None:
            _write_ready_file(Path(opts.ready_file), opts.models)
        endpoints = {
            "http": f"http://{opts.host}:{opts.http_port}",
            "grpc": f"grpc://{opts.host}:{opts.grpc_port}",
            "metrics": f"http://{opts.host}:{opts.metrics_port}/metrics",
        }
        if on_ready is not None:
            on_ready(endpoints)
        while not stop.is_set():
            if not triton.is_alive():
                died = True
                break
            stop.wait(0.5)
    except _Stop:
        pass
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if opts.ready_file is not None:  # not ready from the first moment of stopping
            Path(opts.ready_file).unlink(missing_ok=True)
        try:
            if triton is not None:
                triton.stop()
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            for name, (handler, _, _) in handlers.items():
                objs = [handler.embedder] if name == EMBED_MODEL else [handler.registrar]
                for o in objs:
                    o.close()
    return 1 if died else 0


def _write_ready_file(path: Path, models: Sequence[str]) -> None:
    """The readiness file (an exec probe's ``test -f``): written atomically, so a probe
    never sees half of it; it lists the models that answered ready and the pid."""
    from .io import atomic_write

    text = json.dumps({"ready": list(models), "pid": os.getpid()}) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _check_port(host: str, port: int, option: str) -> None:
    """Refuse a port someone already listens on now, with one line (Triton itself would
    only fail after PyTriton's minute-long start-up wait)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Triton binds: TIME_WAIT is no conflict
        try:
            s.bind((host, port))
        except OSError as e:
            why = e.strerror or str(e)
            raise ServeError(f"{option} {port}: cannot listen on {host}:{port} ({why}); pick another port") from None


def free_ports(n: int = 3, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports free on ``host`` right now (for tests and benchmarks)."""
    import socket

    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def wait_ready(
    url: str,
    models: Sequence[str] = (EMBED_MODEL, REGISTER_MODEL),
    timeout: float = 60.0,
    alive: Callable[[], bool] | None = None,
) -> None:
    """Block until the server at ``url`` (``host:port`` HTTP) reports every model ready."""
    import tritonclient.http as http

    deadline = time.monotonic() + timeout
    last = "not contacted"
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise ServeError(f"gvsl serve exited before it was ready ({last})")
        try:
            client = http.InferenceServerClient(url, connection_timeout=2.0, network_timeout=5.0)
            try:
                if client.is_server_ready() and all(client.is_model_ready(m) for m in models):
                    return
                last = "models loading"
            finally:
                client.close()
        except Exception as e:  # noqa: BLE001 - not up yet
            last = f"{type(e).__name__}: {' '.join(str(e).split())[:120]}"
        time.sleep(0.25)
    raise ServeError(f"gvsl serve at {url} not ready after {timeout:.0f} s ({last})")
