"""`gvsl serve` on a real Triton Inference Server (PyTriton), its client, and scale-out.

The server runs in its own interpreter (``GVSL_SERVE_PYTHON``: a venv made from
the system Python with ``gvsl[cpu,serve]``; ``.ci/run`` creates it) because
Triton's Python-backend stub must load the libpython of the interpreter that
runs the models. It is started here the way a user starts it, ``gvsl serve
--python ...`` from this (training) environment, which re-executes itself there,
on free loopback ports, and is always stopped (SIGTERM, then SIGKILL of its
process group). Requests go through ``tritonclient`` from this process, and
served results are compared with the in-process runtime: same numbers.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from test_runtime import _aff, _save, tiny_artifacts
from typer.testing import CliRunner

from gvsl.cli.main import app
from gvsl.runtime import GvslInputError
from gvsl.runtime.client import GvslClient, parse_url
from gvsl.runtime.embed import Embedder
from gvsl.runtime.register import Registrar
from gvsl.runtime.serve import (
    EMBED_MODEL,
    ERROR_OUTPUT,
    METRICS,
    REGISTER_MODEL,
    EmbedHandler,
    RegisterHandler,
    ServeOptions,
    _last_error_line,
    free_ports,
    interpreter_problem,
    library_python_version,
    wait_ready,
)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VENV_PYTHON = ROOT / "build" / "serve-venv" / "bin" / "python"
MAX_VOXELS = 150_000  # the test server's --max-voxels: 60^3 is "too large"
runner = CliRunner()


def _serve_python() -> str | None:
    return os.environ.get("GVSL_SERVE_PYTHON") or (str(DEFAULT_VENV_PYTHON) if DEFAULT_VENV_PYTHON.is_file() else None)


@pytest.fixture(scope="module")
def serve_python() -> str:
    """The serve venv's interpreter; CI (CI=true) must have it, elsewhere the tests skip."""
    python = _serve_python()
    if python is None or not Path(python).is_file():
        msg = (
            f"no serve interpreter ({python or 'GVSL_SERVE_PYTHON unset and ' + str(DEFAULT_VENV_PYTHON) + ' missing'})"
            ": /usr/bin/python3.11 -m venv build/serve-venv && build/serve-venv/bin/pip install -e '.[cpu,serve]' "
            "(.ci/run does this)"
        )
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg)
        pytest.skip(msg)
    return python


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    return tiny_artifacts(tmp_path_factory.getbasetemp())


@dataclass
class Server:
    proc: subprocess.Popen
    http: int
    grpc: int
    metrics: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http}"

    @property
    def grpc_url(self) -> str:
        return f"grpc://127.0.0.1:{self.grpc}"

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM to the server; SIGKILL to its whole process group if it does not go."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # Triton and its stubs, whatever happened above
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        return self.proc.returncode


