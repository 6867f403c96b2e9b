"""Benchmark records as table rows: for the screen (``gvsl bench``) and for BENCHMARKS.md (Markdown)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["inference_rows", "markdown_tables", "preprocess_rows", "train_rows"]


def _ms(st: dict[str, float]) -> str:
    return f"{1000 * st['median']:.1f} ({1000 * st['p25']:.1f}–{1000 * st['p75']:.1f})"


def _s(st: dict[str, float]) -> str:
    return f"{st['median']:.3f} ({st['p25']:.3f}–{st['p75']:.3f})"


def _num(v: Any, fmt: str) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def inference_rows(records: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    head = ["kind", "size", "batch", "backend", "precision", "latency ms, median (IQR)", "samples/s", "TFLOP/s",
            "× torch eager", "cosine to fp32", "peak host MB", "peak device MB"]  # fmt: skip
    rows = []
    for r in records:
        base = [r["kind"], f"{r['size']}³", str(r["batch"]), r["backend"]]
        if r.get("status") != "ok":
            rows.append(base + [r.get("status", "?")] + [""] * (len(head) - 5))
            continue
        rows.append(base + [
            r["precision"], _ms(r["latency_s"]), _num(r["samples_per_s"], ".2f"), _num(r["tflops"], ".3f"),
            _num(r.get("x_baseline"), ".2f"), _num(r.get("cosine_to_fp32"), ".5f"),
            _num(r.get("peak_host_mb"), ".0f"), _num(r.get("peak_device_mb"), ".0f"),
        ])  # fmt: skip
    return head, rows


def train_rows(records: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    head = ["size", "widths", "device", "variant", "batch", "precision", "channels-last", "compile",
            "step s, median (IQR)", "samples/s", "× official-style"]  # fmt: skip
    rows = []
    for r in records:
        base = [f"{r['size']}³", r["widths"], r["device"], r.get("variant", "")]
        if r.get("status") != "ok":
            rows.append(base + [r.get("status", "?")] + [""] * (len(head) - 5))
            continue
        rows.append(base + [
            str(r["batch"]), r["precision"], "yes" if r["channels_last"] else "no", "yes" if r["compile"] else "no",
            _s(r["step_s"]), _num(r["samples_per_s"], ".3f"), _num(r.get("x_official"), ".2f"),
        ])  # fmt: skip
    return head, rows


def preprocess_rows(records: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    head = ["case", "seconds, median (IQR)", "÷ SimpleITK Resample", "÷ SimpleITK ReadImage+Resample, same file"]
    return head, [
        [r["case"], _s(r["time_s"]), _num(r.get("x_sitk_resample"), ".2f"), _num(r.get("x_sitk_read_resample"), ".2f")]
        for r in records
    ]


def _md(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def markdown_tables(result: dict[str, Any]) -> str:
    """The result as Markdown tables (for BENCHMARKS.md)."""
    parts = []
    for key, fn in (("inference", inference_rows), ("train", train_rows), ("preprocess", preprocess_rows)):
        if result.get(key):
            parts.append(_md(*fn(result[key])))
    return "\n\n".join(parts) + "\n"
