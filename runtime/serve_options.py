"""What ``gvsl serve`` is asked to do: :class:`ServeOptions`, validated before anything starts,
and :class:`ServeError`, the one-line refusal when the server cannot start or run as asked.

Apart from :mod:`gvsl.runtime.serve` so that the CLI and clients can build and check options
without the handlers and the Triton plumbing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import GvslInputError
from .io import DEFAULT_MAX_VOXELS
from .refine_options import DEFAULT_LEVELS, RefineOptions
from .register import INITS

__all__ = ["EMBED_MODEL", "REGISTER_MODEL", "ServeError", "ServeOptions"]

EMBED_MODEL = "gvsl_embed"
REGISTER_MODEL = "gvsl_register"


class ServeError(GvslInputError):
    """The server cannot start or run as asked (interpreter, ports, model). One line."""


@dataclass
class ServeOptions:
    """Everything ``gvsl serve`` configures. Ports 0 are not allowed: Triton needs fixed ports."""

    model: Path
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    instances: int = 1
    max_batch: int = 4
    queue_delay_us: int = 2000
    max_request_mb: float = 1024.0
    max_voxels: int = DEFAULT_MAX_VOXELS
    backend: str = "auto"
    device: str = "auto"
    threads: int = 0
    overlap: float = 0.5
    window_batch: int = 1
    init: str = "auto"
    refine: int = RefineOptions.iterations
    refine_levels: tuple[float, ...] = DEFAULT_LEVELS
    regularisation: float = RefineOptions.regularisation
    #: gvsl_register starts its refinement from the network (False: from the initial alignment alone)
    network: bool = RefineOptions.network
    #: normalisation of every request (auto: CT or MR decided per volume; None: the model's own)
    modality: str | None = "auto"
    exit_timeout: int = 10
    log_verbose: int = 0
    log_file: Path | None = None
    models: tuple[str, ...] = (EMBED_MODEL, REGISTER_MODEL)
    allow_cpu_fallback: bool = False
    ready_file: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        ports = {"--http-port": self.http_port, "--grpc-port": self.grpc_port, "--metrics-port": self.metrics_port}
        for name, p in ports.items():
            if not 1 <= int(p) <= 65535:
                raise ServeError(f"{name} {p}: give a port between 1 and 65535")
        if len(set(ports.values())) != 3:
            raise ServeError(f"--http-port, --grpc-port and --metrics-port must differ, got {sorted(ports.values())}")
        for name, v, lo in (
            ("--instances", self.instances, 1),
            ("--max-batch", self.max_batch, 1),
            ("--max-voxels", self.max_voxels, 8),
            ("--window-batch", self.window_batch, 1),
        ):
            if int(v) < lo:
                raise ServeError(f"{name} {v}: must be at least {lo}")
        if not self.max_request_mb > 0:
            raise ServeError(f"--max-request-mb {self.max_request_mb}: must be positive")
        if self.queue_delay_us < 0:
            raise ServeError(f"--queue-delay-us {self.queue_delay_us}: must be >= 0")
        if self.init not in INITS:
            raise ServeError(f"--init {self.init}: use one of {', '.join(INITS)}")
        from .preprocess_config import MODALITIES

        if self.modality is not None and self.modality not in MODALITIES:
            raise ServeError(f"--modality {self.modality}: use one of {', '.join(MODALITIES)} or model")
        if not self.models:
            raise ServeError("no model to serve")
        if self.threads < 0:
            raise ServeError(f"--threads {self.threads}: give 1 or more CPU threads (leave it out to use every core)")
