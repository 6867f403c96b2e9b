"""Benchmarks behind ``gvsl bench`` and ``benchmarks/*.py``: speed on this machine, side by side.

Three measurements, each run side by side in one process so that ratios hold
on a shared, noisy machine (every round runs every variant once; medians of
rounds):

* **inference** (:mod:`.inference`): the encoder or the registration network
  on every backend available here (:mod:`.runners`) — torch eager fp32 (the
  official code's path and the baseline of every ratio), torch bf16/fp16
  autocast with ``channels_last_3d``, ``torch.compile``, CUDA graphs, the
  runtime's ONNX Runtime CPU path (fp32, and the opt-in int8 mode), ONNX
  Runtime CUDA / TensorRT execution providers and native TensorRT fp16/bf16 —
  at batch 1 and 8: latency (median and quartiles), samples/s, achieved
  TFLOP/s (:mod:`.flops`), the ratio to torch eager and the cosine of each
  output to torch eager fp32; peak host and device memory come from a fresh
  child process per case (:mod:`.memory`);
* **training** (:mod:`.training`): an official-style step (:mod:`.official`:
  batch 1, fp32, Models Genesis damage in NumPy on the host, as the authors'
  loader does) against gvsl's step (batched augmentation on the device,
  autocast, channels-last, optional ``torch.compile``), in samples/s;
* **preprocessing** (:mod:`.preprocess`): reading, reorienting, resampling to
  1 mm and normalising a CT-sized NIfTI against SimpleITK's linear resampling.

The package is the top layer (``gvsl.cli``): it uses the runtime, the core and
the export. torch is imported only by the torch backends and the training
benchmark, so a machine with only ONNX Runtime / TensorRT can still bench those
(give ``model`` as an export folder).
"""

from __future__ import annotations

from gvsl.cli.bench.flops import model_flops
from gvsl.cli.bench.inference import bench_inference
from gvsl.cli.bench.machine import Unavailable, machine_info, summarize
from gvsl.cli.bench.preprocess import bench_preprocess
from gvsl.cli.bench.runners import BASELINE, CPU_DEFAULT, GPU_DEFAULT, INFERENCE_BACKENDS, Runner, make_runner
from gvsl.cli.bench.tables import inference_rows, markdown_tables, preprocess_rows, train_rows
from gvsl.cli.bench.training import bench_train
from gvsl.cli.bench.workload import BenchSetup, random_model_export, smooth_ct_cube

__all__ = [
    "BASELINE",
    "CPU_DEFAULT",
    "GPU_DEFAULT",
    "INFERENCE_BACKENDS",
    "BenchSetup",
    "Runner",
    "Unavailable",
    "bench_inference",
    "bench_preprocess",
    "bench_train",
    "inference_rows",
    "machine_info",
    "make_runner",
    "markdown_tables",
    "model_flops",
    "preprocess_rows",
    "random_model_export",
    "smooth_ct_cube",
    "summarize",
    "train_rows",
]
