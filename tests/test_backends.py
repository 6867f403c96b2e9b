"""Backends without a GPU: ONNX Runtime's CPU fallback, the TensorRT backend through a fake
``tensorrt`` module and a fake CUDA runtime, the backend registry, and the CPU thread pool.

The fake TensorRT engine computes known numbers from the bytes the backend copies
into its (host-memory) "device" buffers, so a wrong copy, shape or address shows as
a wrong number; its contexts can be told to block, to fail creation, or to reject a
shape, which is how pool exhaustion, close during a run and shape rejection are
driven on a CPU.
"""

from __future__ import annotations

import ctypes
import json
import logging
import subprocess
import sys
import textwrap
import threading
import types
from pathlib import Path

import numpy as np
import pytest
from test_runtime import _aff, _save, tiny_artifacts
from typer.testing import CliRunner

from gvsl.cli.main import app
from gvsl.runtime import GvslInputError, cpu_pool
from gvsl.runtime.backends import TensorRTBackend, load_backend, tensorrt_runtime
from gvsl.runtime.embed import Embedder

runner = CliRunner()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    return tiny_artifacts(tmp_path_factory.getbasetemp())


# ----------------------------------------------------------------------------- ONNX Runtime fallback
def _ort_that_falls_back(monkeypatch) -> list:
    """Install an ``onnxruntime`` that offers CUDA but, like a build whose CUDA libraries are
    missing, gives every session the CPU provider only. Returns (providers requested,
    log severity) of every session."""
    import onnxruntime as real

    requested: list = []

    class Session(real.InferenceSession):
        def __init__(self, path, options=None, providers=None):
            requested.append((list(providers or []), options.log_severity_level))
            super().__init__(path, options, providers=["CPUExecutionProvider"])

    fake = types.SimpleNamespace(
        __version__=real.__version__,
        __spec__=real.__spec__,
        SessionOptions=real.SessionOptions,
        GraphOptimizationLevel=real.GraphOptimizationLevel,
        InferenceSession=Session,
        get_available_providers=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    monkeypatch.setitem(sys.modules, "onnxruntime", fake)
    return requested


def test_cuda_request_that_gets_the_cpu_is_an_error(tiny, monkeypatch):
    requested = _ort_that_falls_back(monkeypatch)
    with pytest.raises(GvslInputError) as info:
        load_backend(tiny[1], "encoder", "onnxruntime", "cuda")
    msg = str(info.value)
    assert "\n" not in msg
    assert "CUDAExecutionProvider" in msg and "fell back to CPUExecutionProvider" in msg
    assert "--allow-cpu-fallback" in msg and "--device cpu" in msg
    providers, severity = requested[-1]
    assert [p if isinstance(p, str) else p[0] for p in providers] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert severity == 2  # ONNX Runtime's own warning about the provider it dropped is not hidden
    load_backend(tiny[1], "encoder", "onnxruntime", "cpu")
    assert requested[-1] == (["CPUExecutionProvider"], 3)  # on the CPU only errors, as before


def test_allow_cpu_fallback_warns_and_gives_the_cpu_numbers(tiny, monkeypatch, caplog):
    x = np.random.default_rng(0).random((1, 1, 32, 32, 16), dtype=np.float32)
    reference = load_backend(tiny[1], "encoder", "onnxruntime", "cpu").run({"image": x})
    _ort_that_falls_back(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="gvsl.runtime"):
        backend = Embedder(tiny[1], "onnxruntime", "cuda", allow_cpu_fallback=True).backend
    warnings = [r.getMessage() for r in caplog.records if r.name == "gvsl.runtime"]
    assert len(warnings) == 1 and "running on the CPU (--allow-cpu-fallback)" in warnings[0]
    assert backend.providers == ("CPUExecutionProvider",)
    got = backend.run({"image": x})
    np.testing.assert_array_equal(got["embedding"], reference["embedding"])
    np.testing.assert_array_equal(got["features"], reference["features"])


def test_cli_device_cuda_fails_or_falls_back_on_request(tiny, monkeypatch, tmp_path, mni_small_arrays):
    vol = _save(tmp_path / "a.nii.gz", mni_small_arrays["t1"][:28, :28, :28].astype(np.float32), _aff())
    _ort_that_falls_back(monkeypatch)
    args = ["embed", str(vol), "-m", str(tiny[1]), "-o", str(tmp_path / "out"), "--device", "cuda", "-q"]
    res = runner.invoke(app, args)
    assert res.exit_code == 2
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "--allow-cpu-fallback" in lines[0] and "Traceback" not in res.output
    assert not (tmp_path / "out" / "a.npy").exists()
    res = runner.invoke(app, [*args, "--allow-cpu-fallback"])
    assert res.exit_code == 0, res.output
    assert np.load(tmp_path / "out" / "a.npy").shape == (32,)


def test_cli_threads_below_one_is_one_line(tiny, tmp_path):
    for command in (
        ["embed", "x.nii.gz", "-o", str(tmp_path / "o")],
        ["register", "a.nii.gz", "b.nii.gz", "-o", "w.nii.gz"],
    ):
        res = runner.invoke(app, [*command, "-m", str(tiny[1]), "--threads", "0"])
        assert res.exit_code == 2
        lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
        assert len(lines) == 1 and "--threads 0: give 1 or more CPU threads" in lines[0], res.output


# ----------------------------------------------------------------------------- registry
def test_torch_models_without_core_name_the_fix(tiny):
    """In a process that never imported gvsl core, a trained model is one line saying what to import."""
    code = textwrap.dedent(
        f"""
        import sys
        from gvsl.runtime import GvslInputError
        from gvsl.runtime.backends import load_backend
        try:
            load_backend({str(tiny[0])!r}, "encoder", "auto", "cpu")
        except GvslInputError as e:
            print(e)
        assert "gvsl.torch_backend" not in sys.modules and "torch" not in sys.modules
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "install/import gvsl core to use torch models" in res.stdout and "tiny_model" in res.stdout


def test_runtime_imports_nothing_from_core_or_torch():
    code = "import gvsl.runtime.embed, gvsl.runtime.register, gvsl.runtime.serve, sys; " + (
        "bad = [m for m in sys.modules if m == 'torch' or (m.startswith('gvsl.') and not "
        "m.startswith('gvsl.runtime'))]; print(bad)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "[]"


def test_runtime_source_never_imports_torch_or_core_even_lazily():
    """Every import statement in runtime/ (inside functions too) stays in the runtime, the
    standard library or its third-party dependencies: never torch, never gvsl core."""
    import ast

    root = Path(__file__).resolve().parents[1] / "runtime"
    bad = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module" and node.args:
                names = [getattr(node.args[0], "value", "")]
            for name in names:
                top = str(name).split(".")
                if top[0] == "torch" or (top[0] == "gvsl" and top[1:2] != ["runtime"]):
                    bad.append(f"{path.relative_to(root.parent)}:{node.lineno}: {name}")
    assert not bad, bad


# ----------------------------------------------------------------------------- CPU pool
def test_one_bounded_cpu_pool_for_concurrent_callers():
    """16 callers at once, each running threaded passes: every piece is done exactly once and
    no more than ``threads`` threads ever work on them (callers included)."""
    cpu_pool.set_threads(3)
    try:
        lock = threading.Lock()
        workers: set[str] = set()
        busy = [0, 0]  # now, most at once

        def caller(out: np.ndarray) -> None:
            def piece(a: int, b: int) -> None:
                with lock:
                    name = threading.current_thread().name
                    if name.startswith("gvsl-cpu"):
                        workers.add(name)
                        busy[0] += 1
                        busy[1] = max(busy[1], busy[0])
                out[a:b] += np.arange(a, b)
                np.sqrt(np.ones(20000)).sum()  # some work that releases the GIL
                with lock:
                    if threading.current_thread().name.startswith("gvsl-cpu"):
                        busy[0] -= 1

            for _ in range(5):
                cpu_pool.run_pieces(piece, [(a, a + 10) for a in range(0, 400, 10)])

        outs = [np.zeros(400) for _ in range(16)]
        threads = [threading.Thread(target=caller, args=(o,)) for o in outs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
        for o in outs:
            np.testing.assert_array_equal(o, 5 * np.arange(400))
        assert len(workers) <= 2 and busy[1] <= 2  # one pool of threads - 1 helpers for the whole process
    finally:
        cpu_pool.set_threads(None)


def test_cpu_pool_errors_reach_the_caller_and_bad_sizes_are_refused():
    cpu_pool.set_threads(2)
    try:

        def piece(a: int, b: int) -> None:
            if a == 30:
                raise ValueError("piece 30")

        with pytest.raises(ValueError, match="piece 30"):
            cpu_pool.run_pieces(piece, [(a, a + 10) for a in range(0, 100, 10)])
    finally:
        cpu_pool.set_threads(None)
    with pytest.raises(GvslInputError, match=r"--threads -2: give 1 or more"):
        cpu_pool.set_threads(-2)
    assert cpu_pool.thread_count() == cpu_pool.default_threads()


# ----------------------------------------------------------------------------- fake TensorRT
class FakeCuda:
    """CUDA on host memory: "device" pointers are real addresses, copies are memmove."""

    H2D, D2H = 1, 2

    def __init__(self, capability: str = "8.6") -> None:
        self.capability = capability
        self.device: dict[int, np.ndarray] = {}
        self.host: dict[int, np.ndarray] = {}
        self.streams = 0
        self.freed = 0

    def _alloc(self, table: dict, nbytes: int) -> int:
        buf = np.zeros(max(1, nbytes), np.uint8)
        table[buf.ctypes.data] = buf
        return buf.ctypes.data

    def set_device(self, index: int) -> None:
        pass

    def compute_capability(self, index: int) -> str:
        return self.capability

    def malloc(self, nbytes: int) -> int:
        return self._alloc(self.device, nbytes)

    def malloc_host(self, nbytes: int) -> int:
        return self._alloc(self.host, nbytes)

    def free(self, ptr: int) -> None:
        if ptr:
            del self.device[ptr]
            self.freed += 1

    def free_host(self, ptr: int) -> None:
        if ptr:
            del self.host[ptr]
            self.freed += 1

    def stream(self) -> int:
        self.streams += 1
        return self.streams

    def destroy_stream(self, stream: int) -> None:
        self.streams -= 1

    def copy(self, dst: int, src: int, nbytes: int, kind: int, stream: int) -> None:
        ctypes.memmove(dst, src, nbytes)

    def sync(self, stream: int) -> None:
        pass


def _array_at(ptr: int, shape: tuple[int, ...]) -> np.ndarray:
    raw = (ctypes.c_byte * (int(np.prod(shape)) * 4)).from_address(ptr)
    return np.frombuffer(raw, np.float32).reshape(shape)


def expected(x: np.ndarray) -> dict[str, np.ndarray]:
    """What the fake encoder engine computes: per-sample statistics and two feature maps."""
    flat = x.reshape(x.shape[0], -1)
    embedding = np.stack([flat.mean(1), flat.max(1), flat.min(1), flat.sum(1)], 1).astype(np.float32)
    return {"embedding": embedding, "features": np.concatenate([x, -2 * x], 1)}


class FakeContext:
    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.shapes: dict[str, tuple] = {}
        self.addresses: dict[str, int] = {}

    def set_optimization_profile_async(self, index: int, stream: int) -> bool:
        self.profile = index
        return 0 <= index < len(self.engine.profiles)

    def set_input_shape(self, name: str, shape: tuple) -> bool:
        if list(shape) in self.engine.reject:
            return False
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name: str, ptr: int) -> None:
        self.addresses[name] = ptr

    def get_tensor_shape(self, name: str) -> tuple:
        n, _, d, h, w = self.shapes["image"]
        return (n, 4) if name == "embedding" else (n, 2, d, h, w)

    def execute_async_v3(self, stream: int) -> bool:
        self.engine.running += 1
        self.engine.started.set()
        try:
            if self.engine.gate is not None:
                assert self.engine.gate.wait(30)
            x = _array_at(self.addresses["image"], self.shapes["image"]).copy()
            for name, value in expected(x).items():
                _array_at(self.addresses[name], self.get_tensor_shape(name))[...] = value
            return True
        finally:
            self.engine.running -= 1


class FakeEngine:
    def __init__(self, spec: dict) -> None:
        self.profiles = spec["profiles"]
        self.failures = spec.get("fail_contexts", 0)
        self.reject = spec.get("reject", [])
        self.gate: threading.Event | None = None
        self.started = threading.Event()
        self.running = 0
        self.contexts = 0
        self.num_io_tensors = 3
        self.num_optimization_profiles = len(self.profiles)

    def get_tensor_name(self, i: int) -> str:
        return ("image", "embedding", "features")[i]

    def get_tensor_mode(self, name: str) -> str:
        return "input" if name == "image" else "output"

    def get_tensor_dtype(self, name: str) -> str:
        return "float32"

    def get_tensor_profile_shape(self, name: str, index: int) -> tuple:
        return tuple(tuple(s) for s in self.profiles[index])

    def create_execution_context(self) -> FakeContext | None:
        if self.failures:
            self.failures -= 1
            return None
        self.contexts += 1
        return FakeContext(self)


def fake_tensorrt(version: str = "10.9.0") -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.Logger = type("Logger", (), {"ERROR": 1, "WARNING": 2, "__init__": lambda self, level=0: None})
    trt.TensorIOMode = types.SimpleNamespace(INPUT="input", OUTPUT="output")
    trt.nptype = lambda dtype: np.float32
    trt.engines = []

    class Runtime:
        def __init__(self, logger) -> None:
            pass

        def deserialize_cuda_engine(self, plan: bytes) -> FakeEngine:
            engine = FakeEngine(json.loads(plan))
            trt.engines.append(engine)
            return engine

    trt.Runtime = Runtime
    return trt


PROFILE = [[1, 1, 16, 16, 16], [1, 1, 32, 32, 32], [2, 1, 32, 32, 48]]


def write_export(
    folder: Path, *, profiles: int = 2, trt_version: str = "10.9.0", capability: str = "8.6", **spec
) -> Path:
    """An export folder as `gvsl export --format engine` writes it, with a fake engine."""
    folder.mkdir(parents=True, exist_ok=True)
    name = f"encoder.fp32.sm{capability.replace('.', '')}.trt{trt_version}.engine"
    (folder / name).write_text(json.dumps({"profiles": [PROFILE] * profiles, **spec}))
    widths = [4, 4, 4, 4, 4, 4, 4, 4, 2]
    manifest = {
        "format": "gvsl-export",
        "model": {"widths": widths},
        "preprocess": {},
        "patch_size": [32, 32, 32],
        "artifacts": [
            {
                "file": name,
                "kind": "encoder",
                "format": "engine",
                "precision": "fp32",
                "gpu": "Fake GPU",
                "compute_capability": capability,
                "tensorrt_version": trt_version,
            }
        ],
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder / name


@pytest.fixture
def fake_gpu(monkeypatch) -> tuple[types.ModuleType, list[FakeCuda]]:
    trt = fake_tensorrt()
    cudas: list[FakeCuda] = []

    def make_cuda() -> FakeCuda:
        cudas.append(FakeCuda())
        return cudas[-1]

    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(tensorrt_runtime, "CudaRuntime", make_cuda)
    return trt, cudas


def test_exported_engine_runs_with_the_right_numbers(fake_gpu, tmp_path):
    engine_file = write_export(tmp_path / "export")
    rng = np.random.default_rng(0)
    for source in (engine_file, tmp_path / "export"):  # the .engine file, or its engine-only export folder
        backend = load_backend(source, "encoder", "auto", "cuda")
        assert isinstance(backend, TensorRTBackend) and backend.info.patch_size == (32, 32, 32)
        assert backend.output_names == ("embedding", "features") and backend.info.feature_dim == 2
        for shape in ((1, 1, 32, 32, 32), (2, 1, 16, 32, 48), (1, 1, 16, 16, 16)):
            x = rng.random(shape, dtype=np.float32)
            got = backend.run({"image": x})
            for name, value in expected(x).items():
                np.testing.assert_allclose(got[name], value, rtol=1e-6)
        backend.close()
    cuda = fake_gpu[1][-1]
    assert not cuda.device and not cuda.host and cuda.streams == 0  # close freed everything it made


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        (
            "trt_version",
            "10.0.1",
            "with TensorRT 10.0.1, but this machine has compute capability 8.6 and TensorRT 10.9.0",
        ),
        (
            "capability",
            "9.0",
            "(compute capability 9.0) with TensorRT 10.9.0, but this machine has compute capability 8.6",
        ),
    ],
)
def test_engine_for_another_tensorrt_or_gpu_is_one_line(fake_gpu, tmp_path, field, value, words):
    engine_file = write_export(tmp_path / "export", **{field: value})
    for source in (engine_file, tmp_path / "export"):
        with pytest.raises(GvslInputError) as info:
            load_backend(source, "encoder", "tensorrt", "cuda")
        msg = str(info.value)
        assert "\n" not in msg and engine_file.name in msg and words in msg
        assert "gvsl export --format engine" in msg


def test_engine_without_its_manifest_is_refused(fake_gpu, tmp_path):
    engine_file = write_export(tmp_path / "export")
    (tmp_path / "export" / "manifest.json").unlink()
    with pytest.raises(GvslInputError, match="no manifest.json beside this engine"):
        load_backend(engine_file, "encoder", "tensorrt", "cuda")


def test_pool_never_exceeds_its_contexts_under_load(fake_gpu, tmp_path):
    backend = load_backend(write_export(tmp_path / "e", profiles=3), "encoder", "tensorrt", "cuda", max_contexts=2)
    rng = np.random.default_rng(1)
    xs = [rng.random((1, 1, 16, 16, 32), dtype=np.float32) for _ in range(4)]
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for i in range(20):
                x = xs[(k + i) % 4]
                np.testing.assert_allclose(
                    backend.run({"image": x}, ["embedding"])["embedding"], expected(x)["embedding"]
                )
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[0]
    engine = fake_gpu[0].engines[-1]
    assert engine.contexts == backend._made <= 2  # 6 callers, 2 contexts, 2 of the engine's 3 profiles


def test_a_failed_context_gives_its_place_back(fake_gpu, tmp_path):
    """The only context fails to be created once: the next call gets a new one instead of
    waiting forever for a context that was never made."""
    backend = load_backend(write_export(tmp_path / "e", fail_contexts=1), "encoder", "tensorrt", "cuda", max_contexts=1)
    x = np.ones((1, 1, 16, 16, 16), np.float32)
    with pytest.raises(RuntimeError, match="could not create an execution context"):
        backend.run({"image": x})
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(backend.run({"image": x}, ["embedding"])))
    t.start()
    t.join(10)
    assert not t.is_alive(), "the pool leaked the failed slot"
    np.testing.assert_allclose(result["embedding"], [[1.0, 1.0, 1.0, 4096.0]])
    assert fake_gpu[1][-1].streams == 1  # the failed attempt created no stream that stayed


def test_close_waits_for_the_run_in_flight(fake_gpu, tmp_path):
    backend = load_backend(write_export(tmp_path / "e"), "encoder", "tensorrt", "cuda")
    engine, cuda = fake_gpu[0].engines[-1], fake_gpu[1][-1]
    engine.gate = threading.Event()
    x = np.random.default_rng(2).random((1, 1, 16, 16, 16), dtype=np.float32)
    result: dict = {}
    run = threading.Thread(target=lambda: result.update(backend.run({"image": x})))
    run.start()
    assert engine.started.wait(10)
    closer = threading.Thread(target=backend.close)
    closer.start()
    closer.join(0.5)
    assert closer.is_alive() and cuda.freed == 0 and cuda.device  # nothing freed under the running call
    engine.gate.set()
    run.join(10)
    closer.join(10)
    assert not closer.is_alive() and not run.is_alive()
    np.testing.assert_allclose(result["features"], expected(x)["features"])
    assert not cuda.device and not cuda.host and cuda.streams == 0
    with pytest.raises(GvslInputError, match="closed"):
        backend.run({"image": x})


def test_shapes_outside_the_engine_are_refused_in_one_line(fake_gpu, tmp_path):
    rejected = [1, 1, 16, 16, 48]
    backend = load_backend(write_export(tmp_path / "e", reject=[rejected]), "encoder", "tensorrt", "cuda")
    with pytest.raises(GvslInputError, match=r"input 1x1x64x32x32 exceeds the TensorRT engine's maximum 2x1x32x32x48"):
        backend.run({"image": np.zeros((1, 1, 64, 32, 32), np.float32)})
    with pytest.raises(GvslInputError, match=r"below the TensorRT engine's minimum 1x1x16x16x16"):
        backend.run({"image": np.zeros((1, 1, 16, 16, 8), np.float32)})
    with pytest.raises(GvslInputError, match=r"TensorRT rejected input image of shape 1x1x16x16x48"):
        backend.run({"image": np.zeros(rejected, np.float32)})
    x = np.full((1, 1, 16, 16, 16), 2.0, np.float32)  # the context went back to the pool: it still answers
    np.testing.assert_allclose(backend.run({"image": x}, ["embedding"])["embedding"], [[2.0, 2.0, 2.0, 8192.0]])
    assert fake_gpu[0].engines[-1].contexts == 1


def test_graph_contract_allows_only_the_optional_inputs_to_be_missing():
    """A refine graph of an older export (no ``spacing``) is accepted with its own inputs; any
    other missing or extra input is not the contract."""
    from gvsl.runtime import artifact
    from gvsl.runtime.backends.base import contract_inputs

    full = artifact.REFINE_INPUTS
    assert contract_inputs("refine", reversed(full)) == full  # contract order, whatever the graph's
    older = tuple(n for n in full if n != "spacing")
    assert contract_inputs("refine", older) == older
    assert contract_inputs("refine", [n for n in full if n != "step"]) is None
    assert contract_inputs("refine", [*full, "extra"]) is None
    assert contract_inputs("registration", ["fixed"]) is None  # nothing optional there
