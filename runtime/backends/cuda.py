"""The few CUDA runtime calls the TensorRT backend needs, through ctypes (no torch, no pycuda).

Device buffers, page-locked (pinned) host buffers for the copies, streams,
asynchronous copies and the GPU's compute capability. ``libcudart`` is found
on the library path or in NVIDIA's pip wheels (``nvidia-cuda-runtime-cu12``).
"""

from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path

import numpy as np

from ..errors import GvslInputError

#: cudaDeviceGetAttribute codes of the compute capability
_ATTR_CC_MAJOR, _ATTR_CC_MINOR = 75, 76


def _nvidia_lib_dirs() -> list[Path]:
    """lib folders of NVIDIA's pip wheels (nvidia-cuda-runtime-cu12 ...), if installed."""
    out = []
    spec = importlib.util.find_spec("nvidia")
    for root in list(spec.submodule_search_locations or []) if spec else []:
        out += [p for p in Path(root).glob("*/lib") if p.is_dir()]
    return out


class CudaRuntime:
    """``libcudart`` through ctypes: pointers are plain ints, streams too."""

    H2D, D2H = 1, 2

    def __init__(self) -> None:
        lib = None
        names = ["libcudart.so", "libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0", "cudart64_12.dll"]
        for base in _nvidia_lib_dirs():
            names += [str(p) for p in sorted(base.glob("libcudart.so*"))]
        for n in names:
            try:
                lib = ctypes.CDLL(n)
                break
            except OSError:
                continue
        if lib is None:
            raise GvslInputError(
                "--backend tensorrt: the CUDA runtime (libcudart) was not found; install the CUDA runtime "
                "(pip install nvidia-cuda-runtime-cu12) or use --backend onnxruntime"
            )
        self.lib = lib
        pointer, size = ctypes.c_void_p, ctypes.c_size_t
        lib.cudaMalloc.argtypes = [ctypes.POINTER(pointer), size]
        lib.cudaFree.argtypes = [pointer]
        lib.cudaMallocHost.argtypes = [ctypes.POINTER(pointer), size]
        lib.cudaFreeHost.argtypes = [pointer]
        lib.cudaMemcpyAsync.argtypes = [pointer, pointer, size, ctypes.c_int, pointer]
        lib.cudaStreamCreate.argtypes = [ctypes.POINTER(pointer)]
        lib.cudaStreamSynchronize.argtypes = [pointer]
        lib.cudaStreamDestroy.argtypes = [pointer]
        lib.cudaSetDevice.argtypes = [ctypes.c_int]
        lib.cudaDeviceGetAttribute.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_int, ctypes.c_int]
        lib.cudaGetErrorString.restype = ctypes.c_char_p

    def check(self, code: int, what: str) -> None:
        if code:
            msg = self.lib.cudaGetErrorString(code).decode(errors="replace")
            raise RuntimeError(f"CUDA {what} failed: {msg} ({code})")

    def set_device(self, index: int) -> None:
        self.check(self.lib.cudaSetDevice(index), "cudaSetDevice")

    def compute_capability(self, index: int) -> str:
        """``"8.6"`` for device ``index``."""
        major, minor = ctypes.c_int(), ctypes.c_int()
        self.check(
            self.lib.cudaDeviceGetAttribute(ctypes.byref(major), _ATTR_CC_MAJOR, index), "cudaDeviceGetAttribute"
        )
        self.check(
            self.lib.cudaDeviceGetAttribute(ctypes.byref(minor), _ATTR_CC_MINOR, index), "cudaDeviceGetAttribute"
        )
        return f"{major.value}.{minor.value}"

    def malloc(self, nbytes: int) -> int:
        ptr = ctypes.c_void_p()
        self.check(self.lib.cudaMalloc(ctypes.byref(ptr), max(1, int(nbytes))), "cudaMalloc")
        return int(ptr.value or 0)

    def free(self, ptr: int) -> None:
        if ptr:
            self.lib.cudaFree(ctypes.c_void_p(ptr))

    def malloc_host(self, nbytes: int) -> int:
        """Page-locked host memory: copies from it run at full PCIe speed and truly asynchronously."""
        ptr = ctypes.c_void_p()
        self.check(self.lib.cudaMallocHost(ctypes.byref(ptr), max(1, int(nbytes))), "cudaMallocHost")
        return int(ptr.value or 0)

    def free_host(self, ptr: int) -> None:
        if ptr:
            self.lib.cudaFreeHost(ctypes.c_void_p(ptr))

    def stream(self) -> int:
        s = ctypes.c_void_p()
        self.check(self.lib.cudaStreamCreate(ctypes.byref(s)), "cudaStreamCreate")
        return int(s.value or 0)

    def destroy_stream(self, stream: int) -> None:
        if stream:
            self.lib.cudaStreamDestroy(ctypes.c_void_p(stream))

    def copy(self, dst: int, src: int, nbytes: int, kind: int, stream: int) -> None:
        code = self.lib.cudaMemcpyAsync(
            ctypes.c_void_p(dst), ctypes.c_void_p(src), nbytes, kind, ctypes.c_void_p(stream)
        )
        self.check(code, "cudaMemcpyAsync")

    def sync(self, stream: int) -> None:
        self.check(self.lib.cudaStreamSynchronize(ctypes.c_void_p(stream)), "cudaStreamSynchronize")


def host_view(ptr: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A numpy array over ``ptr`` (pinned host memory) without copying."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = (ctypes.c_byte * max(nbytes, 1)).from_address(ptr)
    return np.frombuffer(raw, dtype=dtype, count=nbytes // dtype.itemsize).reshape(shape)


__all__ = ["CudaRuntime", "host_view"]
