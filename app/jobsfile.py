"""The jobs file format: `priority,script_path,conda_env,arguments,allowed_gpus`, one job per line.

The format is shared with an older tool, so its quirks are kept on purpose:

* Lines are split with Python's `csv` reader (non-strict), so arguments containing commas need
  CSV quoting (`"--tags a,b"`, a quote inside doubled), while a quote in the middle of an
  unquoted field is literal and reaches `shlex` as shell quoting (`--name "a b"`).
* Everything after the fourth comma is the GPU list (`4,5,6,7` needs no quoting); with only four
  fields the job may run on any GPU.
* Blank lines and lines whose first non-blank character is `#` are ignored.
* Surrounding whitespace of a field is stripped unless the field is CSV-quoted, so a quoted
  field is taken exactly as written.
"""

from __future__ import annotations

import csv
import fcntl
import functools
import os
import re
from collections.abc import Callable
from pathlib import Path

from app.headers import run_directive_problem
from app.models import JobSpec, LineError, shell_problem

FIELDS = "priority,script_path,conda_env,arguments,allowed_gpus"
#: Characters after which a line needs the csv module: quoting, line breaks, NUL.
_CSV_SPECIAL = re.compile(r'["\r\n\0]')
#: A GPU id above this is a typo, and refusing it keeps `0-99999999` from building a huge tuple.
MAX_GPU_ID = 4095


#: The characters of a conda_env field: a conda environment name (conda itself refuses '/',
#: ' ', ':' and '#'; this is stricter: ASCII, nothing a shell or conda's activation script
#: could read as syntax), or a path to an environment prefix (it has a '/'), which may also
#: hold '/', '~', '@', ',' and '=' but not '$' (conda expands variables in a prefix), ':' (it
#: would split PATH) or blanks. Neither may start with '-' (an option to `conda activate`).
_CONDA_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.+-]")
_CONDA_PATH_CHARS = re.compile(r"[^A-Za-z0-9_.+/~@,=-]")
#: Longer is a typo (a Linux path is at most 4095 bytes).
_CONDA_MAX = 4095


@functools.lru_cache(maxsize=256)
def conda_env_problem(name: str) -> str | None:
    """Why `name` cannot be a conda_env field (a message for the user), or None if it can.

    Checked before the name reaches a command line: it travels as one argv word to
    `conda activate`, and conda's activation writes the prefix into shell code it evaluates.
    """
    is_path = "/" in name
    bad = (_CONDA_PATH_CHARS if is_path else _CONDA_NAME_CHARS).search(name)
    if bad is not None:
        why = f"has {bad.group()!r}, which is not allowed"
    elif name.startswith("-"):
        why = "cannot start with '-'"
    elif name in (".", ".."):
        why = "is not an environment name"
    elif len(name) > _CONDA_MAX:
        why = f"is longer than {_CONDA_MAX} characters"
    else:
        return None  # including "": no conda activation
    allowed = "letters, digits and _ . + -" + (" / ~ @ , =" if is_path else "")
    kind = "a path to an environment" if is_path else "an environment name"
    shown = name if len(name) <= 60 else name[:60] + "…"
    return f"conda_env {shown!r} {why} (in {kind}: ASCII {allowed})"


@functools.lru_cache(maxsize=1024)  # a file repeats a few GPU lists on many lines
def parse_gpu_list(text: str) -> tuple[int, ...] | None:
    """`""` -> None (any GPU); `"0-3,6"` -> (0, 1, 2, 3, 6): sorted, unique.

    Empty items (`"0,1,"`) are skipped: a trailing comma is an easy slip and means nothing.
    Raises ValueError with a message meant for the user.
    """
    gpus: set[int] = set()
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        if "-" in item[1:]:
            # `item[1:]` so that "-1" is reported as a bad id rather than a bad range.
            lo_text, _, hi_text = item.partition("-")
            lo, hi = _gpu_id(lo_text.strip()), _gpu_id(hi_text.strip())
            if lo is None or hi is None or lo > hi:
                raise ValueError(f"bad GPU range '{item}' in allowed_gpus")
            gpus.update(range(lo, hi + 1))
        else:
            gpu = _gpu_id(item)
            if gpu is None:
                raise ValueError(f"bad GPU id '{item}' in allowed_gpus")
            gpus.add(gpu)
    return tuple(sorted(gpus)) if gpus else None