def _start(serve_python: str, export: Path, log: Path) -> Server:
    http, grpc, metrics = free_ports(3)
    cmd = [
        sys.executable, "-m", "gvsl.cli.main", "serve", "--model", str(export), "--python", serve_python,
        "--host", "127.0.0.1", "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
        "--instances", "2", "--max-batch", "4", "--max-voxels", str(MAX_VOXELS), "--exit-timeout", "5",
        "--device", "cpu",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "_GVSL_SERVE_CHILD"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    srv = Server(proc, http, grpc, metrics, log)
    try:
        wait_ready(f"127.0.0.1:{http}", timeout=90, alive=lambda: proc.poll() is None)
    except Exception:
        srv.stop()
        raise
    return srv


@pytest.fixture(scope="module")
def server(serve_python, tiny, tmp_path_factory):
    """`gvsl serve` on free loopback ports: 2 instances per model, max batch 4."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    try:
        srv = _start(serve_python, tiny[1], log)
    except Exception:
        text = log.read_text(errors="replace")
        if "in use" not in text.lower():  # a port taken between free_ports() and Triton's bind: retry once
            raise AssertionError(f"gvsl serve did not start:\n{text[-4000:]}") from None
        srv = _start(serve_python, tiny[1], log)
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def volumes(mni_small_arrays) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Real anatomy: the 40x48x40 MNI T1 at 4 mm (larger than the 32^3 patch: sliding windows),
    a non-RAS (x-flipped) copy, and a shifted moving image."""
    t1 = mni_small_arrays["t1"].astype(np.float32)
    flip = np.diag([-4.0, 4.0, 4.0, 1.0])
    flip[:3, 3] = (76.0, -110.0, -56.0)
    return {
        "t1": (t1, _aff()),
        "t1_las": (np.ascontiguousarray(t1[::-1]), flip),
        "moving": (np.roll(t1, (2, -1, 1), axis=(0, 1, 2)), _aff(origin=(-78.0, -110.0, -56.0))),
        "small": (np.ascontiguousarray(t1[4:36, 8:40, 4:36]), _aff()),
    }


@pytest.fixture(scope="module")
def local(tiny):
    """The in-process runtime on the same export (this environment: numpy 2, torch installed)."""
    with Embedder(tiny[1], device="cpu") as e, Registrar(tiny[1], device="cpu") as r:
        yield e, r


# ----------------------------------------------------------------------------- interpreter
def test_serve_python_is_accepted_and_this_one_is_explained(serve_python):
    """The serve venv passes the libpython check; this interpreter gets one line saying why not."""
    out = subprocess.run(
        [serve_python, "-c", "from gvsl.runtime.serve import interpreter_problem as p; print(repr(p()))"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert out.returncode == 0 and out.stdout.strip() == "None", out.stderr[-2000:]
    # this (pyenv) interpreter against the stub the serve venv ships: the check the server does
    probe = subprocess.run(
        [serve_python, "-c", "from pytriton.utils.distribution import get_libs_path, get_stub_path as s; import sys;"
         "print(s(f'{sys.version_info[0]}.{sys.version_info[1]}')); print(get_libs_path())"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    stub, libs = (Path(x) for x in probe.stdout.split())
    if f"{sys.version_info[0]}.{sys.version_info[1]}" not in str(stub):
        pytest.skip("this interpreter's minor version differs from the serve venv's")
    problem = interpreter_problem(stub, [libs])
    lib = next(ln.split()[2] for ln in subprocess.check_output(["ldd", str(stub)], text=True).splitlines()
               if "libpython" in ln)  # fmt: skip
    lib_version = library_python_version(Path(lib))
    assert lib_version and lib_version.count(".") == 2
    if lib_version == sys.version.split()[0]:
        assert problem is None
    else:  # e.g. pyenv 3.11.7 beside Debian's libpython3.11 (3.11.2): the known failure
        assert problem and lib_version in problem and sys.version.split()[0] in problem and "--python" in problem
        assert "\n" not in problem


def test_startup_failures_name_their_cause():
    """What `gvsl serve` prints when Triton does not come up: the cause, not GPU-less noise."""
    port_taken = (
        "Error: Failed to initialize NVML\n"
        'W1130 11:07:25.450706 22670 metrics.cc:798] "DCGM unable to start: DCGM initialization error"\n'
        'E1130 11:07:25.499020 22670 main.cc:257] "failed to start HTTP service: Unavailable - Socket '
        "'127.0.0.1:55341' already in use \"\n"
    )
    assert _last_error_line(port_taken).startswith("failed to start HTTP service: Unavailable - Socket")
    stub_mismatch = (
        'E1130 10:22:19.483602 31035 backend_model.cc:692] "ERROR: Failed to create instance: TritonModelException: '
        'Model initialize error: Traceback (most recent call last):\\n  File \\"/x/resource_tracker.py\\", line 100'
        ", in ensure_running\\n    if self._lock._recursion_count() > 1:\\nAttributeError: '_thread.RLock' object "
        "has no attribute '_recursion_count'\\n\\n\\nAt:\\n  /tmp/f/1/model.py(454): initialize\\n\"\n"
    )
    assert _last_error_line(stub_mismatch) == (
        "AttributeError: '_thread.RLock' object has no attribute '_recursion_count'"
    )


def test_serve_without_a_usable_interpreter_is_one_line(tiny, monkeypatch):
    """From this environment without --python: refused with the reason and the fix, exit 2."""
    monkeypatch.delenv("GVSL_SERVE_PYTHON", raising=False)  # else the command would re-exec this process
    monkeypatch.delenv("_GVSL_SERVE_CHILD", raising=False)
    if importlib.util.find_spec("pytriton") is not None and interpreter_problem() is None:
        pytest.skip("this interpreter can run the server itself")
    ports = ["--http-port", "1", "--grpc-port", "2", "--metrics-port", "3"]
    res = runner.invoke(app, ["serve", "-m", str(tiny[1]), *ports])
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert "error:" in text and "--python" in text and "Traceback" not in res.output
    res = runner.invoke(app, ["serve", "-m", str(tiny[1]), "--python", "/nonexistent/python"])
    assert res.exit_code == 2 and "no such interpreter" in " ".join(res.output.split())
    with socket.socket() as taken:  # a port in use: said at once, not after Triton's start-up timeout
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        a, b = free_ports(2)
        res = runner.invoke(app, ["serve", "-m", str(tiny[1]), "--http-port", str(port), "--grpc-port", str(a),
                                  "--metrics-port", str(b)])  # fmt: skip
    assert res.exit_code == 2 and f"--http-port {port}: cannot listen on 127.0.0.1:{port}" in res.output


# ----------------------------------------------------------------------------- results
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_served_results_equal_the_in_process_runtime(server, local, volumes, protocol):
    embedder, registrar = local
    url = server.url if protocol == "http" else server.grpc_url
    full = protocol == "http"  # gRPC carries the same tensors: one embed and one registration suffice
    with GvslClient(url) as client:
        assert client.has_dense
        for name in ("t1", "t1_las") if full else ("t1_las",):
            got = client.embed(volumes[name], dense=True)
            ref = embedder.embed(volumes[name], dense=True)
            np.testing.assert_array_equal(got.embedding, ref.embedding)
            np.testing.assert_array_equal(got.features, ref.features)
            np.testing.assert_array_equal(got.affine, ref.affine)
            assert got.features.shape == (8, *volumes[name][0].shape)
        emb_only = client.embed(volumes["small"])
        assert emb_only.features is None
        np.testing.assert_array_equal(emb_only.embedding, embedder.embed(volumes["small"]).embedding)
        labels = (volumes["moving"][0] > np.median(volumes["moving"][0])).astype(np.int16)
        for init in ("world", "center") if full else ("center",):
            got = client.register(volumes["t1"], volumes["moving"], labels=[(labels, volumes["moving"][1])], init=init)
            reg = registrar if init == "world" else Registrar(registrar.backend, init="center")
            ref = reg.register(volumes["t1"], volumes["moving"], labels=[(labels, volumes["moving"][1])])
            for field in ("warped", "dvf_mm", "matrix", "world_matrix", "moving_before", "affine"):
                np.testing.assert_array_equal(getattr(got, field), getattr(ref, field), err_msg=field)
            np.testing.assert_array_equal(got.labels[0], ref.labels[0])
            assert got.labels[0].dtype == np.int16
            assert set(got.metrics) == set(METRICS)
            for k in METRICS:  # float64 sums: numpy 1.26 (server) vs 2.x (here) may differ in the last bit
                assert got.metrics[k] == pytest.approx(ref.metrics[k], rel=1e-12, abs=1e-12), k
        if full:  # the client's refinement options travel with the request, the network's start too
            from gvsl.runtime.refine import RefineOptions

            options = RefineOptions(iterations=4, network=False)
            got = client.register(volumes["t1"], volumes["moving"], refine=options)
            ref = registrar.register(volumes["t1"], volumes["moving"], refine=options)
            np.testing.assert_array_equal(got.dvf_mm, ref.dvf_mm)
            assert got.network is False and ref.network is False


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status
    except Exception:  # noqa: BLE001 - refused, 400 "not ready", timeouts: all "not yet"
        return 0


def test_a_request_sent_the_moment_readiness_turns_true_succeeds(serve_python, tiny, tmp_path, local, volumes):
    """The documented probes — each model's /v2/models/NAME/ready and --ready-file — turn true only
    when that model answers: a request sent at once succeeds and equals the in-process result.
    (Triton's server-level /v2/health/ready turns true before PyTriton has loaded the models.)"""
    embedder, registrar = local
    http, grpc, metrics = free_ports(3)
    ready_file = tmp_path / "ready"
    cmd = [
        sys.executable, "-m", "gvsl.cli.main", "serve", "--model", str(tiny[1]), "--python", serve_python,
        "--host", "127.0.0.1", "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
        "--device", "cpu", "--exit-timeout", "5", "--ready-file", str(ready_file), "--quiet",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "_GVSL_SERVE_CHILD"}
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    srv = Server(proc, http, grpc, metrics, log)
    base = f"http://127.0.0.1:{http}"
    try:
        deadline = time.monotonic() + 120
        while _status(f"{base}/v2/models/{EMBED_MODEL}/ready") != 200:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.01)
        with GvslClient(base) as client:  # at once: the embed model says it is ready
            got = client.embed(volumes["small"]).embedding
        np.testing.assert_array_equal(got, embedder.embed(volumes["small"]).embedding)
        while not ready_file.is_file():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.01)
        with GvslClient(base) as client:  # at once: every model is ready
            reg = client.register(volumes["small"], volumes["small"])
            emb = client.embed(volumes["t1"]).embedding
        ref = registrar.register(volumes["small"], volumes["small"])
        np.testing.assert_array_equal(reg.warped, ref.warped)
        np.testing.assert_array_equal(emb, embedder.embed(volumes["t1"]).embedding)
        assert json.loads(ready_file.read_text())["ready"] == [EMBED_MODEL, REGISTER_MODEL]
        assert srv.stop() == 0
        assert not ready_file.exists()  # removed as soon as it stopped
    finally:
        srv.stop()


def test_triton_endpoints_config_and_metrics(server):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    for path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{EMBED_MODEL}/ready"):
        with urllib.request.urlopen(f"{server.url}{path}", timeout=10) as r:
            assert r.status == 200
    c = httpclient.InferenceServerClient(f"127.0.0.1:{server.http}")
    try:
        for name in (EMBED_MODEL, REGISTER_MODEL):
            cfg = c.get_model_config(name)
            assert cfg["max_batch_size"] == 4 and "dynamic_batching" in cfg
            assert sum(g["count"] for g in cfg["instance_group"]) == 2
        cfg = c.get_model_config(EMBED_MODEL)
        assert [(i["name"], i["data_type"], i["dims"]) for i in cfg["input"]] == [
            ("image", "TYPE_FP32", [-1, -1, -1]),
            ("affine", "TYPE_FP64", [4, 4]),
        ]
        assert [o["name"] for o in cfg["output"]] == ["embedding", "embedding_raw", "features", ERROR_OUTPUT]
        cfg = c.get_model_config(REGISTER_MODEL)  # per-request initial alignment and refinement
        assert [i["name"] for i in cfg["input"]][-4:] == ["init", "refine", "regularisation", "network"]
        assert {"shift", "network_used"} <= {o["name"] for o in cfg["output"]}
    finally:
        c.close()
    g = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc}")
    try:
        assert g.is_server_ready() and g.is_model_ready(REGISTER_MODEL)
    finally:
        g.close()
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics}/metrics", timeout=10) as r:
        text = r.read().decode()
    assert f'nv_inference_request_success{{model="{EMBED_MODEL}"' in text


# ----------------------------------------------------------------------------- malformed requests
def _raw_infer(server, inputs: dict[str, tuple[np.ndarray, str]], model=EMBED_MODEL, outputs=("embedding",)):
    import tritonclient.http as httpclient

    c = httpclient.InferenceServerClient(f"127.0.0.1:{server.http}", network_timeout=120)
    try:
        req = []
        for name, (arr, dtype) in inputs.items():
            t = httpclient.InferInput(name, list(arr.shape), dtype)
            t.set_data_from_numpy(arr, binary_data=True)
            req.append(t)
        outs = [httpclient.InferRequestedOutput(o, binary_data=True) for o in outputs]
        return c.infer(model, req, outputs=outs)
    finally:
        c.close()


def test_malformed_requests_get_clear_errors_and_the_server_keeps_answering(server, local, volumes):
    from tritonclient.utils import InferenceServerException

    embedder, _ = local
    vol, aff = volumes["small"]
    good = {"image": (vol[None], "FP32"), "affine": (aff[None], "FP64")}
    expect = embedder.embed((vol, aff)).embedding
    nan = vol.copy()
    nan[3, 4, 5] = np.nan
    cases = {
        "wrong dtype": (
            {"image": (vol[None].astype(np.int16), "INT16"), "affine": (aff[None], "FP64")},
            r"INT16.*FP32",
        ),
        "wrong rank": ({"image": (vol[None, :, :, 0], "FP32"), "affine": (aff[None], "FP64")}, r"shape|dims"),
        "too large": (
            {"image": (np.zeros((1, 60, 60, 60), np.float32), "FP32"), "affine": (aff[None], "FP64")},
            r"gvsl-error: .*216000 voxels.*more than the limit of 150000",
        ),
        "NaN": ({"image": (nan[None], "FP32"), "affine": (aff[None], "FP64")}, r"gvsl-error: .*NaN or Inf"),
        "singular affine": ({"image": (vol[None], "FP32"), "affine": (np.zeros((1, 4, 4)), "FP64")}, r"gvsl-error: "),
        "missing input": ({"image": (vol[None], "FP32")}, r"affine"),
    }
    for what, (inputs, pattern) in cases.items():
        with pytest.raises(InferenceServerException, match=pattern):
            _raw_infer(server, inputs)
        res = _raw_infer(server, good)  # still up, still right
        np.testing.assert_array_equal(res.as_numpy("embedding")[0], expect, err_msg=what)
    # the client helper turns a refusal into one line without the server's traceback
    with GvslClient(server.url) as client:
        with pytest.raises(GvslInputError) as info:
            client.infer(EMBED_MODEL, {"image": nan[None], "affine": aff[None]}, ["embedding"])
        msg = str(info.value)
        assert "NaN or Inf" in msg and "Traceback" not in msg and "\n" not in msg
        with pytest.raises(GvslInputError, match="NaN or Inf"):
            client.embed((nan, aff))  # refused here already, same words
        with pytest.raises(GvslInputError, match="more than the limit"):
            client.infer(
                REGISTER_MODEL,
                {"fixed": np.zeros((1, 60, 60, 60), np.float32), "fixed_affine": aff[None],
                 "moving": vol[None], "moving_affine": aff[None]},
                ["warped"],
            )  # fmt: skip
        with pytest.raises(GvslInputError, match="init 'sideways'"):
            client.infer(
                REGISTER_MODEL,
                {"fixed": vol[None], "fixed_affine": aff[None], "moving": vol[None], "moving_affine": aff[None],
                 "init": np.array([[b"sideways"]], dtype=object)},
                ["warped"],
            )  # fmt: skip
        np.testing.assert_array_equal(client.embed((vol, aff)).embedding, expect)


@dataclass
class _Req:
    """What PyTriton hands an inference callable per request (``data`` + requested outputs)."""

    data: dict
    requested_output_names: list

    def __getitem__(self, name):
        return self.data[name]


def test_a_bad_request_in_a_batch_does_not_fail_the_good_ones(tiny, local, volumes):
    """PyTriton cannot fail one request of a Triton batch: the good ones get results, the bad
    one only its error; a batch of bad requests only is a Triton error for each."""
    embedder, registrar = local
    vol, aff = volumes["small"]
    nan = vol.copy()
    nan[0, 0, 0] = np.inf
    opts = ServeOptions(model=tiny[1], max_voxels=MAX_VOXELS)
    handler = EmbedHandler(embedder, opts)
    good = _Req({"image": vol[None], "affine": aff[None]}, ["embedding", "features", ERROR_OUTPUT])
    bad = _Req({"image": nan[None], "affine": aff[None]}, ["embedding", ERROR_OUTPUT])
    out = handler([good, bad, good])
    ref = embedder.embed((vol, aff), dense=True)
    for k in (0, 2):
        np.testing.assert_array_equal(out[k]["embedding"][0], ref.embedding)
        np.testing.assert_array_equal(out[k]["features"][0], ref.features)
        assert out[k][ERROR_OUTPUT][0, 0] == b""
    assert set(out[1]) == {ERROR_OUTPUT} and b"NaN or Inf" in out[1][ERROR_OUTPUT][0, 0]
    with pytest.raises(RuntimeError, match="gvsl-error: .*NaN or Inf"):
        handler([bad, bad])
    big = ServeOptions(model=tiny[1], max_request_mb=0.05)  # 32^3 float32 = 0.125 MiB
    with pytest.raises(RuntimeError, match=r"more than this server's limit of 0 MiB \(--max-request-mb\)"):
        EmbedHandler(embedder, big)([good])
    reg = RegisterHandler(registrar, opts)
    two = _Req(
        {"fixed": np.stack([vol, vol]), "fixed_affine": np.stack([aff, aff]), "moving": np.stack([vol, vol]),
         "moving_affine": np.stack([aff, aff])},
        ["warped", ERROR_OUTPUT],
    )  # fmt: skip
    res = reg([two])[0]
    assert res["warped"].shape == (2, *vol.shape) and res["metrics"].shape == (2, len(METRICS))
    # per-request refinement: 0 iterations is the network alone, as in-process
    plain = _Req(
        {"fixed": vol[None], "fixed_affine": aff[None], "moving": vol[None], "moving_affine": aff[None],
         "refine": np.array([[0]], dtype=np.int32)},
        ["warped", ERROR_OUTPUT],
    )  # fmt: skip
    from gvsl.runtime.refine import RefineOptions

    expected = registrar.register((vol, aff), (vol, aff), refine=RefineOptions(iterations=0))
    np.testing.assert_array_equal(reg([plain])[0]["warped"][0], expected.warped)
    # per-request start: refinement from the initial alignment alone, the network not run
    alone = _Req(
        {"fixed": vol[None], "fixed_affine": aff[None], "moving": vol[None], "moving_affine": aff[None],
         "network": np.array([[False]], dtype=np.bool_)},
        ["dvf", "network_used", ERROR_OUTPUT],
    )  # fmt: skip
    expected = registrar.register((vol, aff), (vol, aff), refine=RefineOptions(network=False))
    got = reg([alone])[0]
    np.testing.assert_array_equal(got["dvf"][0], expected.dvf_mm)
    assert got["network_used"].tolist() == [[False]] and res["network_used"].tolist() == [[True], [True]]


# ----------------------------------------------------------------------------- load and faults
def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def _half_request(port: int) -> None:
    """A client that announces a 4 MB request, sends 1 kB of it and hangs up."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        header = json.dumps({"inputs": [{"name": "image", "shape": [1, 100, 100, 100], "datatype": "FP32",
                                         "parameters": {"binary_data_size": 4_000_000}}]}).encode()  # fmt: skip
        s.sendall(
            f"POST /v2/models/{EMBED_MODEL}/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Inference-Header-Content-Length: {len(header)}\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {len(header) + 4_000_000}\r\n\r\n".encode()
            + header
            + b"\0" * 1024
        )


def test_concurrent_clients_and_clients_that_hang_up(server, local, volumes):
    """4 clients x 3 s (HTTP and gRPC, embed and register) while others drop their
    connections mid-request: no good request fails, every answer is right."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    embedder, registrar = local
    vol, aff = volumes["small"]
    expect = embedder.embed((vol, aff)).embedding
    expect_reg = registrar.register((vol, aff), (np.roll(vol, 1, axis=0), aff)).warped
    latencies: list[list[float]] = [[] for _ in range(4)]
    failures: list[str] = []
    deadline = time.monotonic() + 3.0

    def worker(k: int) -> None:
        client = GvslClient(server.url if k % 2 == 0 else server.grpc_url, timeout=60)
        try:
            n = 0
            while time.monotonic() < deadline and n < 500:
                t0 = time.perf_counter()
                if k == 3 and n % 3 == 2:
                    r = client.register((vol, aff), (np.roll(vol, 1, axis=0), aff))
                    ok = np.array_equal(r.warped, expect_reg)
                else:
                    ok = np.array_equal(client.embed((vol, aff)).embedding, expect)
                latencies[k].append(time.perf_counter() - t0)
                if not ok:
                    failures.append(f"client {k}: wrong result")
                n += 1
        except Exception as e:  # noqa: BLE001
            failures.append(f"client {k}: {type(e).__name__}: {e}")
        finally:
            client.close()

    def rude() -> None:
        for _ in range(3):
            _half_request(server.http)
            c = httpclient.InferenceServerClient(f"127.0.0.1:{server.http}", network_timeout=0.02)
            t = httpclient.InferInput("image", [1, *vol.shape], "FP32")
            t.set_data_from_numpy(vol[None])
            a = httpclient.InferInput("affine", [1, 4, 4], "FP64")
            a.set_data_from_numpy(aff[None])
            try:
                c.infer(EMBED_MODEL, [t, a])  # gives up after 20 ms, long before the answer
            except Exception:  # noqa: BLE001, S110 - expected timeout
                pass
            c.close()
            g = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc}")
            t = grpcclient.InferInput("image", [1, *vol.shape], "FP32")
            t.set_data_from_numpy(vol[None])
            a = grpcclient.InferInput("affine", [1, 4, 4], "FP64")
            a.set_data_from_numpy(aff[None])
            try:
                g.infer(EMBED_MODEL, [t, a], client_timeout=0.02)
            except Exception:  # noqa: BLE001, S110 - expected deadline
                pass
            g.close()
            time.sleep(0.3)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)] + [threading.Thread(target=rude)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    wall = time.perf_counter() - t0
    assert not any(t.is_alive() for t in threads)
    assert not failures, failures[:3]
    done = sum(len(x) for x in latencies)
    assert all(len(x) >= 1 for x in latencies)
    flat = [v for x in latencies for v in x]
    print(
        f"\n4 clients x 3 s: {done} requests, {done / wall:.1f} req/s, p50 {_percentile(flat, 50) * 1e3:.0f} ms, "
        f"p95 {_percentile(flat, 95) * 1e3:.0f} ms, p99 {_percentile(flat, 99) * 1e3:.0f} ms"
    )
    with GvslClient(server.url) as client:  # and it still answers
        client.check()
        np.testing.assert_array_equal(client.embed((vol, aff)).embedding, expect)


# ----------------------------------------------------------------------------- CLI
def test_cli_embed_and_register_through_the_server(server, tiny, tmp_path, volumes):
    src = tmp_path / "in"
    src.mkdir()
    for name in ("t1", "moving"):
        _save(src / f"{name}.nii.gz", *volumes[name])
    local_out, served_out = tmp_path / "local", tmp_path / "served"
    res = runner.invoke(app, ["embed", str(src), "-m", str(tiny[1]), "-o", str(local_out), "--dense", "--format",
                              "npz", "-q", "--device", "cpu"])  # fmt: skip
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["embed", str(src), "--server", server.url, "-o", str(served_out), "--dense",
                              "--format", "npz", "-q"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in served_out.iterdir()) == ["moving.npz", "t1.npz"]
    for f in sorted(local_out.glob("*.npz")):
        a, b = np.load(f), np.load(served_out / f.name)
        for key in ("embedding", "features", "affine"):
            np.testing.assert_array_equal(a[key], b[key])
    fixed, moving = src / "t1.nii.gz", src / "moving.nii.gz"
    res = runner.invoke(app, ["register", str(fixed), str(moving), "-m", str(tiny[1]), "-o", str(tmp_path / "a.nii.gz"),
                              "--dvf", str(tmp_path / "a_dvf.nii.gz"), "-q", "--device", "cpu"])  # fmt: skip
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["register", str(fixed), str(moving), "--server", server.grpc_url,
                              "-o", str(tmp_path / "b.nii.gz"), "--dvf", str(tmp_path / "b_dvf.nii.gz"),
                              "--metrics", str(tmp_path / "m.json")])  # fmt: skip
    assert res.exit_code == 0, res.output
    for a, b in (("a.nii.gz", "b.nii.gz"), ("a_dvf.nii.gz", "b_dvf.nii.gz")):
        np.testing.assert_array_equal(nib.load(tmp_path / a).get_fdata(), nib.load(tmp_path / b).get_fdata())
    assert json.loads((tmp_path / "m.json").read_text())["backend"].startswith("triton[grpc://127.0.0.1:")


