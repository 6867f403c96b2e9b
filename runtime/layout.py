"""Memory order of voxel arrays: NIfTI's x-fastest layout and the C order the network takes.

NIfTI stores x fastest, so a file's voxels arrive as a Fortran-ordered array.
Converting such an array to float32 or to C order naively walks memory with
large strides; these copies go in cache-sized blocks on the runtime's CPU pool
instead, and leave arrays that are already right untouched.
"""

from __future__ import annotations

import numpy as np

from .cpu_pool import CHUNK_VOXELS, PARALLEL_MIN_VOXELS, run_chunks


def as_float32(a: np.ndarray) -> np.ndarray:
    """float32 copy in ``a``'s own memory order (no transpose), on threads for big arrays."""
    if a.dtype == np.float32 and (a.flags.c_contiguous or a.flags.f_contiguous) and a.flags.writeable:
        return a
    out = np.empty(a.shape, dtype=np.float32, order="F" if a.flags.f_contiguous else "C")
    if a.flags.f_contiguous:  # slabs along the slowest (last) axis
        n = a.shape[2]
        per = max(1, a.shape[0] * a.shape[1])
        step = max(1, CHUNK_VOXELS // per)
        pieces = [(k, min(k + step, n)) for k in range(0, n, step)]

        def work(k0: int, k1: int) -> None:
            out[:, :, k0:k1] = a[:, :, k0:k1]

        run_chunks(work, pieces, out.size)
        return out
    out[...] = a
    return out


def x_fastest(a: np.ndarray) -> bool:
    """True for NIfTI's layout (also after flips / reorientation views): axis 0 has the
    smallest stride and axis 2 the largest, so ``a.T`` walks memory in C order."""
    s = [abs(x) for x in a.strides]
    return a.ndim == 3 and a.size > 1 and s[0] < s[1] < s[2]


def to_c_float32(a: np.ndarray) -> np.ndarray:
    """``np.ascontiguousarray(a, dtype=float32)``, fast for large x-fastest arrays:
    blocks of 64 x Y x 64 voxels copied plane by plane stay in cache on both sides."""
    if a.ndim != 3 or a.flags.c_contiguous or not x_fastest(a) or a.size < PARALLEL_MIN_VOXELS:
        return np.ascontiguousarray(a, dtype=np.float32)
    out = np.empty(a.shape, dtype=np.float32)
    nx, ny, nz = a.shape
    block = 64

    def work(x0: int, x1: int) -> None:
        for z0 in range(0, nz, block):
            dst, src = out[x0:x1, :, z0 : z0 + block], a[x0:x1, :, z0 : z0 + block]
            for y in range(ny):
                dst[:, y, :] = src[:, y, :]

    run_chunks(work, [(x, min(x + block, nx)) for x in range(0, nx, block)], out.size)
    return out


__all__ = ["as_float32", "to_c_float32", "x_fastest"]
