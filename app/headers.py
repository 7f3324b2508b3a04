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
`time_limit` / `--gpusched-time-limit DURATION` and `retries` / `--gpusched-retries N` are read
the same way (app/limits.py enforces them).

Both end up as one JSON object in the job's `declared` column: `{"ram_mb": ..,
"vram_mb": .., "ramp_up_s": .., "time_limit_s": .., "retries": ..}`, or `{"error":
"file:2: reason"}` for a bad header, which makes the job unschedulable with that reason.
"""

from __future__ import annotations

import json
import math
import re
import shlex
from dataclasses import asdict, dataclass
from pathlib import Path

from app.models import RequirementError
from app.reprs import short_repr

#: Bytes read from the top of a script: a header is on its first two lines.
HEAD_BYTES = 64 * 1024
#: Most GB a job may declare (1 PiB).
MAX_GB = 1 << 20
#: Longest time limit (ten years: anything longer is a typo) and most retries of one job.
MAX_DURATION_S = 10 * 365 * 86400.0
MAX_RETRIES = 1000
HEADER_KEYS = {
    "ram": "ram_mb",
    "vram": "vram_mb",
    "ramp_up_time": "ramp_up_s",
    "time_limit": "time_limit_s",
    "retries": "retries",
}
DIRECTIVES = {
    "--gpusched-ram": "ram_mb",
    "--gpusched-vram": "vram_mb",
    "--gpusched-ramp-up": "ramp_up_s",
    "--gpusched-time-limit": "time_limit_s",
    "--gpusched-retries": "retries",
}
#: The directives checked when a jobs-file line is read (a bad one is a line error).
RUN_DIRECTIVES = ("--gpusched-time-limit", "--gpusched-retries")
_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"
_DURATION = re.compile(rf"(?:{_NUMBER}d)?(?:{_NUMBER}h)?(?:{_NUMBER}m)?(?:{_NUMBER}s)?")
_UNITS = (86400.0, 3600.0, 60.0, 1.0)
DURATION_HINT = "use e.g. 90, 90s, 30m, 2h or 1h30m"


def parse_duration(text: str, what: str = "duration") -> float:
    """`90` or `90s` (seconds), `30m`, `2h`, `1h30m`, `1d` -> seconds; raises RequirementError."""
    raw = text.strip().lower()
    try:
        seconds = float(raw)  # a bare number is seconds
    except ValueError:
        match = _DURATION.fullmatch(raw)
        if not raw or match is None:
            shown = short_repr(text)
            raise RequirementError(f"{what}: {shown} is not a duration ({DURATION_HINT})") from None
        seconds = sum(float(n) * u for n, u in zip(match.groups(), _UNITS, strict=True) if n)
    return _seconds(seconds, what)


def as_duration(raw: object) -> float:
    """A setting's duration: a number of seconds, or text such as `90s`, `30m` or `1h30m`."""
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        return float(raw)
    if isinstance(raw, str):
        try:
            return float(raw.strip())
        except ValueError:
            try:
                return parse_duration(raw)
            except RequirementError:
                pass
    raise ValueError(f"expected a duration ({DURATION_HINT})")


def _seconds(seconds: float, what: str) -> float:
    if seconds <= 0 or math.isnan(seconds):
        raise RequirementError(f"{what} must be more than 0 seconds, not {seconds:g}")
    if seconds > MAX_DURATION_S:  # inf too
        if math.isinf(seconds):
            raise RequirementError(f"{what} must be at most 10 years, not {seconds:g}")
        raise RequirementError(f"{what} must be at most 10 years, not {format_duration(seconds)}")
    return seconds


def format_duration(seconds: float) -> str:
    """3600 -> `1h`, 5400 -> `1h30m`, 90 -> `1m30s`, 0.5 -> `0.5s`."""
    if seconds < 60:
        return f"{seconds:g}s"
    whole = round(seconds)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, whole = divmod(whole, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


def _retry_count(raw: object, what: str) -> int:
    text = raw.strip() if isinstance(raw, str) else ""
    if text.isascii() and text.isdigit() and len(text) <= 10:  # int() refuses 4300 digits
        raw = int(text)
    if isinstance(raw, float) and raw.is_integer():
        raw = int(raw)
    if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw <= MAX_RETRIES:
        raise RequirementError(
            f"{what} must be a whole number of retries from 0 to {MAX_RETRIES}, "
            f"not {short_repr(raw)}"
        )
    return raw


@dataclass(frozen=True)
class Declared:
    ram_mb: int | None = None
    vram_mb: int | None = None
    ramp_up_s: float | None = None
    time_limit_s: float | None = None
    retries: int | None = None

    def over(self, base: Declared) -> Declared:
        """These values where set, else base's."""
        return Declared(
            self.ram_mb if self.ram_mb is not None else base.ram_mb,
            self.vram_mb if self.vram_mb is not None else base.vram_mb,
            self.ramp_up_s if self.ramp_up_s is not None else base.ramp_up_s,
            self.time_limit_s if self.time_limit_s is not None else base.time_limit_s,
            self.retries if self.retries is not None else base.retries,
        )

    def to_json(self) -> str:
        values = {k: v for k, v in asdict(self).items() if v is not None}
        return json.dumps(values, sort_keys=True) if values else ""


def _finite(raw: int | float) -> bool:
    try:
        return math.isfinite(raw)
    except OverflowError:  # an integer beyond a float's range (JSON allows 4300 digits)
        return False


def _value(field: str, raw: object, what: str) -> int | float:
    """GB -> MB for memory, seconds as is; raises RequirementError naming `what`."""
    if field == "retries":
        return _retry_count(raw, what)
    if field == "time_limit_s" and isinstance(raw, str):
        return parse_duration(raw, what)
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not _finite(raw):
        raise RequirementError(f"{what} must be a number, not {short_repr(raw)}")
    if field == "time_limit_s":
        return _seconds(float(raw), what)
    if field == "ramp_up_s":
        if raw < 0:
            raise RequirementError(f"{what} must be 0 or more seconds, not {short_repr(raw)}")
        return float(raw)
    if raw <= 0:
        raise RequirementError(f"{what} must be a positive number of GB, not {short_repr(raw)}")
    if raw > MAX_GB:  # a typo; and MB beyond 2**63 cannot even be stored with the job
        raise RequirementError(f"{what} must be at most {MAX_GB} GB, not {short_repr(raw)}")
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
    except RecursionError:
        raise RequirementError("requirements header is not valid JSON: nested too deeply") from None
    except ValueError:  # an integer of more than 4300 digits
        raise RequirementError(
            "requirements header is not valid JSON: a number has too many digits"
        ) from None
    if not isinstance(data, dict) or "requirements" not in data:
        return None  # some other JSON comment
    reqs = data["requirements"]
    if not isinstance(reqs, dict):
        raise RequirementError("'requirements' must be an object, e.g. {\"vram\": 4}")
    unknown = sorted(set(reqs) - set(HEADER_KEYS))
    if unknown:
        raise RequirementError(
            f"unknown requirement '{unknown[0]}' (known: {', '.join(HEADER_KEYS)})"
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
        if field in ("time_limit_s", "retries"):
            values[field] = _value(field, raw, name)
            continue
        try:
            number = float(raw)
        except ValueError:
            raise RequirementError(f"{name} must be a number, not {short_repr(raw)}") from None
        values[field] = _value(field, number, name)
    return Declared(**values), rest  # type: ignore[arg-type]


def run_directive_words(time_limit: str | None, retries: str | None) -> list[str]:
    """`gpusched add --time-limit T --retries N` as the directives they stand for, checked
    (RequirementError naming the flag)."""
    words = []
    if time_limit is not None:
        parse_duration(time_limit, "--time-limit")
        words.append(f"--gpusched-time-limit {time_limit.strip().lower()}")
    if retries is not None:
        words.append(f"--gpusched-retries {_retry_count(retries, '--retries')}")
    return words


def run_directive_problem(args: str) -> str | None:
    """Why a `--gpusched-time-limit` / `--gpusched-retries` in `args` (valid shell words) is
    unusable, or None; checked when a jobs-file line is read, so a bad one is a line error."""
    if "--gpusched-" not in args:  # most lines: no need to split the words
        return None
    try:
        words = shlex.split(args)
    except ValueError:  # the caller reports bad quoting
        return None
    for i, word in enumerate(words):
        name, eq, inline = word.partition("=")
        if name not in RUN_DIRECTIVES:
            continue
        raw = inline if eq else words[i + 1] if i + 1 < len(words) else None
        if raw is None:
            return f"{name} needs a value"
        try:
            _value(DIRECTIVES[name], raw, name)
        except RequirementError as exc:
            return str(exc)
    return None


def decode(declared: str) -> Declared:
    """The stored `declared` JSON back; raises RequirementError for a recorded header error."""
    if not declared:
        return Declared()
    data = json.loads(declared)
    if "error" in data:
        raise RequirementError(str(data["error"]))
    return Declared(
        ram_mb=data.get("ram_mb"),
        vram_mb=data.get("vram_mb"),
        ramp_up_s=data.get("ramp_up_s"),
        time_limit_s=data.get("time_limit_s"),
        retries=data.get("retries"),
    )
