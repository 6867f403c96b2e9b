"""The one atomic writer of the project: write to a temporary file beside the
destination, give it the permissions an ordinary ``open(path, "w")`` would
have, then rename it into place.

A reader (or a crash) never sees half a file, and what is published carries
the user's umask (``0o666 & ~umask``: 0644 under umask 022, 0600 under 077)
instead of the owner-only 0600 that :func:`tempfile.mkstemp` creates. Every
output of gvsl (checkpoints, safetensors, ONNX files, engines, npy/npz,
NIfTI, tables, figures) goes through :func:`atomic_write`. This module has no
dependencies beyond the standard library, so every layer can import it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "current_umask", "published_mode", "save_text"]


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows
    (``/proc/self/status``), else by the set-and-restore ``os.umask`` dance."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def published_mode(directory: bool = False) -> int:
    """Permission bits a newly created file (or folder) gets under the current umask."""
    return (0o777 if directory else 0o666) & ~current_umask()


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], None]) -> Path:
    """Call ``write(tmp)`` with a temporary path in ``path``'s folder, set its mode
    from the umask, and rename it onto ``path`` (atomic on one file system).

    The temporary name keeps the destination's suffix (``.nii.gz``, ``.onnx``,
    ...), for writers that choose the format by it. On any error the temporary
    file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    name = path.name
    suffix = ".nii.gz" if name.lower().endswith(".nii.gz") else path.suffix
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{name}.", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, published_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` atomically as UTF-8, whatever the locale."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
