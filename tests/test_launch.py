"""The pure command builder: names, --cuda rewriting, environment, interpreter, conda."""

from __future__ import annotations

import re
import shlex
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from app.launch import (
    CONDA_SNIPPET,
    PYTHON_MARKER,
    LaunchRequest,
    build_launch,
    rewrite_cuda,
    session_name,
)
from app.paths import StatePaths

BASE_ENV = {
    "PATH": "/usr/bin:/bin",
    "HOME": "/home/u",
    "TMUX": "/tmp/tmux-1000/default,1,0",
    "TMUX_PANE": "%3",
    "STY": "123.pts-0.host",
    "WINDOW": "0",
    "CUDA_VISIBLE_DEVICES": "7",
    "KEEP_ME": "yes",
}


def launch(paths: StatePaths, **kw: Any) -> LaunchRequest:
    args: dict[str, Any] = {
        "job_id": 12,
        "script": "/proj/train.py",
        "conda_env": "",
        "args": "--lr 0.1",
        "gpus": [0, 1],
        "paths": paths,
        "base_env": BASE_ENV,
        "now": time.time(),
    }
    args.update(kw)
    return build_launch(**args)


@pytest.fixture
def paths(tmp_path: Path) -> StatePaths:
    return StatePaths(tmp_path / "state")


# --- rewrite_cuda -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("words", "gpus", "expected"),
    [
        (["--cuda", "0"], [2], ["--cuda", "2"]),
        (["--cuda=3"], [0, 1], ["--cuda=0,1"]),
        (["--lr", "1"], [1], ["--lr", "1", "--cuda", "1"]),
        ([], [4], ["--cuda", "4"]),
        (["--lr", "1", "--cuda"], [0, 1], ["--lr", "1", "--cuda", "0,1"]),
        (["--cuda", "--lr", "1"], [5], ["--cuda", "5", "--lr", "1"]),
        (
            ["--cuda", "0", "--x", "--cuda=1", "--cuda", "2"],
            [6],
            ["--cuda", "6", "--x", "--cuda=6", "--cuda", "6"],
        ),
        (["--cudax", "1"], [0], ["--cudax", "1", "--cuda", "0"]),
    ],
)
def test_rewrite_cuda(words: list[str], gpus: list[int], expected: list[str]) -> None:
    assert rewrite_cuda(words, gpus) == expected


def test_rewrite_cuda_does_not_mutate_input() -> None:
    words = ["--cuda", "0"]
    rewrite_cuda(words, [1])
    assert words == ["--cuda", "0"]


# --- session names ------------------------------------------------------------------------


def test_session_name_basic() -> None:
    assert session_name(12, [0, 1], "/proj/train.py") == "gpujob_12_0-1_train"
    assert session_name(3, [2], "run.sh") == "gpujob_3_2_run"


def test_session_name_is_tmux_legal_and_truncated() -> None:
    name = session_name(1, [0], "/p/my.weird:name with spaces;$(x)" + "z" * 100 + ".py")
    assert re.fullmatch(r"[A-Za-z0-9_-]+", name)
    stem = name.removeprefix("gpujob_1_0_")
    assert len(stem) == 40
    assert stem.startswith("my_weird_name_with_spaces__")


# --- environment --------------------------------------------------------------------------


def test_env_with_rewrite_removes_cuda_visible_devices(paths: StatePaths) -> None:
    req = launch(paths)
    assert "CUDA_VISIBLE_DEVICES" not in req.env
    assert req.env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert req.env["GPUSCHED_JOB_ID"] == "12"
    assert req.env["GPUSCHED_GPUS"] == "0,1"
    assert req.env["KEEP_ME"] == "yes"
    for var in ("TMUX", "TMUX_PANE", "STY", "WINDOW"):
        assert var not in req.env
    assert req.argv[-2:] == ["--cuda", "0,1"]


