"""The one exception type for bad user input.

Training, inference and the CLI all catch :class:`GvslInputError` and print its
message as-is, so the message must stand on its own: one line that names the
file and says what to do about it.
"""

from __future__ import annotations


class GvslInputError(ValueError):
    """Bad user input (a file, folder or option). One-line message: what and how to fix.

    ``path`` (optional) is the offending file or folder, for callers that want to
    list or skip it.
    """

    def __init__(self, message: str, path: object | None = None) -> None:
        super().__init__(" ".join(str(message).split()))  # force a single line
        self.path = path


__all__ = ["GvslInputError"]