def test_cli_server_option_errors_are_one_line(tmp_path, tiny):
    vol = _save(tmp_path / "v.nii.gz", np.ones((20, 20, 20), np.float32), _aff())
    dead = free_ports(1)[0]
    res = runner.invoke(app, ["embed", str(vol), "--server", f"http://127.0.0.1:{dead}", "-o", str(tmp_path / "o")])
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and "cannot reach the gvsl server" in text and "Traceback" not in res.output
    res = runner.invoke(app, ["register", str(vol), str(vol), "--server", f"grpc://127.0.0.1:{dead}",
                              "-o", str(tmp_path / "w.nii.gz")])  # fmt: skip
    assert res.exit_code == 2 and "cannot reach the gvsl server" in " ".join(res.output.split())
    res = runner.invoke(app, ["embed", str(vol), "-m", str(tiny[1]), "--server", "http://127.0.0.1:1",
                              "-o", str(tmp_path / "o")])  # fmt: skip
    assert res.exit_code == 2 and "not both" in res.output
    res = runner.invoke(app, ["embed", str(vol), "--server", "http://127.0.0.1:1", "--device", "cpu",
                              "-o", str(tmp_path / "o")])  # fmt: skip
    assert res.exit_code == 2 and "set on `gvsl serve`" in " ".join(res.output.split())
    res = runner.invoke(app, ["embed", str(vol), "--server", "ftp://x", "-o", str(tmp_path / "o")])
    assert res.exit_code == 2 and "http://HOST:PORT" in " ".join(res.output.split())
    assert parse_url("127.0.0.1:9000") == ("http", "127.0.0.1:9000", False)
    assert parse_url("grpc://[::1]") == ("grpc", "[::1]:8001", False)


