"""The jobs file format: parsing, formatting, and concurrent appends."""

from __future__ import annotations

import multiprocessing
import shlex
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.jobsfile import (
    _split,
    append_line,
    conda_env_problem,
    format_gpu_list,
    format_line,
    parse_gpu_list,
    parse_line,
)
from app.models import JobSpec, LineError, shell_problem, shell_words


@pytest.fixture
def scripts(tmp_path: Path) -> Path:
    d = tmp_path / "path" / "to"
    d.mkdir(parents=True)
    for name in ("train.py", "eval.py", "inference.py", "t.py"):
        (d / name).write_text("print('hi')\n")
    return d


def parse(text: str, base: Path, gpu_count: int | None = 8) -> JobSpec | LineError | None:
    return parse_line(text, file="jobs.txt", line=3, base_dir=base, gpu_count=gpu_count)


def ok(text: str, base: Path, gpu_count: int | None = 8) -> JobSpec:
    spec = parse(text, base, gpu_count)
    assert isinstance(spec, JobSpec), spec
    return spec


def err(text: str, base: Path, gpu_count: int | None = 8) -> str:
    result = parse(text, base, gpu_count)
    assert isinstance(result, LineError), result
    assert result.file == "jobs.txt"
    assert result.line == 3
    return result.reason


# --- the three documented examples, exactly as written ------------------------------------


def test_readme_examples(scripts: Path) -> None:
    d = scripts
    a = ok(f"0,{d}/train.py,pytorch_env,--llm qwen2.5-7b-inst --epochs 100,0-3", d)
    assert a == JobSpec(
        0, f"{d}/train.py", "pytorch_env", "--llm qwen2.5-7b-inst --epochs 100", (0, 1, 2, 3),
        source="jobs.txt:3",
    )  # fmt: skip
    b = ok(f"1,{d}/eval.py,pytorch_env,--llm qwen2.5-3b-inst --dataset test,", d)
    assert (b.priority, b.args, b.allowed_gpus) == (1, "--llm qwen2.5-3b-inst --dataset test", None)
    c = ok(f"2,{d}/inference.py,,--llm qwen2.5-32b-inst --batch_size 1,4,5,6,7", d)
    assert c.conda_env == ""
    assert c.args == "--llm qwen2.5-32b-inst --batch_size 1"
    assert c.allowed_gpus == (4, 5, 6, 7)


def test_blank_and_comment_lines(scripts: Path) -> None:
    for text in ("", "   ", "\n", "\r\n", "# a comment", "   # indented, 0,/x,e,a,1", "\t#"):
        assert parse(text, scripts) is None


def test_quoted_arguments_with_commas(scripts: Path) -> None:
    spec = ok('0,/x/t.py,env,"--tags a,b --name ""x y""",0-1'.replace("/x", str(scripts)), scripts)
    assert spec.args == '--tags a,b --name "x y"'
    assert shlex.split(spec.args) == ["--tags", "a,b", "--name", "x y"]
    assert spec.allowed_gpus == (0, 1)


def test_quote_inside_unquoted_field_is_literal(scripts: Path) -> None:
    spec = ok(f'0,{scripts}/t.py,env,--name "a b" --x 1,2', scripts)
    assert spec.args == '--name "a b" --x 1'
    assert shlex.split(spec.args) == ["--name", "a b", "--x", "1"]


def test_four_fields_means_any_gpu(scripts: Path) -> None:
    assert ok(f"5,{scripts}/t.py,env,--a 1", scripts).allowed_gpus is None


def test_whitespace_around_fields_is_stripped(scripts: Path) -> None:
    spec = ok(f"  -2 , {scripts}/t.py ,  env ,  --a  1  , 0 - 1 , 3 ", scripts)
    assert spec.priority == -2
    assert spec.script == f"{scripts}/t.py"
    assert spec.conda_env == "env"
    assert spec.args == "--a  1"  # inner whitespace kept
    assert spec.allowed_gpus == (0, 1, 3)


def test_quoted_field_keeps_its_whitespace(scripts: Path) -> None:
    assert ok(f'0,{scripts}/t.py,env," --a 1 ",', scripts).args == " --a 1 "


def test_crlf_and_bom(scripts: Path) -> None:
    assert ok(f"\ufeff0,{scripts}/t.py,env,--a,1\r\n", scripts).allowed_gpus == (1,)