def _gpu_id(text: str) -> int | None:
    # ASCII digits only: int() would also take "+1", "1_0" or other scripts' digits.
    if not text or not text.isascii() or not text.isdigit():
        return None
    value = int(text)
    return value if value <= MAX_GPU_ID else None


@functools.lru_cache(maxsize=1024)
def format_gpu_list(gpus: tuple[int, ...] | None) -> str:
    """The compact form, e.g. `0-3,6`; None (and the empty tuple) -> `""`, which means any GPU."""
    if not gpus:
        return ""
    ids = sorted(set(gpus))
    parts: list[str] = []
    start = prev = ids[0]
    for gpu in [*ids[1:], None]:
        if gpu is not None and gpu == prev + 1:
            prev = gpu
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if gpu is not None:
            start = prev = gpu
    return ",".join(parts)


def _describe_gpus(count: int) -> str:
    if count <= 0:
        return "this machine has no GPUs"
    if count == 1:
        return "this machine has GPU 0 only"
    return f"this machine has GPUs 0-{count - 1}"


def _quoted_fields(text: str) -> list[bool]:
    """For each field of `text`, whether it starts with a quote (= the csv reader unquoted it).

    The csv module does not say which fields were quoted, and only unquoted fields get their
    surrounding whitespace stripped. This mirrors the non-strict reader's field boundaries.
    """
    flags: list[bool] = []
    state = "start"
    for char in text:
        if state == "start":
            flags.append(char == '"')
            if char == '"':
                state = "quoted"
            elif char != ",":
                state = "plain"
        elif state == "plain":
            if char == ",":
                state = "start"
        elif state == "quoted":
            if char == '"':
                state = "quote_in_quoted"
        elif char == '"':  # state == "quote_in_quoted": a doubled quote
            state = "quoted"
        elif char == ",":
            state = "start"
        else:  # text after a closing quote is kept literally (non-strict csv)
            state = "plain"
    if state == "start":  # the empty field after a trailing comma (or of an empty text)
        flags.append(False)
    return flags


def _split(text: str) -> list[str]:
    """csv-split one line; raises csv.Error on input the csv module refuses."""
    if text and not _CSV_SPECIAL.search(text):  # no quoting, no line breaks or NUL: plain commas
        return [field.strip() for field in text.split(",")]
    row = next(csv.reader([text], strict=False), [])
    quoted = _quoted_fields(text)
    if len(quoted) != len(row):
        # Only on input with stray CR/LF or NUL characters: fall back to stripping everything.
        quoted = [False] * len(row)
    return [
        field if was_quoted else field.strip()
        for field, was_quoted in zip(row, quoted, strict=True)
    ]


@functools.lru_cache(maxsize=1024)
def _absolute(base_dir: str, script_text: str) -> str:
    # (os.path, not pathlib, and a memo: this runs once per line of a file that may have
    # 100,000, which name a few scripts.)
    expanded = os.path.expanduser(script_text)  # noqa: PTH111
    return os.path.abspath(os.path.join(base_dir, expanded))  # noqa: PTH100, PTH118


def script_problem(script: str) -> str | None:
    """Why `script` (an absolute path) cannot be run: "not found" or "is not a file"; or None."""
    if os.path.isfile(script):  # noqa: PTH113 (str paths: see parse_line)
        return None
    return "is not a file" if os.path.exists(script) else "not found"  # noqa: PTH110


