"""Can this interpreter run ``gvsl serve``? Triton's Python-backend stub and its libpython.

Triton runs Python models in a *stub* process that embeds whichever
``libpython3.X.so`` the dynamic loader finds but imports the standard library
of the interpreter that started the server; :func:`interpreter_problem` finds
that library the way the loader will and compares versions, so a mismatch is
one line before start-up instead of a failure at model load.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path


def _ldd_libpython(stub: Path, lib_dirs: Sequence[Path]) -> Path | None:
    """The libpython the Triton Python-backend stub will load (``ldd`` with the library
    path PyTriton gives the server); None when ldd cannot tell."""
    ldd = shutil.which("ldd")
    if ldd is None:
        return None
    env = dict(os.environ)
    extra = ":".join(str(d) for d in lib_dirs)
    env["LD_LIBRARY_PATH"] = f"{env['LD_LIBRARY_PATH']}:{extra}" if env.get("LD_LIBRARY_PATH") else extra
    try:
        out = subprocess.run([ldd, str(stub)], capture_output=True, text=True, env=env, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.stdout.splitlines():
        m = re.match(r"\s*(libpython\S+)\s+=>\s+(\S+)", line)
        if m:
            return None if m.group(2) == "not" else Path(m.group(2))
    return None


def library_python_version(lib: Path) -> str | None:
    """``"3.11.2"``: the version compiled into a libpython (``Py_GetVersion``), read in a
    throw-away process so the library never shares this interpreter's address space."""
    code = (
        "import ctypes, sys; f = ctypes.CDLL(sys.argv[1]).Py_GetVersion; f.restype = ctypes.c_char_p; "
        "print(f().decode().split()[0])"
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", code, str(lib)], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    v = out.stdout.strip()
    return v if out.returncode == 0 and re.fullmatch(r"\d+\.\d+\.\d+\S*", v) else None


def interpreter_problem(stub: Path | None = None, lib_dirs: Sequence[Path] | None = None) -> str | None:
    """Why this interpreter cannot run ``gvsl serve``, or None when it can.

    Triton's Python backend runs the models in a *stub* process that embeds
    ``libpython3.X.so`` (whichever the dynamic loader finds) but imports the
    standard library and packages of this interpreter. When the two versions
    differ (a pyenv/conda Python built without a shared libpython, next to the
    system's), the stub fails at model load, e.g. with ``'_thread.RLock' object
    has no attribute '_recursion_count'``. This finds the stub's libpython the way
    the loader will and compares versions. ``stub``/``lib_dirs`` default to
    PyTriton's own (tests pass another interpreter's).
    """
    here = sys.version.split()[0]
    if stub is None:
        try:
            from pytriton.utils.distribution import get_libs_path, get_stub_path
        except ImportError:
            return (
                f"nvidia-pytriton is not installed for {sys.executable} (Python {here}); install gvsl[serve] in a "
                "venv made from a Python whose libpython matches (README: gvsl serve) and pass --python "
                "VENV/bin/python or set GVSL_SERVE_PYTHON"
            )
        stub = Path(get_stub_path(f"{sys.version_info.major}.{sys.version_info.minor}"))
        lib_dirs = [Path(get_libs_path())]
    if not stub.is_file():
        return (
            f"PyTriton ships no Triton Python-backend stub for Python {sys.version_info.major}."
            f"{sys.version_info.minor} ({stub}); make the serve venv from Python 3.8-3.13"
        )
    lib = _ldd_libpython(stub, list(lib_dirs or []))
    if lib is None:
        return (
            f"the Triton Python-backend stub {stub} finds no libpython{sys.version_info.major}."
            f"{sys.version_info.minor}.so; install it (Debian: apt-get install libpython3.{sys.version_info.minor}) "
            "or make the serve venv from a Python built with --enable-shared"
        )
    found = library_python_version(lib)
    if found is None or found == here:
        return None
    return (
        f"Python {here} ({sys.executable}) cannot run gvsl serve: Triton's Python-backend stub loads {lib} "
        f"(Python {found}), and mixing the two fails at model load; make the serve venv from the Python that owns "
        f"that library (e.g. `{_system_python_hint()} -m venv build/serve-venv`, then "
        "`build/serve-venv/bin/pip install -e .[cpu,serve]`) and pass --python build/serve-venv/bin/python"
    )


def _system_python_hint() -> str:
    v = f"python{sys.version_info.major}.{sys.version_info.minor}"
    return f"/usr/bin/{v}" if Path(f"/usr/bin/{v}").exists() else v


__all__ = ["interpreter_problem", "library_python_version"]
