"""The export layer's error type.

A subclass of :class:`GvslInputError`, so the CLI's one-line handler reports it
(``error: ...``, exit 2) without a traceback. Raised for bad sources and options,
for missing tools (TensorRT, a GPU) and when a parity check fails.
"""

from __future__ import annotations

from gvsl.runtime.errors import GvslInputError


class ExportError(GvslInputError):
    """Export cannot proceed, or what it produced failed verification. One line: what and how to fix."""


__all__ = ["ExportError"]
