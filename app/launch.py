"""Turn a scheduled job into the exact command, environment and files of one launch.

Pure: nothing here touches the filesystem or spawns processes; the runner does that.
The job's arguments are shell *words* (as written in jobs.txt) but they only ever travel
as argv list elements: no shell string is ever built from user text, so `;`, `$(...)`
and quotes reach the script literally.
"""

from __future__ import annotations

import re
import shlex
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath

from app.headers import split_directives
from app.paths import StatePaths

#: Environment variables that describe the *scheduler's* terminal, not the job's: a job
#: inheriting them would believe it runs inside the scheduler's tmux/screen session.
_TERMINAL_VARS = ("TMUX", "TMUX_PANE", "STY", "WINDOW")

#: Stand-in for the interpreter of a `.py` job inside the conda snippet: the activated env
#: decides whether `python` exists, so the choice can only be made after activation.
PYTHON_MARKER = "__gpusched_python__"

#: Argument 0 of the snippet (what bash calls `$0`): shows up in bash's own error messages.
SNIPPET_NAME = "gpusched-job"

#: Run as `bash -c CONDA_SNIPPET gpusched-job ENV COMMAND...`. A fixed constant: the
#: environment name and the command arrive as positional parameters, never as code.
#: `$CONDA_EXE` (exported by `conda init` shells) is a fallback for daemons started with a
#: PATH that lacks conda's bin directory, which is common when conda is a shell function.
CONDA_SNIPPET = r"""
env_name="$1"; shift
conda_bin="$(command -v conda 2>/dev/null)"
if [ -z "$conda_bin" ] && [ -n "${CONDA_EXE:-}" ] && [ -x "$CONDA_EXE" ]; then
  conda_bin="$CONDA_EXE"
fi
if [ -z "$conda_bin" ]; then
  printf "gpusched: conda not found on PATH; cannot activate environment '%s'\n" \
    "$env_name" >&2
  exit 127
fi
if ! hook="$("$conda_bin" shell.bash hook)" || ! eval "$hook"; then
  printf "gpusched: 'conda shell.bash hook' failed; cannot activate environment '%s'\n" \
    "$env_name" >&2
  exit 127
fi
if ! conda activate "$env_name"; then
  printf "gpusched: cannot activate conda environment '%s'\n" "$env_name" >&2
  exit 127
fi
if [ "${1:-}" = "__gpusched_python__" ]; then
  shift
  if command -v python >/dev/null 2>&1; then
    set -- python "$@"
  else
    set -- python3 "$@"
  fi
fi
exec "$@"
"""

_ILLEGAL_NAME_CHARS = re.compile(r"[^A-Za-z0-9_-]")
_STEM_MAX = 40


@dataclass(frozen=True)
class LaunchRequest:
    """Everything a runner needs to start one job; built by `build_launch`."""

    job_id: int
    session: str
    argv: list[str]  # what the in-pane wrapper execs (may start with the conda snippet)
    env: dict[str, str]  # the job's complete environment
    cwd: str
    log_path: Path
    exit_file: Path
    spec_file: Path
    display_command: str  # the logical command, for status output


def gpu_ids(gpus: Sequence[int]) -> str:
    """`[0, 1]` -> `"0,1"`: the form of `--cuda` values and CUDA_VISIBLE_DEVICES."""
    return ",".join(str(g) for g in gpus)


def session_name(job_id: int, gpus: Sequence[int], script: str) -> str:
    """`gpujob_<id>_<gpus>_<stem>`; tmux forbids `.` and `:` in names, so keep it plain."""
    stem = _ILLEGAL_NAME_CHARS.sub("_", PurePath(script).stem)[:_STEM_MAX]
    gpu_part = "-".join(str(g) for g in gpus)
    return _ILLEGAL_NAME_CHARS.sub("_", f"gpujob_{job_id}_{gpu_part}_{stem}")