def test_script_paths(scripts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # relative to base_dir, normalised, stored absolute
    assert ok("0,path/to/../to/t.py,e,,", tmp_path).script == str(scripts / "t.py")
    # "~" is the home directory
    monkeypatch.setenv("HOME", str(tmp_path))
    assert ok("0,~/path/to/t.py,e,,", Path("/")).script == str(scripts / "t.py")
    # symlinks are kept as written
    link = tmp_path / "link.py"
    link.symlink_to(scripts / "t.py")
    assert ok(f"0,{link},e,,", tmp_path).script == str(link)


def test_errors(scripts: Path) -> None:
    s = f"{scripts}/t.py"
    assert err(f"x,{s},e,a,0", scripts).startswith("priority 'x' is not an integer")
    assert err(f"1.5,{s},e,a,0", scripts).startswith("priority '1.5' is not an integer")
    assert err(f"0,{s},e", scripts) == (
        "expected 5 comma-separated fields "
        "(priority,script_path,conda_env,arguments,allowed_gpus), got 3"
    )
    assert err("0", scripts).endswith("got 1")
    assert err("0, ,e,a,0", scripts).startswith("empty script path")
    assert err("0,/abs/x.py,e,a,0", scripts) == "script /abs/x.py not found"
    assert err(f"0,{scripts},e,a,0", scripts) == f"script {scripts} is not a file"
    assert err(f"0,{s},e,a,3-1", scripts) == "bad GPU range '3-1' in allowed_gpus"
    assert err(f"0,{s},e,a,a", scripts) == "bad GPU id 'a' in allowed_gpus"
    assert err(f"0,{s},e,a,-1", scripts) == "bad GPU id '-1' in allowed_gpus"
    assert err(f"0,{s},e,a,1,9", scripts) == (
        "unknown GPU 9 in allowed_gpus (this machine has GPUs 0-7)"
    )
    assert err(f"0,{s},e,--x 'a b,", scripts) == (
        "arguments: unbalanced quotes (No closing quotation)"
    )
    assert err(f"0,{s},e,--x \\,", scripts).startswith("arguments: trailing backslash")


def test_gpu_count_none_skips_the_machine_check(scripts: Path) -> None:
    assert ok(f"0,{scripts}/t.py,e,a,9", scripts, gpu_count=None).allowed_gpus == (9,)
    assert "has no GPUs" in err(f"0,{scripts}/t.py,e,a,0", scripts, gpu_count=0)


def test_source(scripts: Path) -> None:
    spec = parse_line(
        f"0,{scripts}/t.py,e,a,", file="f.txt", line=12, base_dir=scripts, gpu_count=1
    )
    assert isinstance(spec, JobSpec)
    assert spec.source == "f.txt:12"


# --- GPU lists ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", None),
        ("  ", None),
        ("0-3", (0, 1, 2, 3)),
        ("4,5,6,7", (4, 5, 6, 7)),
        ("0-1,6", (0, 1, 6)),
        (" 6 , 0 - 1 ,1", (0, 1, 6)),
        ("3,3,2-3", (2, 3)),
        ("0,1,", (0, 1)),
    ],
)
def test_parse_gpu_list(text: str, expected: tuple[int, ...] | None) -> None:
    assert parse_gpu_list(text) == expected


@pytest.mark.parametrize("text", ["a", "-1", "1-", "-", "1-2-3", "3-1", "1.5", "+1", "99999", "٣"])
def test_parse_gpu_list_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="in allowed_gpus"):
        parse_gpu_list(text)


def test_format_gpu_list() -> None:
    assert format_gpu_list(None) == ""
    assert format_gpu_list((0, 1, 2, 3, 6)) == "0-3,6"
    assert format_gpu_list((5,)) == "5"
    assert format_gpu_list((1, 3, 4)) == "1,3-4"


@given(st.sets(st.integers(0, 64), min_size=1))
def test_gpu_list_round_trip(gpus: set[int]) -> None:
    as_tuple = tuple(sorted(gpus))
    assert parse_gpu_list(format_gpu_list(as_tuple)) == as_tuple


# --- properties -----------------------------------------------------------------------------


@settings(max_examples=500, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text())
def test_parse_line_never_raises(scripts: Path, text: str) -> None:
    result = parse(text, scripts)
    assert result is None or isinstance(result, JobSpec | LineError)


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.sampled_from(["a", ",", '"', "'", ";", "$(", ")", " ", "x y", "\\", "#", "é"]),
        max_size=8,
    )
)
def test_parse_line_never_raises_on_csv_like_text(scripts: Path, parts: list[str]) -> None:
    result = parse(f"0,{scripts}/t.py," + "".join(parts), scripts)
    assert result is None or isinstance(result, JobSpec | LineError)


