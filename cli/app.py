"""The ``gvsl`` Typer app and what every command shares.

Commands live in their own modules (``train_cmd``, ...) and register on
:data:`app`; ``gvsl.cli.main`` imports them all. Heavy imports (torch,
onnxruntime) happen inside each command, so ``gvsl --help`` is instant and
runtime commands never load torch. User errors print one line
(``error: FILE: what to do``) and exit 2 without a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from gvsl import __version__

app = typer.Typer(
    name="gvsl",
    help="GVSL: self-supervised pre-training, export and fast inference for 3D CT/MR.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True, highlight=False)
F = TypeVar("F", bound=Callable[..., Any])


def _version(value: bool) -> None:
    if value:
        typer.echo(f"gvsl {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """GVSL: self-supervised pre-training, export and fast inference for 3D CT/MR."""


def _user_error_types() -> tuple[type[BaseException], ...]:
    """The project's bad-input exceptions. ``WeightsError`` counts only when
    ``gvsl.io`` is already loaded: importing it would pull torch into
    runtime-only commands, and if it is not loaded nothing can have raised it."""
    from gvsl.config import ConfigError
    from gvsl.runtime.errors import GvslInputError

    known: tuple[type[BaseException], ...] = (GvslInputError, ConfigError)
    io_mod = sys.modules.get("gvsl.io")
    if io_mod is not None:
        known += (io_mod.WeightsError,)
    return known


def user_errors(fn: F) -> F:
    """Turn the project's input errors into one line on stderr and exit code 2."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if not isinstance(e, _user_error_types()):
                raise
            err.print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True, highlight=False)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


#: ``--modality`` of train, embed, register and serve
MODALITY_HELP = (
    "Intensity normalisation: auto (CT when the values look like Hounsfield units, MR otherwise; decided "
    "per volume), ct (HU window), mr (percentiles), none; embed/register/serve: 'model' keeps the model's own."
)


def parse_triple(text: str, what: str, cast: Callable[[str], Any] = int) -> tuple[Any, Any, Any]:
    """``"64"`` -> (64, 64, 64); ``"64,80,96"`` -> (64, 80, 96)."""
    try:
        parts = [cast(x) for x in text.replace("x", ",").split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"{what} must be one number or three comma-separated numbers: {text!r}") from None
    if len(parts) == 1:
        parts *= 3
    if len(parts) != 3:
        raise typer.BadParameter(f"{what} must be one number or three comma-separated numbers: {text!r}")
    return tuple(parts)  # type: ignore[return-value]


def progress_bar(quiet: bool, elapsed: bool = False) -> Any:
    """The rich progress bar every long command shows on stderr (off with ``--quiet``):
    description, bar, done/total, a per-task ``info`` field and time left (or elapsed)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns: list[Any] = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn()]
    columns += [TimeElapsedColumn()] if elapsed else [TextColumn("{task.fields[info]}"), TimeRemainingColumn()]
    return Progress(*columns, console=err, disable=quiet, transient=False)