def rewrite_cuda(words: list[str], gpus: Sequence[int]) -> list[str]:
    """Point every `--cuda` option at the allocated GPUs; add one when absent.

    A `--cuda` followed by nothing, or by another `--option`, is treated as value-less
    and gets the ids inserted (consuming `--lr` as the GPU list would break the job).
    """
    ids = gpu_ids(gpus)
    out: list[str] = []
    found = False
    i = 0
    while i < len(words):
        word = words[i]
        if word == "--cuda":
            found = True
            out += ["--cuda", ids]
            has_value = i + 1 < len(words) and not words[i + 1].startswith("--")
            i += 2 if has_value else 1
            continue
        if word.startswith("--cuda="):
            found = True
            out.append(f"--cuda={ids}")
        else:
            out.append(word)
        i += 1
    if not found:
        out += ["--cuda", ids]
    return out


def job_environment(
    base_env: Mapping[str, str], job_id: int, gpus: Sequence[int], *, rewrite: bool
) -> dict[str, str]:
    """The job's environment: the scheduler's, minus its terminal, plus the GPU choice."""
    ids = gpu_ids(gpus)
    env = {k: v for k, v in base_env.items() if k not in _TERMINAL_VARS}
    if rewrite:
        # The script selects its GPUs through --cuda with *physical* ids; a leftover
        # CUDA_VISIBLE_DEVICES would renumber them and point the job at the wrong cards.
        env.pop("CUDA_VISIBLE_DEVICES", None)
    else:
        env["CUDA_VISIBLE_DEVICES"] = ids
    # nvidia-smi numbers GPUs by PCI bus; CUDA's default (fastest first) may not match.
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    env["GPUSCHED_JOB_ID"] = str(job_id)
    env["GPUSCHED_GPUS"] = ids
    return env


def _command(script: str, words: list[str], *, conda: bool) -> tuple[list[str], list[str]]:
    """(argv to exec, logical command for display) for a script and its words."""
    suffix = PurePath(script).suffix.lower()
    if suffix == ".py":
        if conda:
            return [PYTHON_MARKER, script, *words], ["python", script, *words]
        return ["python3", script, *words], ["python3", script, *words]
    if suffix == ".sh":
        return ["bash", script, *words], ["bash", script, *words]
    return [script, *words], [script, *words]


def build_launch(
    *,
    job_id: int,
    script: str,
    conda_env: str,
    args: str,
    gpus: Sequence[int],
    paths: StatePaths,
    base_env: Mapping[str, str],
    now: float,
    rewrite: bool = True,
    cwd: str | None = None,
    kind: str = "script",
    log_dir: Path | None = None,
) -> LaunchRequest:
    """Build the launch of one job on `gpus`.

    A "command" job (a commands-file line) is shell code run by `bash -c`: its GPUs can only
    reach it through CUDA_VISIBLE_DEVICES. Raises ValueError when `args` is not valid shell
    words (e.g. an unclosed quote).
    """
    if kind == "command":
        rewrite = False
        command, display = ["bash", "-c", script], [script]
    else:
        _, words = split_directives(shlex.split(args))  # the scheduler's words, not the job's
        if rewrite:
            words = rewrite_cuda(words, gpus)
        command, display = _command(script, words, conda=bool(conda_env))
    argv = (
        ["bash", "-c", CONDA_SNIPPET, SNIPPET_NAME, conda_env, *command] if conda_env else command
    )
    stamp = time.strftime("%Y%m%d_%H%M%S", time.localtime(now))
    return LaunchRequest(
        job_id=job_id,
        session=session_name(job_id, gpus, "cmd" if kind == "command" else script),
        argv=argv,
        env=job_environment(base_env, job_id, gpus, rewrite=rewrite),
        cwd=cwd if cwd is not None else str(PurePath(script).parent if kind == "script" else "."),
        log_path=(log_dir or paths.logs) / f"job_{job_id}_{stamp}.log",
        exit_file=paths.exit_file(job_id),
        spec_file=paths.run_spec(job_id),
        display_command=script if kind == "command" else shlex.join(display),
    )
