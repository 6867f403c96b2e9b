"""Entry point of the ``gvsl`` command: imports every command module onto the app.

``python -m gvsl.cli.main`` works too (torchrun uses it).
"""

from gvsl.cli import (
    bench_cmd,  # noqa: F401  (registers `gvsl bench`)
    demo_cmd,  # noqa: F401  (registers `gvsl synth`, `demo`, `probe`, `finetune`)
    embed_stats_cmd,  # noqa: F401  (registers `gvsl embed-stats`)
    export_cmd,  # noqa: F401
    runtime_cmd,  # noqa: F401
    serve_cmd,  # noqa: F401
    train_cmd,  # noqa: F401  (registers `gvsl train`)
)
from gvsl.cli.app import app

__all__ = ["app"]

if __name__ == "__main__":
    app()
