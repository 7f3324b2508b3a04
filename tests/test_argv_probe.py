"""Arguments reach the job literally, in every runner: a probe script records its argv.

Quotes, `;`, `|`, `$( )`, backticks, newlines, unicode, tmux's own syntax (`;` at the end of a
word, `#{...}`, `=`, `%`, `{`) and a script in a folder whose name has spaces, `;` and `#{}`
(the job's working directory, which tmux is given with `-c`) must arrive as they were meant,
through tmux, GNU Screen and the direct runner alike, and run nothing.

Three ways in: a launch built by the runner's caller (any argv, newlines included), jobs-file
lines (written by `gpusched add` and by hand: a line cannot hold a newline, so these have
none), and a commands-file line, which is shell code: `$'a\\nb'` is how a newline gets there.
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.cli import main
from app.launch import LaunchRequest, build_launch
from app.paths import StatePaths
from app.runners import Runner, TmuxRunner
from app.runners.direct import DirectRunner
from app.runners.screen import ScreenRunner
from tests.helpers import wait_until
from tests.workspace import make_workspace

needs_tmux = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed")
needs_screen = pytest.mark.skipif(shutil.which("screen") is None, reason="screen not installed")
RUNNERS = [
    pytest.param("tmux", marks=needs_tmux),
    pytest.param("screen", marks=needs_screen),
    "direct",
]

#: Records what it was given: argv (after the script), its own path and working directory.
PROBE = """\
import json, os, sys
out = os.path.join(os.environ["PROBE_DIR"], "argv_" + os.environ.get("GPUSCHED_JOB_ID", "x"))
with open(out + ".tmp", "w", encoding="utf-8") as f:
    json.dump({"argv": sys.argv[1:], "script": sys.argv[0], "cwd": os.getcwd()}, f)
os.replace(out + ".tmp", out + ".json")
"""

#: Words a shell, tmux or screen would make something else of.
WORDS = [
    "plain",
    "",
    " ",
    "two words",
    "'single'",
    '"double"',
    "it's",
    ";",
    "a;b",
    "ends with;",
    "\\;",
    "x|y",
    "&&",
    "$(touch PWNED)",
    "`touch PWNED`",
    "$HOME",
    "${PATH}",
    "back\\slash",
    "tab\tinside",
    "é中文🚀",
    "-t",
    "=x",
    "%1",
    "@1",
    "{",
    "}",
    "#{session_name}",
    "##",
    "*",
    "?",
    "[a]",
    "~",
    ">out",
    "<in",
    "!",
    "-",
    "--",
]
#: Only argv can carry these (a jobs-file line ends at a line break).
BREAKS = ["new\nline", "cr\rinside", "\n"]


def probe_script(root: Path) -> Path:
    """The probe in a folder named the hard way; the folder is also the job's cwd."""
    folder = root / "my dir;#{session_name}$(x) é;"
    folder.mkdir(parents=True)
    script = folder / "pro be.py"
    script.write_text(PROBE)
    return script


def recorded(out_dir: Path, job_id: int) -> dict[str, Any]:
    path = out_dir / f"argv_{job_id}.json"
    wait_until(path.exists)
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


