"""Requirements a job declares itself: a script header, or directives in its arguments.

Script header (the Workload Daemon's format): the script's second line (or its first, when it
has no `#!` line) is a JSON comment::

    #!/bin/bash
    # {"requirements": {"ram": 8, "vram": 4, "ramp_up_time": 60}}

`ram` is host RAM in GB, `vram` GPU memory in GB (per GPU), `ramp_up_time` the seconds the job
takes to allocate them. The header is read when the job is queued and stored with it.

Directives: `--gpusched-vram GB`, `--gpusched-ram GB` and `--gpusched-ramp-up S` among a job's
arguments (what `gpusched add --vram/--ram/--ramp-up` writes) declare the same for one job
line; they win over the header and are removed from the command line the job runs with.

Both end up as one JSON object in the job's `declared` column: `{"ram_mb": ..,
"vram_mb": .., "ramp_up_s": ..}`, or `{"error": "file:2: reason"}` for a bad header, which
makes the job unschedulable with that reason.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from app.models import RequirementError

#: Bytes read from the top of a script: a header is on its first two lines.
HEAD_BYTES = 64 * 1024
#: Most GB a job may declare (1 PiB).
MAX_GB = 1 << 20
HEADER_KEYS = {"ram": "ram_mb", "vram": "vram_mb", "ramp_up_time": "ramp_up_s"}
DIRECTIVES = {
    "--gpusched-ram": "ram_mb",
    "--gpusched-vram": "vram_mb",
    "--gpusched-ramp-up": "ramp_up_s",
}


@dataclass(frozen=True)
class Declared:
    ram_mb: int | None = None
    vram_mb: int | None = None
    ramp_up_s: float | None = None

    def over(self, base: Declared) -> Declared:
        """These values where set, else base's."""
        return Declared(
            self.ram_mb if self.ram_mb is not None else base.ram_mb,
            self.vram_mb if self.vram_mb is not None else base.vram_mb,
            self.ramp_up_s if self.ramp_up_s is not None else base.ramp_up_s,
        )

    def to_json(self) -> str:
        values = {k: v for k, v in asdict(self).items() if v is not None}
        return json.dumps(values, sort_keys=True) if values else ""


def _value(field: str, raw: object, what: str) -> int | float:
    """GB -> MB for memory, seconds as is; raises RequirementError naming `what`."""
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw):
        raise RequirementError(f"{what} must be a number, not {raw!r}")
    if field == "ramp_up_s":
        if raw < 0:
            raise RequirementError(f"{what} must be 0 or more seconds, not {raw!r}")
        return float(raw)
    if raw <= 0:
        raise RequirementError(f"{what} must be a positive number of GB, not {raw!r}")
    if raw > MAX_GB:  # a typo; and MB beyond 2**63 cannot even be stored with the job
        raise RequirementError(f"{what} must be at most {MAX_GB} GB, not {raw!r}")
    return int(raw * 1024)


def parse_header(line: str) -> Declared | None:
    """The requirements of one header line; None when the line is not a header.

    Raises RequirementError (without the file:line, which the caller adds)."""
    text = line.strip()
    if not text.startswith("#"):
        return None
    body = text.lstrip("#").strip()
    if not body.startswith("{"):
        return None
    try:
        data = json.loads(body)
    except json.JSONDecodeError as exc:
        raise RequirementError(f"requirements header is not valid JSON: {exc.msg}") from None
    if not isinstance(data, dict) or "requirements" not in data:
        return None  # some other JSON comment
    reqs = data["requirements"]
    if not isinstance(reqs, dict):
        raise RequirementError("'requirements' must be an object, e.g. {\"vram\": 4}")
    unknown = sorted(set(reqs) - set(HEADER_KEYS))
    if unknown:
        raise RequirementError(
            f"unknown requirement '{unknown[0]}' (known: ram, vram, ramp_up_time)"
        )
    values = {HEADER_KEYS[k]: _value(HEADER_KEYS[k], v, f"'{k}'") for k, v in reqs.items()}
    return Declared(**values)  # type: ignore[arg-type]


def read_header(script: Path) -> str:
    """The `declared` JSON of a script's header: "" when it has none (or cannot be read: the
    launch reports a missing script), `{"error": ...}` with file:line for a bad one."""
    try:
        with script.open("rb") as f:
            head = f.read(HEAD_BYTES)
    except OSError:
        return ""
    # utf-8-sig: a byte-order mark (editors on Windows write one) is not part of line 1.
    lines = head.decode("utf-8-sig", errors="replace").splitlines()[:2]
    if lines and lines[0].startswith("#!"):
        candidates = [(2, lines[1])] if len(lines) > 1 else []
    else:
        candidates = list(enumerate(lines, start=1))
    for number, line in candidates:
        try:
            declared = parse_header(line)
        except RequirementError as exc:
            return json.dumps({"error": f"{script}:{number}: {exc}"})
        if declared is not None:
            return declared.to_json()
    return ""


def split_directives(words: list[str]) -> tuple[Declared, list[str]]:
    """(what the `--gpusched-*` words declare, the other words). Raises RequirementError."""
    values: dict[str, int | float] = {}
    rest: list[str] = []
    i = 0
    while i < len(words):
        word = words[i]
        name, eq, inline = word.partition("=")
        field = DIRECTIVES.get(name)
        if field is None:
            rest.append(word)
            i += 1
            continue
        if eq:
            raw, i = inline, i + 1
        elif i + 1 < len(words):
            raw, i = words[i + 1], i + 2
        else:
            raise RequirementError(f"{name} needs a value")
        try:
            number = float(raw)
        except ValueError:
            raise RequirementError(f"{name} must be a number, not {raw!r}") from None
        values[field] = _value(field, number, name)
    return Declared(**values), rest  # type: ignore[arg-type]


def decode(declared: str) -> Declared:
    """The stored `declared` JSON back; raises RequirementError for a recorded header error."""
    if not declared:
        return Declared()
    data = json.loads(declared)
    if "error" in data:
        raise RequirementError(str(data["error"]))
    return Declared(
        ram_mb=data.get("ram_mb"), vram_mb=data.get("vram_mb"), ramp_up_s=data.get("ramp_up_s")
    )