# The fast paths (plain commas, blank-separated words) must give what csv and shlex give.
line_text = st.text(st.sampled_from(list(" \t,ab\"'\\\r\n\0é#-")), max_size=24)


@settings(max_examples=1000)
@given(line_text)
def test_split_fast_path_matches_csv(text: str) -> None:
    import csv

    if '"' not in text and not any(c in text for c in "\r\n\0"):
        expected = next(csv.reader([text], strict=False), [])
        assert _split(text) == [field.strip() for field in expected]


@settings(max_examples=1000)
@given(line_text)
def test_shell_words_match_shlex(text: str) -> None:
    try:
        expected: list[str] | None = shlex.split(text)
    except ValueError:
        expected = None
    if expected is None:
        with pytest.raises(ValueError):
            shell_words(text)
        assert shell_problem(text) is not None
    else:
        assert shell_words(text) == expected
        assert shell_problem(text) is None


CONDA_CHARS = string.ascii_letters + string.digits + "_.+-/~@,="

shell_word = st.text(
    st.one_of(
        st.sampled_from(list(",\"'; $()`\\|&*#=-")),
        st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")),
    ),
    max_size=12,
).map(lambda s: s.replace("$", "$(") if "$" in s else s)


@settings(max_examples=400, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    priority=st.integers(-(10**6), 10**6),
    words=st.lists(shell_word, max_size=6),
    # Every environment name or prefix path that conda_env_problem accepts (tested below).
    conda_env=st.text(st.sampled_from(CONDA_CHARS), max_size=10).filter(
        lambda env: conda_env_problem(env) is None
    ),
    allowed=st.none() | st.sets(st.integers(0, 15), min_size=1).map(lambda s: tuple(sorted(s))),
)
def test_format_line_round_trip(
    scripts: Path,
    priority: int,
    words: list[str],
    conda_env: str,
    allowed: tuple[int, ...] | None,
) -> None:
    spec = JobSpec(priority, str(scripts / "t.py"), conda_env, shlex.join(words), allowed)
    line = format_line(spec)
    assert "\n" not in line
    parsed = parse_line(line, file="j", line=1, base_dir=Path("/"), gpu_count=None)
    assert parsed == JobSpec(
        spec.priority, spec.script, spec.conda_env, spec.args, spec.allowed_gpus, source="j:1"
    ), line


def test_format_line_examples(scripts: Path) -> None:
    s = str(scripts / "t.py")
    assert format_line(JobSpec(0, s, "env", "--a 1", (0, 1, 2, 3, 6))) == f"0,{s},env,--a 1,0-3,6"
    assert format_line(JobSpec(1, s, "", "--t a,b", None)) == f'1,{s},,"--t a,b",'
    assert format_line(JobSpec(1, s, "", '"x" y', None)) == f'1,{s},,"""x"" y",'
    assert format_line(JobSpec(1, s, "", ' --a "b"', None)) == f'1,{s},," --a ""b""",'
    with pytest.raises(ValueError, match="line break"):
        format_line(JobSpec(1, s, "", "a\nb", None))


# --- append_line ----------------------------------------------------------------------------


def test_append_line_creates_and_repairs_missing_newline(tmp_path: Path) -> None:
    path = tmp_path / "jobs.txt"
    append_line(path, "first")
    assert path.read_text() == "first\n"
    with path.open("a") as f:
        f.write("no newline")
    append_line(path, "second")
    assert path.read_text() == "first\nno newline\nsecond\n"
    with pytest.raises(ValueError, match="line break"):
        append_line(path, "a\nb")


def _append_many(path: str, worker: int, count: int) -> None:
    for i in range(count):
        # Long lines make interleaving likely if the writes were not atomic.
        append_line(Path(path), f"{worker}:{i}:" + chr(ord("a") + worker) * 3000)


def test_concurrent_appends_are_never_interleaved(tmp_path: Path) -> None:
    path = tmp_path / "jobs.txt"
    path.write_text("# header without newline")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(str(path), w, 50)) for w in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    lines = path.read_text().split("\n")
    assert lines[0] == "# header without newline"
    assert lines[-1] == ""
    body = lines[1:-1]
    assert len(body) == 8 * 50
    seen = set()
    for line in body:
        worker, i, payload = line.split(":")
        assert payload == chr(ord("a") + int(worker)) * 3000
        seen.add((int(worker), int(i)))
    assert seen == {(w, i) for w in range(8) for i in range(50)}
    assert path.stat().st_size == sum(len(line) + 1 for line in lines[:-1])