def test_env_without_rewrite_sets_cuda_visible_devices(paths: StatePaths) -> None:
    req = launch(paths, rewrite=False, args="--cuda 9")
    assert req.env["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert req.argv == ["python3", "/proj/train.py", "--cuda", "9"]


def test_base_env_is_not_mutated(paths: StatePaths) -> None:
    before = dict(BASE_ENV)
    launch(paths)
    assert before == BASE_ENV


# --- interpreter, paths, display ----------------------------------------------------------


@pytest.mark.parametrize(
    ("script", "head"),
    [
        ("/p/a.py", ["python3", "/p/a.py"]),
        ("/p/a.sh", ["bash", "/p/a.sh"]),
        ("/p/a.bin", ["/p/a.bin"]),
        ("/p/noext", ["/p/noext"]),
    ],
)
def test_interpreter_by_extension(paths: StatePaths, script: str, head: list[str]) -> None:
    req = launch(paths, script=script, args="x")
    assert req.argv == [*head, "x", "--cuda", "0,1"]
    assert req.display_command == shlex.join([*head, "x", "--cuda", "0,1"])


def test_paths_and_defaults(paths: StatePaths) -> None:
    now = time.mktime((2024, 3, 5, 14, 7, 9, 0, 0, -1))
    req = launch(paths, now=now)
    assert req.log_path == paths.logs / "job_12_20240305_140709.log"
    assert req.exit_file == paths.exit_file(12)
    assert req.spec_file == paths.run_spec(12)
    assert req.cwd == "/proj"
    assert req.session == "gpujob_12_0-1_train"
    assert launch(paths, cwd="/elsewhere").cwd == "/elsewhere"


def test_shell_metacharacters_stay_single_words(paths: StatePaths) -> None:
    req = launch(paths, args="--x ';echo pwned' '$(touch /tmp/x)' \"a b\"")
    assert req.argv == [
        "python3",
        "/proj/train.py",
        "--x",
        ";echo pwned",
        "$(touch /tmp/x)",
        "a b",
        "--cuda",
        "0,1",
    ]
    assert "-c" not in req.argv
    assert shlex.split(req.display_command) == req.argv


def test_unbalanced_quotes_raise(paths: StatePaths) -> None:
    with pytest.raises(ValueError):
        launch(paths, args="--x 'unterminated")


# --- conda --------------------------------------------------------------------------------


@pytest.mark.parametrize("env_name", ["myenv", "/opt/conda/envs/torch"])
def test_conda_uses_fixed_snippet(paths: StatePaths, env_name: str) -> None:
    user_args = "--x ';echo pwned' '$(touch /tmp/x)'"
    req = launch(paths, conda_env=env_name, args=user_args)
    assert req.argv[:5] == ["bash", "-c", CONDA_SNIPPET, "gpusched-job", env_name]
    assert req.argv[5:] == [
        PYTHON_MARKER,
        "/proj/train.py",
        "--x",
        ";echo pwned",
        "$(touch /tmp/x)",
        "--cuda",
        "0,1",
    ]
    # User text is never part of the code bash runs, only of its positional parameters.
    assert "pwned" not in CONDA_SNIPPET
    assert "touch" not in CONDA_SNIPPET
    assert env_name not in CONDA_SNIPPET
    assert req.display_command == shlex.join(
        ["python", "/proj/train.py", "--x", ";echo pwned", "$(touch /tmp/x)", "--cuda", "0,1"]
    )


def test_conda_with_shell_script_has_no_python_marker(paths: StatePaths) -> None:
    req = launch(paths, conda_env="e", script="/p/run.sh", args="")
    assert req.argv[5:] == ["bash", "/p/run.sh", "--cuda", "0,1"]


def test_no_conda_means_no_bash_snippet(paths: StatePaths) -> None:
    req = launch(paths, conda_env="")
    assert req.argv[0] == "python3"
    assert CONDA_SNIPPET not in req.argv


# --- the conda snippet itself, run by bash with a fake conda ------------------------------

FAKE_CONDA = """#!/bin/sh
if [ "$1" = shell.bash ] && [ "$2" = hook ]; then
  echo 'conda() { [ "$1" = activate ] && [ "$2" != bad ] && export FAKE_CONDA_ENV="$2"; }'
fi
"""


def _bin(tmp_path: Path, names: list[str]) -> Path:
    """A PATH directory holding a fake conda and fake interpreters that name themselves."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    for name in names:
        exe = bindir / name
        body = FAKE_CONDA if name == "conda" else f'#!/bin/sh\necho "{name} $FAKE_CONDA_ENV $*"\n'
        exe.write_text(body)
        exe.chmod(0o755)
    return bindir


def _snippet(
    env_name: str, command: list[str], env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["/bin/bash", "-c", CONDA_SNIPPET, "gpusched-job", env_name, *command],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.parametrize(
    ("names", "chosen"),
    [(["conda", "python", "python3"], "python"), (["conda", "python3"], "python3")],
)
def test_snippet_activates_and_picks_python(tmp_path: Path, names: list[str], chosen: str) -> None:
    env = {"PATH": str(_bin(tmp_path, names))}
    res = _snippet("myenv", [PYTHON_MARKER, "/p/a.py", "a b", ";x"], env)
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"{chosen} myenv /p/a.py a b ;x\n"


def test_snippet_activation_failure_exits_127(tmp_path: Path) -> None:
    env = {"PATH": str(_bin(tmp_path, ["conda", "python3"]))}
    res = _snippet("bad", [PYTHON_MARKER, "/p/a.py"], env)
    assert res.returncode == 127
    assert "gpusched: cannot activate conda environment 'bad'" in res.stderr
    assert res.stdout == ""


def test_snippet_without_conda_exits_127(tmp_path: Path) -> None:
    env = {"PATH": str(_bin(tmp_path, ["python3"]))}
    res = _snippet("myenv", [PYTHON_MARKER, "/p/a.py"], env)
    assert res.returncode == 127
    assert res.stderr == (
        "gpusched: conda not found on PATH; cannot activate environment 'myenv'\n"
    )


def test_snippet_falls_back_to_conda_exe(tmp_path: Path) -> None:
    bindir = _bin(tmp_path, ["conda", "python3"])
    hidden = tmp_path / "conda_home"
    hidden.mkdir()
    (bindir / "conda").rename(hidden / "conda")
    env = {"PATH": str(bindir), "CONDA_EXE": str(hidden / "conda")}
    res = _snippet("myenv", [PYTHON_MARKER, "/p/a.py"], env)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "python3 myenv /p/a.py\n"
