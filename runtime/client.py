"""Call a running ``gvsl serve`` (Triton) from Python with NumPy volumes or files.

::

    from gvsl.runtime.client import GvslClient

    with GvslClient("http://127.0.0.1:8000") as client:      # or "grpc://127.0.0.1:8001"
        e = client.embed("scan.nii.gz", dense=True)           # or client.embed((array, affine))
        r = client.register("fixed.nii.gz", "moving.nii.gz", labels=["seg.nii.gz"])

Results are the runtime's own :class:`~gvsl.runtime.embed.Embedding` and
:class:`~gvsl.runtime.register.Registration`, with the same numbers as
in-process calls: volumes are read and validated here exactly as the runtime
reads them (NIfTI, DICOM folders, ``(array, affine)``), sent as float32 voxels
plus their float64 affine, and the server runs the same code on them. Label
maps are warped here with the returned displacement field (nearest
neighbour), as ``Registrar`` does, so they never leave this machine.

One client may be shared by threads (HTTP keeps one connection per thread;
gRPC channels are thread-safe). Server-side refusals (NaN, too large, ...)
and an unreachable server raise :class:`GvslInputError` with one line.
``tritonclient`` is imported only when a client is made; no torch.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from .errors import GvslInputError
from .io import DEFAULT_MAX_VOXELS, VolumeLike, load_labels, read_volume
from .serve import EMBED_MODEL, ERROR_OUTPUT, ERROR_PREFIX, INITS, METRICS, REGISTER_MODEL

__all__ = ["GvslClient", "parse_url"]

# the refusal inside Triton's error text (which may carry a traceback, with real or escaped newlines)
_GVSL_ERROR = re.compile(re.escape(ERROR_PREFIX) + r"(.+?)(?:\\n|\n|$)")


def parse_url(url: str) -> tuple[str, str, bool]:
    """``(protocol, host:port, ssl)`` from ``http://h:p``, ``https://h:p``, ``grpc://h:p``
    or a bare ``h:p`` (HTTP)."""
    text = url.strip()
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https", "grpc", "grpcs") or not parts.hostname:
        raise GvslInputError(
            f"--server {url}: give http://HOST:PORT (Triton HTTP, default port 8000) or grpc://HOST:PORT (8001)"
        )
    default = 8001 if scheme.startswith("grpc") else 8000
    try:
        port = parts.port or default
    except ValueError:
        raise GvslInputError(f"--server {url}: the port is not a number") from None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return ("grpc" if scheme.startswith("grpc") else "http"), f"{host}:{port}", scheme in ("https", "grpcs")


def _one_line(e: BaseException, limit: int = 300) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


class GvslClient:
    """A client of ``gvsl serve``: ``embed`` and ``register`` over Triton HTTP or gRPC.

    ``timeout``: seconds one request may take (registration of large volumes on
    a CPU server takes a while). ``max_voxels``: local limit when reading inputs.
    """

    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        *,
        timeout: float = 600.0,
        max_voxels: int | None = DEFAULT_MAX_VOXELS,
        embed_model: str = EMBED_MODEL,
        register_model: str = REGISTER_MODEL,
        embedding: str | None = None,
    ) -> None:
        if embedding not in (None, "standardised", "raw"):
            raise GvslInputError(f"embedding must be standardised or raw, got {embedding!r}")
        #: "raw": ``Embedding.embedding`` is the server's ``embedding_raw``; otherwise its ``embedding``
        self.embedding = embedding
        self.url = url
        self.protocol, self.address, self.ssl = parse_url(url)
        try:
            if self.protocol == "grpc":
                import tritonclient.grpc as triton_client
            else:
                import tritonclient.http as triton_client
        except ImportError as e:
            raise GvslInputError(
                f"--server {url}: tritonclient[{self.protocol}] is not installed ({e}); "
                f"pip install 'tritonclient[{self.protocol}]'"
            ) from None
        self._triton_client = triton_client
        self.timeout = float(timeout)
        self.max_voxels = max_voxels
        self.embed_model = embed_model
        self.register_model = register_model
        self._local = threading.local()
        self._all: list[Any] = []
        self._lock = threading.Lock()
        self._outputs: dict[str, tuple[str, ...]] = {}
        self.name = f"triton[{self.protocol}://{self.address}]"

    # ------------------------------------------------------------------ plumbing
    def _client(self) -> Any:
        c = getattr(self._local, "client", None)
        if c is None:
            if self.protocol == "grpc":
                c = self._triton_client.InferenceServerClient(self.address, ssl=self.ssl)
            else:
                c = self._triton_client.InferenceServerClient(
                    self.address, ssl=self.ssl, connection_timeout=min(60.0, self.timeout), network_timeout=self.timeout
                )
            self._local.client = c
            with self._lock:
                self._all.append(c)
        return c

    def close(self) -> None:
        """Close every connection this client opened (in any thread)."""
        with self._lock:
            clients, self._all = self._all, []
        for c in clients:
            try:
                c.close()
            except Exception:  # noqa: BLE001, S110 - closing is best effort
                pass
        self._local = threading.local()

    def __enter__(self) -> GvslClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _unreachable(self, e: BaseException) -> GvslInputError:
        return GvslInputError(
            f"--server {self.url}: cannot reach the gvsl server ({_one_line(e, 160)}); start it with `gvsl serve` "
            "or check the address"
        )

    def _server_error(self, e: BaseException, model: str) -> GvslInputError:
        text = str(e)
        found = _GVSL_ERROR.findall(text)
        if found:
            return GvslInputError(" ".join(found[-1].split()))
        low = text.lower()
        if any(w in low for w in ("connection refused", "unavailable", "failed to connect", "connect error")):
            return self._unreachable(e)
        return GvslInputError(f"{self.url} {model}: {_one_line(e)}")

    def check(self, models: Sequence[str] | None = None) -> None:
        """Raise one line unless the server is up and every model in ``models`` is ready."""
        models = list(models) if models is not None else [self.embed_model, self.register_model]
        try:
            c = self._client()
            live = c.is_server_live()
            ready = {m: c.is_model_ready(m) for m in models}
        except Exception as e:  # noqa: BLE001 - any transport error means unreachable
            raise self._unreachable(e) from None
        if not live:
            raise GvslInputError(f"--server {self.url}: Triton is not live; check `gvsl serve`'s log")
        missing = [m for m, ok in ready.items() if not ok]
        if missing:
            raise GvslInputError(
                f"--server {self.url}: model {', '.join(missing)} is not ready or not served; start `gvsl serve` "
                "with it (--models)"
            )

    def outputs(self, model: str) -> tuple[str, ...]:
        """The model's output names, from its Triton config (cached)."""
        if model not in self._outputs:
            try:
                cfg = self._client().get_model_config(model)
            except Exception as e:  # noqa: BLE001
                raise self._server_error(e, model) from None
            cfg = cfg.config if hasattr(cfg, "config") else cfg  # gRPC wraps it in a response message
            outs = cfg["output"] if isinstance(cfg, dict) else cfg.output
            self._outputs[model] = tuple(o["name"] if isinstance(o, dict) else o.name for o in outs)
        return self._outputs[model]

    def infer(self, model: str, inputs: dict[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        """One raw request: named arrays (batch axis included) -> requested outputs.

        Asks for the ``error`` output too and turns a refusal into :class:`GvslInputError`.
        """
        triton_client = self._triton_client
        from tritonclient.utils import np_to_triton_dtype

        req = []
        for name, arr in inputs.items():
            a = np.ascontiguousarray(arr)
            t = triton_client.InferInput(name, list(a.shape), np_to_triton_dtype(a.dtype))
            if self.protocol == "http":
                t.set_data_from_numpy(a, binary_data=True)
            else:
                t.set_data_from_numpy(a)
            req.append(t)
        names = list(dict.fromkeys([*outputs, ERROR_OUTPUT]))
        if self.protocol == "http":
            outs = [triton_client.InferRequestedOutput(n, binary_data=True) for n in names]
            kwargs: dict[str, Any] = {}
        else:
            outs = [triton_client.InferRequestedOutput(n) for n in names]
            kwargs = {"client_timeout": self.timeout}
        try:
            res = self._client().infer(model, req, outputs=outs, **kwargs)
        except Exception as e:  # noqa: BLE001 - tritonclient raises several types
            raise self._server_error(e, model) from None
        err = res.as_numpy(ERROR_OUTPUT)
        if err is not None:
            msgs = [m.decode("utf-8", "replace") if isinstance(m, bytes) else str(m) for m in err.ravel()]
            bad = [m for m in msgs if m]
            if bad:
                raise GvslInputError(" ".join(bad[0].removeprefix(ERROR_PREFIX).split()))
        got = {n: res.as_numpy(n) for n in outputs}
        missing = [n for n, v in got.items() if v is None]
        if missing:
            raise GvslInputError(f"{self.url} {model}: the response lacks {', '.join(missing)}")
        return got  # type: ignore[return-value]

    # ------------------------------------------------------------------ embed
    @property
    def has_dense(self) -> bool:
        """Whether the served encoder has dense features."""
        return "features" in self.outputs(self.embed_model)

    def prepare(self, x: VolumeLike) -> tuple[Any, None]:
        """Read and validate one input here (the server preprocesses); same split as
        ``Embedder.prepare`` so batch loops can prefetch the next file."""
        return read_volume(x, max_voxels=self.max_voxels), None

    def embed_prepared(self, vol: Any, pre: Any = None, dense: bool = False, grid: str = "input") -> Any:
        """Embed a volume returned by :meth:`prepare`."""
        from .embed import Embedding

        if grid != "input":
            raise GvslInputError(f"--grid {grid}: a gvsl server returns dense features on the input grid only")
        want = ["embedding", "features"] if dense else ["embedding"]
        has_raw = "embedding_raw" in self.outputs(self.embed_model)
        if has_raw:
            want.append("embedding_raw")
        elif self.embedding == "raw":
            raise GvslInputError(f"{self.url}: this gvsl server sends no embedding_raw; update it (gvsl serve)")
        out = self.infer(
            self.embed_model,
            {
                "image": vol.data[None].astype(np.float32, copy=False),
                "affine": np.asarray(vol.affine, dtype=np.float64)[None],
            },
            want,
        )
        raw = out["embedding_raw"][0] if has_raw else None
        embedding = raw if self.embedding == "raw" else out["embedding"][0]
        return Embedding(
            embedding=embedding,
            embedding_raw=raw,
            # the server standardises whenever its model has statistics: then the two differ
            standardised=raw is not None and not np.array_equal(embedding, raw),
            features=out["features"][0] if dense else None,
            affine=np.asarray(vol.affine, dtype=np.float64),
            source=vol.source,
            windows=0,  # not reported by the server
            model_shape=(0, 0, 0),  # idem
        )

    def embed(self, x: VolumeLike, dense: bool = False) -> Any:
        """Embedding of one volume (path, DICOM folder, ``(array, affine)``); ``dense`` adds
        the features ``[F, X, Y, Z]`` on the input's grid."""
        vol, _ = self.prepare(x)
        return self.embed_prepared(vol, dense=dense)

    # ------------------------------------------------------------------ register
    def register(
        self,
        fixed: VolumeLike,
        moving: VolumeLike,
        labels: VolumeLike | Sequence[VolumeLike] | None = None,
        init: str = "auto",
        refine: Any = None,
        fixed_labels: VolumeLike | Sequence[VolumeLike] | None = None,
    ) -> Any:
        """Register ``moving`` onto ``fixed`` on the server; returns a ``Registration`` on the
        fixed grid (label maps warped, and scored against ``fixed_labels``, here with the served
        field). ``refine``: a :class:`~gvsl.runtime.refine.RefineOptions` (iterations and
        regularisation are sent, and whether to run the network; ``None`` = the server's defaults)."""
        from .register import Registration, score_labels
        from .warp import warp_by_displacement

        if init not in INITS:
            raise GvslInputError(f"--init {init}: use one of {', '.join(INITS)}")
        fvol = read_volume(fixed, max_voxels=self.max_voxels)
        mvol = read_volume(moving, max_voxels=self.max_voxels)
        label_list: list[Any] = [] if labels is None else labels if isinstance(labels, list) else [labels]
        label_maps = [load_labels(lab, max_voxels=self.max_voxels) for lab in label_list]
        reference_list: list[Any] = (
            []
            if fixed_labels is None
            else list(fixed_labels)
            if isinstance(fixed_labels, list | tuple)
            else [fixed_labels]
        )
        reference_maps = [load_labels(lab, max_voxels=self.max_voxels) for lab in reference_list]
        extra: dict[str, np.ndarray] = {}
        if refine is not None:
            extra["refine"] = np.array([[int(refine.iterations)]], dtype=np.int32)
            extra["regularisation"] = np.array([[float(refine.regularisation)]], dtype=np.float32)
            extra["network"] = np.array([[bool(refine.network)]], dtype=np.bool_)
        out = self.infer(
            self.register_model,
            {
                "fixed": fvol.data[None],
                "fixed_affine": fvol.affine[None].astype(np.float64),
                "moving": mvol.data[None],
                "moving_affine": mvol.affine[None].astype(np.float64),
                "init": np.array([[init.encode()]], dtype=object),
                **extra,
            },
            ["affine", "matrix", "dvf", "warped", "metrics", "shift", "network_used"],
        )
        dvf_mm = out["dvf"][0]
        shift = np.asarray(out["shift"][0], dtype=np.float64)
        fill = float(mvol.data.min())
        before = warp_by_displacement(
            mvol.data, mvol.affine, fvol.affine, None, order=1, cval=fill, shift_mm=shift, dst_shape=fvol.data.shape
        )
        warped_labels = [
            warp_by_displacement(lab, lab_aff, fvol.affine, dvf_mm, order=0, cval=0) for lab, lab_aff, _ in label_maps
        ]
        return Registration(
            warped=out["warped"][0],
            affine=fvol.affine,
            dvf_mm=dvf_mm,
            labels=warped_labels,
            matrix=out["matrix"][0],
            world_matrix=out["affine"][0],
            metrics={k: float(v) for k, v in zip(METRICS, out["metrics"][0], strict=True)},
            fixed=fvol.data,
            moving_before=before,
            fixed_source=fvol.source,
            moving_source=mvol.source,
            label_sources=[name for _, _, name in label_maps],
            shift_mm=shift,
            dice=score_labels(warped_labels, label_maps, reference_maps, fvol),
            network=bool(np.asarray(out["network_used"][0]).reshape(-1)[0]),
        )
