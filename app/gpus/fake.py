"""Simulated GPUs from a JSON file, for demos and tests on machines without NVIDIA hardware.

File format (index = position in the list):

    {"gpus": [{"name": "Fake A100", "memory_total_mb": 81920,
               "memory_used_mb": 0, "utilization": 0.0}]}

`utilization` is a fraction 0-1 like everywhere else in gpusched; as a convenience a value above
1 is read as a percentage (0-100) and divided by 100, so 1 means 100% but 1.5 means 1.5%.
The file is re-read on every snapshot, so editing it (see update_fake_gpu) changes the GPUs live.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from app.gpus.base import ProbeError
from app.models import GpuSnapshot

FIELDS = ("name", "memory_total_mb", "memory_used_mb", "utilization")


class FakeProbe:
    name = "fake"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def snapshot(self) -> list[GpuSnapshot]:
        return parse_fake_gpus(self.path, _read_json(self.path))


def write_fake_gpus(
    path: Path, count: int, memory_total_mb: int = 81920, name: str = "Fake A100"
) -> None:
    """Write `count` idle GPUs to `path`, atomically."""
    if count < 0:
        raise ValueError(f"GPU count must be >= 0, got {count}")
    gpus = [
        {"name": name, "memory_total_mb": memory_total_mb, "memory_used_mb": 0, "utilization": 0.0}
        for _ in range(count)
    ]
    document = {"gpus": gpus}
    _check_before_write(Path(path), document)
    _write_json_atomically(Path(path), document)


def update_fake_gpu(path: Path, index: int, **fields: object) -> None:
    """Change some fields of GPU `index` in the file, atomically (e.g. memory_used_mb=4096).

    Readers see the old or the new file, never a half-written one. Two concurrent updaters can
    still lose one edit (read-modify-write without a lock), which is fine for demos and tests.
    """
    path = Path(path)
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown fake GPU field(s) {unknown}; known: {', '.join(FIELDS)}")
    document = _read_json(path)
    parse_fake_gpus(path, document)  # the shape is known-good below
    gpus: list[dict[str, Any]] = document["gpus"]
    if not 0 <= index < len(gpus):
        raise ValueError(f"{path}: no GPU {index} (the file has {len(gpus)})")
    gpus[index].update(fields)
    _check_before_write(path, document)
    _write_json_atomically(path, document)


def parse_fake_gpus(path: Path, document: Any) -> list[GpuSnapshot]:
    """Validate a decoded fake GPU file; errors name the file, the GPU index and the key."""
    if not isinstance(document, dict) or not isinstance(document.get("gpus"), list):
        raise ProbeError(f'fake GPU file {path}: expected an object {{"gpus": [...]}}')
    snapshots = []
    for index, entry in enumerate(document["gpus"]):
        where = f"fake GPU file {path}: gpus[{index}]"
        if not isinstance(entry, dict):
            raise ProbeError(f"{where}: expected an object, got {type(entry).__name__}")
        missing = [key for key in FIELDS if key not in entry]
        if missing:
            raise ProbeError(f"{where}: missing key(s) {', '.join(missing)}")
        name = entry["name"]
        if not isinstance(name, str) or not name:
            raise ProbeError(f"{where}.name: expected a non-empty string, got {name!r}")
        total = _number(where, entry, "memory_total_mb")
        used = _number(where, entry, "memory_used_mb")
        utilization = _number(where, entry, "utilization")
        if total <= 0:
            raise ProbeError(f"{where}.memory_total_mb: must be > 0, got {total:g}")
        if used > total:
            raise ProbeError(f"{where}.memory_used_mb: {used:g} is more than the total {total:g}")
        if utilization > 100:
            raise ProbeError(f"{where}.utilization: {utilization:g} is neither 0-1 nor 0-100")
        if utilization > 1:
            utilization /= 100  # a percentage (see the module docstring)
        snapshots.append(GpuSnapshot(index, name, int(total), int(used), float(utilization)))
    return snapshots


def _check_before_write(path: Path, document: object) -> None:
    # Refuse to write a file the probe would reject; the caller's arguments are what is wrong.
    try:
        parse_fake_gpus(path, document)
    except ProbeError as exc:
        raise ValueError(str(exc)) from exc


def _number(where: str, entry: dict[str, Any], key: str) -> float:
    value = entry[key]
    # bool is an int in Python, and json accepts NaN/Infinity: neither is a sensible amount.
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ProbeError(f"{where}.{key}: expected a number, got {value!r}")
    if value < 0:
        raise ProbeError(f"{where}.{key}: must be >= 0, got {value:g}")
    return float(value)


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ProbeError(f"fake GPU file {path}: cannot read it: {exc.strerror or exc}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProbeError(f"fake GPU file {path}: invalid JSON: {exc}") from exc


def _write_json_atomically(path: Path, document: object) -> None:
    # The temporary file sits next to the target so os.replace is a same-filesystem rename.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as tmp:
            json.dump(document, tmp, indent=2)
            tmp.write("\n")
        Path(tmp_name).replace(path)  # os.replace: atomic on POSIX
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
