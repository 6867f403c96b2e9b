"""Entry point of the ``gvsl`` command: imports every command module onto the app.

``python -m gvsl.cli.main`` works too, and is how ``torchrun`` starts each
training process (:func:`run_worker`).
"""

import os
import sys

from gvsl.cli import (
    bench_cmd,  # noqa: F401  (registers `gvsl bench`)
    demo_cmd,  # noqa: F401  (registers `gvsl synth`, `demo`, `probe`, `finetune`)
    embed_cmd,  # noqa: F401  (registers `gvsl embed`)
    embed_stats_cmd,  # noqa: F401  (registers `gvsl embed-stats`)
    export_cmd,  # noqa: F401
    register_cmd,  # noqa: F401  (registers `gvsl register`)
    serve_cmd,  # noqa: F401
    train_cmd,  # noqa: F401  (registers `gvsl train`)
)
from gvsl.cli.app import app

__all__ = ["app", "main", "run_worker"]


def _exit_status(code: object) -> int:
    """The process status ``sys.exit(code)`` would give (None -> 0, a message -> 1)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def run_worker() -> None:
    """Run the app as one process of a ``torchrun`` job and leave without interpreter teardown.

    A process group that DistributedDataParallel has used stays alive after
    ``destroy_process_group`` in torch 2.13 (its gloo threads are still running
    at exit: the reducer keeps it), and tearing it down during interpreter
    finalisation has aborted a rank ("terminate called without an active
    exception") after the run had finished and written everything. So a
    worker flushes its streams and ends with ``os._exit`` and the command's
    own status, once the command has returned or exited (every file the
    command writes is closed by then: they are written through temp files).
    """
    try:
        app(prog_name="gvsl")
        status = 0
    except SystemExit as e:
        status = _exit_status(e.code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def main() -> None:
    """The ``gvsl`` command: :func:`run_worker` inside a ``torchrun`` job, the plain app otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        run_worker()
    else:
        app(prog_name="gvsl")


if __name__ == "__main__":
    main()