def test_runtime_client_and_serve_import_without_torch():
    code = textwrap.dedent(
        """
        import sys

        class NoTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this test")

        sys.meta_path.insert(0, NoTorch())
        import gvsl.runtime.client, gvsl.runtime.serve, gvsl.cli.serve_cmd, gvsl.cli.main
        assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules)
        print("ok")
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


# ----------------------------------------------------------------------------- scale-out: merge
def test_embed_shards_merge_into_one_table(tmp_path, tiny, volumes):
    src = tmp_path / "in"
    (src / "site1").mkdir(parents=True)
    (src / "site2").mkdir()
    _save(src / "site1" / "a.nii.gz", *volumes["small"])
    _save(src / "site1" / "b.nii.gz", *volumes["t1"])
    _save(src / "site2" / "a.nii.gz", *volumes["t1_las"])
    for i in range(3):  # three array-job tasks, each into its own folder (npy for two, npz for one)
        fmt = "npz" if i == 2 else "npy"
        res = runner.invoke(app, ["embed", str(src), "-m", str(tiny[1]), "-o", str(tmp_path / f"shard{i}"),
                                  "--shard", f"{i}/3", "--format", fmt, "-q", "--device", "cpu"])  # fmt: skip
        assert res.exit_code == 0, res.output
    shards = [str(tmp_path / f"shard{i}") for i in range(3)]
    res = runner.invoke(app, ["embed", *shards, "--merge", "-o", str(tmp_path / "all.csv")])
    assert res.exit_code == 0, res.output
    assert "merged 3 embeddings (32 values each) from 3 folder(s)" in " ".join(res.output.split())
    lines = (tmp_path / "all.csv").read_text().splitlines()
    assert lines[0].split(",")[:3] == ["key", "e0", "e1"] and len(lines[0].split(",")) == 33
    keys = [ln.split(",")[0] for ln in lines[1:]]
    assert keys == ["site1/a", "site1/b", "site2/a"]
    with Embedder(tiny[1], device="cpu") as e:
        ref = e.embed(src / "site1" / "b.nii.gz").embedding
    row = np.array([float(x) for x in lines[2].split(",")[1:]], dtype=np.float32)
    np.testing.assert_array_equal(row, ref)  # 9 significant digits: float32 exactly
    res = runner.invoke(app, ["embed", *shards, "--merge", "-o", str(tmp_path / "all.npz")])
    assert res.exit_code == 0, res.output
    z = np.load(tmp_path / "all.npz")
    assert list(z["keys"]) == keys and z["embeddings"].shape == (3, 32) and z["embeddings"].dtype == np.float32
    np.testing.assert_array_equal(z["embeddings"][1], ref)
    # the same input twice with the same numbers is fine; different numbers are refused
    shutil.copytree(tmp_path / "shard0", tmp_path / "again")
    res = runner.invoke(app, ["embed", *shards, str(tmp_path / "again"), "--merge", "-o", str(tmp_path / "x.csv")])
    assert res.exit_code == 0, res.output
    first = next((tmp_path / "again").rglob("*.npy"))
    np.save(first, np.load(first) + 1)
    res = runner.invoke(app, ["embed", *shards, str(tmp_path / "again"), "--merge", "-o", str(tmp_path / "y.csv")])
    assert res.exit_code == 2 and "differs from" in " ".join(res.output.split())
    res = runner.invoke(app, ["embed", *shards, "--merge", "-o", str(tmp_path / "all.csv")])
    assert res.exit_code == 2 and "--overwrite" in res.output
    res = runner.invoke(app, ["embed", shards[0], "--merge", "-o", str(tmp_path / "t.txt")])
    assert res.exit_code == 2 and ".csv or .npz" in res.output
    (tmp_path / "junk").mkdir()
    np.save(tmp_path / "junk" / "m.npy", np.zeros((2, 2)))
    res = runner.invoke(app, ["embed", str(tmp_path / "junk"), "--merge", "-o", str(tmp_path / "j.csv")])
    assert res.exit_code == 2 and "m.npy: not a gvsl embedding" in " ".join(res.output.split())
    (tmp_path / "empty").mkdir()
    res = runner.invoke(app, ["embed", str(tmp_path / "empty"), "--merge", "-o", str(tmp_path / "e.csv")])
    assert res.exit_code == 2 and "no embeddings" in res.output


# ----------------------------------------------------------------------------- scale-out: torchrun
@pytest.mark.slow
def test_torchrun_two_nodes_c10d_rendezvous(tmp_path, mni_small_arrays):
    """README's multi-node command on one machine: 2 "nodes" x 1 process, c10d rendezvous
    on 127.0.0.1, gloo; both join one job and the checkpoint holds both ranks' streams."""
    import torch

    beside = Path(sys.executable).with_name("torchrun")  # this interpreter's, not another install's on PATH
    torchrun = str(beside) if beside.is_file() else shutil.which("torchrun")
    data = tmp_path / "data"
    data.mkdir()
    t1 = mni_small_arrays["t1"].astype(np.float32)
    for k in range(4):
        _save(data / f"s{k}.nii.gz", np.roll(t1, 2 * k, axis=k % 3) * (1 + 0.1 * k), _aff())
    out = tmp_path / "run"
    port = free_ports(1)[0]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = []
    for node in range(2):
        cmd = [torchrun, "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "gvsl-test",
               "--local-addr", "127.0.0.1",  # loopback only: no hostname lookups
               # both "nodes" match 127.0.0.1, so say which one hosts the rendezvous store (on real
               # nodes only HOST0 matches); two agents racing to host it can end up with two stores
               "--rdzv-conf", f"is_host={'true' if node == 0 else 'false'}",
               "-m", "gvsl.cli.main", "train", str(data), "-o", str(out), "--iterations", "3", "--quiet",
               "--widths", "tiny", "--patch-size", "16", "--spacing", "native", "--modality", "mr",
               "--device", "cpu"]  # fmt: skip
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                      start_new_session=True))  # fmt: skip
    deadline = time.monotonic() + 240
    logs = []
    try:
        for p in procs:
            try:
                logs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
            except subprocess.TimeoutExpired:
                logs.append("(timed out)")
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                logs.append(p.communicate(timeout=10)[0] or "")
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-2000:] for log in logs)
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    ranks = json.loads(state["rng"])
    assert state["step"] == 3 and len(ranks) == 2
    assert ranks[0]["data"]["rng"] != ranks[1]["data"]["rng"]