def parse_line(
    text: str,
    *,
    file: str,
    line: int,
    base_dir: Path,
    gpu_count: int | None,
    check_script: Callable[[str], str | None] = script_problem,
) -> JobSpec | LineError | None:
    """One jobs-file line -> JobSpec, LineError (a reason for the user) or None (blank/comment).

    Never raises: a bad line must not stop the daemon from reading the rest of the file.
    `check_script` may be a memo of `script_problem` for a batch of lines (one stat per script).
    """
    text = text.rstrip("\r\n").removeprefix("\ufeff")  # a BOM from Windows editors on line 1
    if not text.strip() or text.lstrip().startswith("#"):
        return None

    def error(reason: str) -> LineError:
        return LineError(file, line, reason)

    try:
        fields = _split(text)
    except csv.Error as exc:
        return error(f"cannot split the line as CSV ({exc})")
    if len(fields) < 4:
        return error(f"expected 5 comma-separated fields ({FIELDS}), got {len(fields)}")
    priority_text, script_text, conda_env, args = fields[:4]

    try:
        priority = int(priority_text)
    except ValueError:
        return error(f"priority '{priority_text}' is not an integer (use e.g. 0, 5 or -1)")

    if not script_text:
        return error("empty script path (the second field must name the script to run)")
    # Absolute and normalised like os.path.abspath, but symlinks are kept: the user's path
    # (e.g. a "current" link to a checkout) is what the job should run.
    script = _absolute(os.fspath(base_dir), script_text)
    what = check_script(script)
    if what is not None:
        return error(f"script {script} {what}")

    conda_problem = conda_env_problem(conda_env)
    if conda_problem is not None:
        return error(conda_problem)

    args_problem = shell_problem(args)
    if args_problem is not None:
        return error(f"arguments: {args_problem}")
    directive_problem = run_directive_problem(args)  # --gpusched-time-limit / -retries
    if directive_problem is not None:
        return error(f"arguments: {directive_problem}")

    try:
        allowed = parse_gpu_list(",".join(fields[4:]))
    except ValueError as exc:
        return error(str(exc))
    if allowed is not None and gpu_count is not None:
        unknown = [gpu for gpu in allowed if gpu >= gpu_count]
        if unknown:
            return error(f"unknown GPU {unknown[0]} in allowed_gpus ({_describe_gpus(gpu_count)})")

    return JobSpec(
        priority=priority,
        script=script,
        conda_env=conda_env,
        args=args,
        allowed_gpus=allowed,
        source=f"{file}:{line}",
    )


def _csv_field(value: str) -> str:
    """Quote a field only when the reader would otherwise change it."""
    if "," in value or value.startswith('"') or value != value.strip():
        return '"' + value.replace('"', '""') + '"'
    return value


def format_line(spec: JobSpec) -> str:
    """A line (without newline) that parse_line reads back to an equal spec (except `source`).

    The GPU list is written raw after the fourth comma (`0-3,6`), as users write it. Quoting is
    done here rather than by csv.writer because the reader's rules (strip unquoted fields,
    a leading quote opens a quoted field) decide when quoting is needed. Raises ValueError
    for a field with a line break, which a line-based file cannot hold.
    """
    fields = [spec.script, spec.conda_env, spec.args]
    if any("\n" in field or "\r" in field for field in fields):
        raise ValueError("a jobs-file field cannot contain a line break")
    parts = [str(spec.priority), *(_csv_field(field) for field in fields)]
    return ",".join([*parts, format_gpu_list(spec.allowed_gpus)])


def append_line(path: Path, line: str) -> None:
    """Append one line atomically with respect to other writers that use this function.

    An exclusive flock serialises writers (the CLI and other tools), the newline repair of a
    file whose last line lacks one happens under that lock, and the data goes out in one
    os.write on an O_APPEND descriptor so even non-locking readers never see half a line.
    """
    if "\n" in line or "\r" in line:
        raise ValueError("a jobs-file line cannot contain a line break")
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        prefix = b"\n" if size > 0 and os.pread(fd, 1, size - 1) != b"\n" else b""
        data = prefix + line.encode("utf-8") + b"\n"
        written = os.write(fd, data)
        while written < len(data):  # a short write on a regular file: disk full or a signal
            written += os.write(fd, data[written:])
    finally:
        os.close(fd)  # also releases the lock
