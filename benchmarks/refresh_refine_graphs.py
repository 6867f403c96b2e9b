"""Rewrite the refinement graphs of an export folder (default: the shipped model) with this
checkout's :mod:`gvsl.refine`, and their manifest entries (size, sha256, I/O, parity).

The refine graphs hold no learned weights, so a change to the refinement code reaches an
existing export without retraining or re-exporting the networks:

    python benchmarks/refresh_refine_graphs.py [EXPORT_FOLDER]
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from gvsl.export.pipeline import _export_refine
from gvsl.runtime.io import atomic_write, save_text


def main(folder: Path) -> None:
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        entries = {entry["file"]: entry for entry in _export_refine(Path(tmp), verify=True)}
        for name in entries:
            data = (Path(tmp) / name).read_bytes()
            atomic_write(folder / name, lambda target, data=data: Path(target).write_bytes(data))
    known = {entry["file"] for entry in manifest["artifacts"]}
    manifest["artifacts"] = [entries.get(entry["file"], entry) for entry in manifest["artifacts"]]
    manifest["artifacts"] += [entry for name, entry in entries.items() if name not in known]  # graphs new to it
    save_text(manifest_path, json.dumps(manifest, indent=2) + "\n")
    for name, entry in entries.items():
        print(f"{folder / name}: {entry['bytes']} bytes, sha256 {entry['sha256'][:12]}, parity {entry['parity']}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "gvsl/assets/default")