# ----------------------------------------------------------------------------- shutdown (last)
def test_sigterm_stops_the_server_cleanly(server):
    """SIGTERM: Triton drains and stops, the command exits 0 and leaves no process behind."""
    t0 = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    code = server.proc.wait(40)
    took = time.monotonic() - t0
    log = server.log.read_text(errors="replace")
    assert code == 0, log[-3000:]
    assert "gvsl serve stopped" in log and took < 30
    leftover = ""
    for _ in range(40):  # Triton's stubs and their helpers exit right after the server
        leftover = subprocess.run(
            ["ps", "-o", "pid=,cmd=", "-g", str(server.proc.pid)], capture_output=True, text=True, check=False
        ).stdout.strip()
        if not leftover:
            break
        time.sleep(0.25)
    assert not leftover, f"processes outlived gvsl serve:\n{leftover}"


def test_only_the_handshake_race_restarts_triton():
    """A failed start is retried only when a model's stub could not fetch its config (the 1 s
    wait ran out, or the socket refused it: both as Triton logged them); a model that fails to
    load for any other reason stops the server at once."""
    from gvsl.runtime.serve import handshake_failed

    refused = (
        "E1203 12:13:34.789158 21778 model_lifecycle.cc:642] failed to load gvsl_register version 1: Internal: "
        "TritonModelException: Model initialize error: Traceback (most recent call last):\\n  File "
        "/tmp/folderLndrNR/1/communication.py, line 550, in get_config_from_handshake_server\\n    "
        "sock.connect(socket_path.as_posix())\\nConnectionRefusedError: [Errno 111] Connection refused"
    )
    timed_out = "TimeoutError: Timeout occurred while waiting for config file /tmp/x/handshake.sock"
    other = (
        "E1203 model_lifecycle.cc:642] failed to load gvsl_embed version 1: Internal: TritonModelException: "
        "Model initialize error: ModuleNotFoundError: No module named gvsl"
    )
    assert handshake_failed(refused) and handshake_failed(timed_out)
    assert not handshake_failed(other) and not handshake_failed("")