@pytest.fixture
def screendir(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A private, short SCREENDIR (socket paths must fit in 107 bytes), as `make_runner` reads
    it; its sessions quit after the test."""
    path = tempfile.mkdtemp(prefix="gs-", dir="/tmp")
    monkeypatch.setenv("SCREENDIR", path)
    try:
        yield path
    finally:
        runner = ScreenRunner(path)
        for name in runner.sessions():
            runner.kill(name, grace_s=1.0)
        shutil.rmtree(path, ignore_errors=True)


def make_runner(kind: str, tmux_socket: str, request: pytest.FixtureRequest) -> Runner:
    if kind == "tmux":
        return TmuxRunner(tmux_socket)
    if kind == "screen":
        return ScreenRunner(request.getfixturevalue("screendir"))
    return DirectRunner(echo=None)


@pytest.mark.parametrize("kind", RUNNERS)
def test_any_argv_reaches_the_script_literally(
    kind: str, tmp_path: Path, tmux_socket: str, request: pytest.FixtureRequest
) -> None:
    """Straight through a runner: the words, line breaks included, and an odd cwd. Two
    launches, so runners that keep a wrapper started ahead (spares) are covered too."""
    runner = make_runner(kind, tmux_socket, request)
    paths = StatePaths(tmp_path / "state").ensure()
    script = probe_script(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "PROBE_DIR": str(out_dir)}
    words = [*WORDS, *BREAKS]
    try:
        for job_id in (1, 2):
            req: LaunchRequest = build_launch(
                job_id=job_id,
                script=str(script),
                conda_env="",
                args=shlex.join(words),
                gpus=[0],
                paths=paths,
                base_env=env,
                now=time.time(),
                rewrite=False,
            )
            assert req.argv[2:] == words and req.cwd == str(script.parent)
            runner.launch(req)
            wait_until(req.exit_file.exists)
            assert json.loads(req.exit_file.read_text())["exit_code"] == 0
            seen = recorded(out_dir, job_id)
            assert seen == {"argv": words, "script": str(script), "cwd": str(script.parent)}
    finally:
        if isinstance(runner, DirectRunner):
            runner.close(grace_s=1.0)
    assert not list(tmp_path.rglob("PWNED"))


#: A line as a user types it: CSV, then shell words (README: "passed literally").
RAW_ARGS = """--x ';echo pwned' '$(touch PWNED)' "a b" 'it''s' | \\; `id` é"""


@pytest.mark.parametrize("kind", RUNNERS)
def test_jobs_file_and_commands_file_words_reach_the_script_literally(
    kind: str,
    tmp_path: Path,
    tmux_socket: str,
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if kind == "screen":
        request.getfixturevalue("screendir")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    ws = make_workspace(
        tmp_path / "ws", tmux_socket, gpus=3, runner=kind, commands_file=tmp_path / "cmds.txt"
    )
    ws.daemon.base_env["PROBE_DIR"] = str(out_dir)
    script = probe_script(tmp_path)
    try:
        # 1: what `gpusched add` writes (it quotes the CSV for us).
        args = ["add", str(script), "--args", shlex.join(WORDS), "--output-file"]
        assert main([*args, str(ws.jobs_file)]) == 0
        # 2: a line typed by hand.
        with ws.jobs_file.open("a", encoding="utf-8") as f:
            f.write(f"0,{script},,{RAW_ARGS},\n")
        # 3: a command line: shell code, where $'...' makes a newline.
        command = f"python3 {shlex.quote(str(script))} $'new\\nline' 'x y' ';' '$(id)' é"
        (tmp_path / "cmds.txt").write_text(command + "\n", encoding="utf-8")
        ws.daemon.on_path_event(str(ws.jobs_file))
        ws.tick()
        seen = {job_id: recorded(out_dir, job_id) for job_id in (1, 2, 3)}
        cuda = {job_id: ",".join(map(str, ws.job(job_id).gpus)) for job_id in (1, 2, 3)}
        assert ws.job(1).args == shlex.join(WORDS)
    finally:
        if isinstance(ws.daemon.runner, DirectRunner):
            ws.daemon.runner.close(grace_s=1.0)
        ws.store.close()
    assert seen[1]["argv"] == [*WORDS, "--cuda", cuda[1]]
    assert seen[2]["argv"] == [*shlex.split(RAW_ARGS), "--cuda", cuda[2]]
    assert seen[2]["argv"][:4] == ["--x", ";echo pwned", "$(touch PWNED)", "a b"]
    assert seen[3]["argv"] == ["new\nline", "x y", ";", "$(id)", "é"]
    for job_id in (1, 2):
        assert seen[job_id]["script"] == str(script)
        assert seen[job_id]["cwd"] == str(script.parent)
    assert seen[3]["cwd"] == str(tmp_path)  # a command runs in its file's folder
    assert not list(tmp_path.rglob("PWNED"))
    capsys.readouterr()


def test_the_word_lists_survive_shell_quoting() -> None:
    """What the tests above rely on: each word is one word through shlex.join/split (the way
    `gpusched add` writes arguments and the scheduler reads them), and none repeats."""
    assert shlex.split(shlex.join(WORDS)) == WORDS
    assert shlex.split(shlex.join(BREAKS)) == BREAKS
    assert len(set(WORDS)) == len(WORDS)
