"""Property-based fuzzing of the files a user writes by hand: `llm_config.json`, script headers
(and the `--gpusched-*` directives of a job line), the config file (TOML and YAML) and the
jobs-file line parser.

The property, for any input (random bytes, random text, plausible documents with wrong types,
huge or non-finite numbers, BOMs, NUL bytes, deep nesting, long lines, duplicate keys): the
loader returns a valid object, or raises its module's own error whose message names the file
(and, for a syntax error in a format with lines, the line) and a reason. Never another exception.

Default run: DEFAULT_EXAMPLES examples per test (a few seconds in all). The soak run repeats
every property with SOAK_EXAMPLES examples (docs/reliability.md)::

    python -m pytest -m soak tests/test_fuzz_inputs.py
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from app import config as config_file
from app import control, headers, requirements
from app.jobsfile import parse_line
from app.models import (
    JobSpec,
    JobState,
    LineError,
    Requirement,
    RequirementError,
    validate_amount,
)
from app.settings import CONVERTERS, MAX_INTERVAL_S, SettingsError, check_field
from app.status import build_status, format_status
from tests.helpers import wait_until
from tests.workspace import job_status, make_workspace, serving

F = TypeVar("F", bound=Callable[..., None])
DEFAULT_EXAMPLES = 150
#: GPUSCHED_SOAK_EXAMPLES=N changes it (e.g. a shorter soak in CI).
SOAK_EXAMPLES = int(os.environ.get("GPUSCHED_SOAK_EXAMPLES", "20000"))

FUZZ = settings(
    max_examples=DEFAULT_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SOAK = settings(FUZZ, max_examples=SOAK_EXAMPLES)


def soak_run(test: F) -> F:
    """A soak test: on demand only (`-m soak`), and longer than the suite's 120 s timeout."""
    marked: F = pytest.mark.soak(pytest.mark.timeout(4 * 3600)(test))
    return marked


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    """One private directory for the whole module (hypothesis reruns a test body many times)."""
    with tempfile.TemporaryDirectory(prefix="gpusched_fuzz_") as d:
        yield Path(d)


# ---- strategies ------------------------------------------------------------------------------

#: Pieces that break loaders: quoting, nesting, numbers beyond every limit, BOM, NUL, YAML
#: aliases and tags, TOML tables, very long lines.
FRAGMENTS = [
    "{", "}", "[", "]", '"', "'", ",", ":", "=", " ", "\n", "\r\n", "\t", "#", "\\", "\x00",
    "\ufeff", "\x7f", "\u2028", "é", "🙂", "NaN", "Infinity", "-Infinity", "nan", "inf", "-inf",
    ".nan", ".inf", "1e999", "-1", "0", "1.5", "2", "0.5", "true", "null", "~", "9" * 5000,
    "9" * 400, "[" * 3000, "{" * 3000, "x" * 20_000, "&a ", "*a", "<<: ", "!!binary ",
    "!!python/object:os.system ", "!!set ", "? ", "- ", "---\n", "...\n", "[[t]]\n", "[t]\n",
    '"""', "'''", '"models"', '"default_requirement"', '"gpus"', '"vram_gb"', '"requirements"',
    '"ram"', '"vram"', '"ramp_up_time"', "gpu_ids", "max_ram", "tick_interval", "jobs_file",
    "min-free-mem-mb", "poll_interval", "runner", "mode", "gpu_backend", "# ", "#!/bin/bash\n",
]  # fmt: skip

fragments_text = st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=4), max_size=24).map(
    "".join
)

#: Numbers a loader must survive: huge, tiny, negative, non-finite, beyond a float.
NUMBERS = [0, -1, 1, 2, 3, 0.5, 1.5, -0.0, 1e-300, 1e300, 2**63, 2**64, 10**400, -(10**400)]
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from(NUMBERS)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["0-3", "0,1", "all", "none", "on", "off", "tmux", "fake", "a\x00b", " "])
)
values = st.recursive(
    scalars,
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4)
    ),
    max_leaves=10,
)


def _encodings(text: str, how: str) -> bytes:
    if how == "utf-16":
        return text.encode("utf-16")  # a BOM and NUL bytes: not UTF-8
    if how == "latin-1":
        return text.encode("latin-1", errors="replace")
    if how == "bom":
        return b"\xef\xbb\xbf" + text.encode("utf-8", errors="surrogatepass")
    return text.encode("utf-8", errors="surrogatepass")


@st.composite
def mangled(draw: st.DrawFn, documents: st.SearchStrategy[str]) -> bytes:
    """A document, maybe damaged: cut, spliced with a fragment, doubled, nested, re-encoded."""
    text = draw(documents)
    how = draw(st.sampled_from(["as is", "cut", "splice", "double", "nest", "as is"]))
    if how == "cut" and text:
        text = text[: draw(st.integers(0, len(text) - 1))]
    elif how == "splice":
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.sampled_from(FRAGMENTS) | fragments_text) + text[at:]
    elif how == "double":  # every key given twice
        text = text + "\n" + text
    elif how == "nest":
        # Deep nesting is slow to reject (PyYAML: ~2 s at the recursion limit): one in five.
        depth = draw(st.sampled_from([10, 50, 200, 300, 5000]))
        text = "[" * depth + text + "]" * depth
    encoding = draw(st.sampled_from(["utf-8", "utf-8", "utf-8", "bom", "utf-16", "latin-1"]))
    return _encodings(text, encoding)


def inputs(documents: st.SearchStrategy[str]) -> st.SearchStrategy[bytes]:
    """Random bytes, random text, fragment soup, or a plausible document (maybe damaged)."""
    return (
        st.binary(max_size=300)
        | st.text(max_size=200).map(lambda t: t.encode("utf-8", errors="surrogatepass"))
        | fragments_text.map(lambda t: t.encode("utf-8", errors="surrogatepass"))
        | mangled(documents)
    )


def _json(value: object) -> str:
    try:
        return json.dumps(value, allow_nan=True, ensure_ascii=False)
    except ValueError:  # an int beyond 4300 digits cannot even be written
        return "0"


# ---- helpers ---------------------------------------------------------------------------------


def assert_names(message: str, path: Path) -> None:
    """The message names the file and says something after it."""
    assert str(path) in message, message
    rest = message.split(str(path), 1)[1]
    assert re.search(r"\w", rest), message


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# ---- llm_config.json -------------------------------------------------------------------------

model_names = st.text(max_size=10) | st.sampled_from(["half", "big", "", " ", "a b", "--llm"])
model_entries = values | st.fixed_dictionaries(
    {"gpus": values}, optional={"vram_gb": values, "extra": values}
)
llm_documents = st.fixed_dictionaries(
    {},
    optional={
        "default_requirement": values,
        "models": st.dictionaries(model_names, model_entries, max_size=5) | values,
        "other": values,
    },
).map(_json) | values.map(_json)

GOOD_LLM = b'{"default_requirement": 1, "models": {"half": 0.5}}'


def check_llm_config(path: Path, data: bytes) -> None:
    write(path, data)
    try:
        config = requirements.load_llm_config(path)
    except requirements.ConfigError as exc:
        assert_names(str(exc), path)
        config = None
    if config is not None:
        validate_amount(config.default)
        for amount, vram_mb in config.models.values():
            Requirement(amount, vram_mb)
            assert vram_mb is None or 0 <= vram_mb < 2**63
        for name in [*config.models, *config.invalid, "unknown-model"]:
            try:
                requirement = config.requirement(f"--llm {shlex.quote(name)} --x 1")
            except RequirementError as exc:
                assert name in config.invalid
                assert_names(str(exc), path)
            else:
                assert isinstance(requirement, Requirement)
    # The running scheduler's view: a bad file keeps the last good configuration in use.
    cached = path.with_name("cached_" + path.name)
    cache = requirements.LlmConfigCache(write(cached, GOOD_LLM))
    good = cache.get()
    write(cached, data)
    st_ = cached.stat()
    os.utime(cached, ns=(st_.st_atime_ns, st_.st_mtime_ns + 10**9))  # a change, however fast
    now = cache.get()
    if config is None:
        assert now is good and cache.error is not None
        assert_names(cache.error, cached)
    else:
        assert cache.error is None and now == requirements.LlmConfig(
            config.default, config.models, config.invalid, str(cached)
        )


LLM_EXAMPLES = [
    b'{"default_requirement": ' + b"9" * 5000 + b"}",  # int() beyond 4300 digits: ValueError
    b'{"models": {"a": ' + b"[" * 990 + b"]" * 990 + b"}}",  # deep, within json's limit
    b"[" * 100_000,  # RecursionError
    b'\xef\xbb\xbf{"models": {"half": 0.5}}',  # a BOM is not an error
    b'{"models": {"a": {"gpus": 1, "vram_gb": 1e-300}}}',
    b'{"models": {"a": ' + b"9" * 400 + b"}}",  # beyond a float
    b'{"default_requirement": NaN}',
    b'{"models": {"a": 1, "a": "x"}}',  # duplicate keys: the last wins, as in json
]


@FUZZ
@given(data=inputs(llm_documents))
def test_llm_config_loader(workdir: Path, data: bytes) -> None:
    check_llm_config(workdir / "llm_config.json", data)


for _data in LLM_EXAMPLES:
    test_llm_config_loader = example(data=_data)(test_llm_config_loader)


@soak_run
@SOAK
@given(data=inputs(llm_documents))
def test_llm_config_loader_soak(workdir: Path, data: bytes) -> None:
    check_llm_config(workdir / "llm_config.json", data)


# ---- script headers and --gpusched-* directives ----------------------------------------------

header_keys = st.sampled_from(["ram", "vram", "ramp_up_time", "gpu", ""]) | st.text(max_size=6)
header_documents = st.builds(
    lambda shebang, hashes, body, rest: f"{shebang}{hashes}{body}\n{rest}",
    st.sampled_from(["#!/bin/bash\n", "#!/usr/bin/env python3\n", "", "\n", "# x\n"]),
    st.sampled_from(["# ", "#", "## ", "  #  "]),
    st.one_of(
        st.dictionaries(header_keys, values, max_size=4).map(lambda r: _json({"requirements": r})),
        values.map(lambda r: _json({"requirements": r})),
        values.map(_json),
    ),
    st.text(max_size=30),
)


def check_declared(declared: str, script: Path) -> None:
    """What read_header stored: "", an error naming file:line, or values a job can carry."""
    if not declared:
        return
    data = json.loads(declared)
    if "error" in data:
        assert re.match(re.escape(str(script)) + r":[12]: \S", data["error"]), data
        with pytest.raises(RequirementError):
            headers.decode(declared)
        return
    found = headers.decode(declared)
    Requirement(1.0, found.vram_mb, ram_mb=found.ram_mb, ramp_up_s=found.ramp_up_s)
    for mb in (found.vram_mb, found.ram_mb):
        assert mb is None or (isinstance(mb, int) and 0 <= mb < 2**63)


def check_header(script: Path, data: bytes) -> None:
    write(script, data)
    check_declared(headers.read_header(script), script)


HEADER_EXAMPLES = [
    b'#!/bin/bash\n# {"requirements": {"ram": ' + b"9" * 5000 + b"}}\n",  # ValueError
    b'#!/bin/bash\n# {"requirements": {"ramp_up_time": ' + b"9" * 400 + b"}}\n",  # Overflow
    b'# {"requirements": ' + b"[" * 50_000 + b"\n",  # RecursionError
    b'# {"requirements": {"vram": NaN, "ram": Infinity}}\n',
    b'\xef\xbb\xbf# {"requirements": {"vram": 4}}\n',
    b'#!/bin/sh\n# {"requirements": {"vram": 1e-300}}\n',
    b"#!/bin/sh\n# {\x00}\n",
]


@FUZZ
@given(data=inputs(header_documents))
def test_script_header(workdir: Path, data: bytes) -> None:
    check_header(workdir / "job.sh", data)


for _data in HEADER_EXAMPLES:
    test_script_header = example(data=_data)(test_script_header)


@soak_run
@SOAK
@given(data=inputs(header_documents))
def test_script_header_soak(workdir: Path, data: bytes) -> None:
    check_header(workdir / "job.sh", data)


directive_words = st.lists(
    st.sampled_from(
        [*headers.DIRECTIVES, "--gpusched-vram=", "--gpusched-ram=1e999", "--llm", "half"]
    )
    | st.sampled_from(["1", "-1", "0", "nan", "inf", "1e999", "9" * 5000, "0x10", "1_0", "٣", ""])
    | st.text(max_size=6),
    max_size=8,
)


def check_directives(words: list[str], workdir: Path) -> None:
    try:
        declared, rest = headers.split_directives(words)
    except RequirementError as exc:
        assert str(exc)
    else:
        assert all(w not in headers.DIRECTIVES for w in rest)
        Requirement(1.0, declared.vram_mb, ram_mb=declared.ram_mb, ramp_up_s=declared.ramp_up_s)
    config = requirements.LlmConfig(models={"half": (0.5, None)})
    try:
        requirement = requirements.resolve(config, shlex.join(words))
    except RequirementError as exc:
        assert str(exc)
    else:
        assert isinstance(requirement, Requirement)


@FUZZ
@given(words=directive_words)
@example(words=["--gpusched-ram", "9" * 5000])
@example(words=["--gpusched-ramp-up", "1e308"])
def test_directives(workdir: Path, words: list[str]) -> None:
    check_directives(words, workdir)


@soak_run
@SOAK
@given(words=directive_words)
def test_directives_soak(workdir: Path, words: list[str]) -> None:
    check_directives(words, workdir)


# ---- the config file (gpusched.toml / gpusched.yaml) -----------------------------------------

config_keys = st.sampled_from(
    [*CONVERTERS, "poll_interval", "min-free-mem-mb", "Jobs-File", "bogus", "", "1"]
)
config_values = values | st.sampled_from(
    ["jobs.txt", "~/x", "/", "..", "a\x00b", "0-1000000000", "share", "direct", "0.5"]
)
config_tables = st.dictionaries(config_keys, config_values, max_size=6)


def _toml_value(value: Any) -> str:
    """A TOML spelling of a value (TOML has no null: "" instead); may be invalid, on purpose."""
    if value is None:
        return '""'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return (
            "nan"
            if math.isnan(value)
            else ("inf" if value > 0 else "-inf")
            if math.isinf(value)
            else repr(value)
        )
    if isinstance(value, int | str):
        return _json(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_json(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return _json(str(value))


def _toml(table: dict[str, Any]) -> str:
    return "".join(f"{_json(k)} = {_toml_value(v)}\n" for k, v in table.items())


def _yaml(table: object) -> str:
    try:
        return yaml.safe_dump(table, allow_unicode=True)
    except (yaml.YAMLError, ValueError):
        return _json(table)


toml_documents = config_tables.map(_toml) | values.map(lambda v: f"jobs_file = {_toml_value(v)}")
yaml_documents = config_tables.map(_yaml) | config_tables.map(_json) | values.map(_yaml)


def check_config(path: Path, data: bytes) -> None:
    write(path, data)
    try:
        layer = config_file.read_config(path)
    except SettingsError as exc:  # config.ConfigError, or a bad value's SettingsError
        assert_names(str(exc), path)
        message = str(exc)
        if re.search("invalid (TOML|YAML)", message):  # a syntax error: which line
            has_line = f"{path}:" in message or "(at line" in message
            assert has_line or re.search("too many digits|nested too deeply", message), message
        return
    for name, (value, source) in layer.items():
        assert check_field(name, value) is None, (name, value)
        assert source == f"file {path}"
    try:
        effective = config_file.load_settings({}, {}, config_file=path, cwd=path.parent)
    except SettingsError as exc:  # a combination of values that does not go together
        assert_names(str(exc), path)
        return
    effective.settings.validate()
    for name in ("monitor_interval", "state_interval", "tick_interval", "probe_timeout"):
        assert 0 < getattr(effective.settings, name) <= MAX_INTERVAL_S  # Event.wait() takes it


TOML_EXAMPLES = [
    b"gpus = " + b"9" * 5000,  # ValueError from int()
    b"gpus = " + b"[" * 100_000,  # RecursionError
    b'commands_file = "a\\u0000b"',  # NUL in a path: ValueError from Path.resolve
    b"tick_interval = inf",  # Event.wait() raises OverflowError in the running scheduler
    b"probe_timeout = 1e300",
    b'gpu_backend = "fake"',  # "needs --fake-gpus": said with the file's name
    b"\xef\xbb\xbfgpus = 1",
]


def _alias_bomb(levels: int) -> bytes:
    """`gpu_ids` with 9**levels strings through aliases: a few hundred bytes of YAML."""
    anchors = ['&a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    anchors += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return ("gpu_ids: [" + ", ".join(anchors) + "]\n").encode()


YAML_EXAMPLES = [
    _alias_bomb(10),  # its repr in the error message: billions of strings (hangs, then OOM)
    b"gpus: " + b"9" * 5000,
    b"gpus: " + b"[" * 100_000,
    b"gpus: \x001",  # the reader refuses NUL before any parsing
    b'commands_file: "a\\0b"',
    b"tick_interval: .inf",
    b"a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
    b"gpu_ids: [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n",
    b"gpu_ids: &r [*r]\n",
    b"? [a, b]\n: 1\n",
    b"jobs_file: !!binary aGVsbG8=\n",
    b"gpus: 1\n---\ngpus: 2\n",
]


@FUZZ
@given(data=inputs(toml_documents))
def test_config_file_toml(workdir: Path, data: bytes) -> None:
    check_config(workdir / "gpusched.toml", data)


@FUZZ
@given(data=inputs(yaml_documents))
def test_config_file_yaml(workdir: Path, data: bytes) -> None:
    check_config(workdir / "gpusched.yaml", data)


for _data in TOML_EXAMPLES:
    test_config_file_toml = example(data=_data)(test_config_file_toml)
for _data in YAML_EXAMPLES:
    test_config_file_yaml = example(data=_data)(test_config_file_yaml)


@soak_run
@SOAK
@given(data=inputs(toml_documents))
def test_config_file_toml_soak(workdir: Path, data: bytes) -> None:
    check_config(workdir / "gpusched.toml", data)


@soak_run
@SOAK
@given(data=inputs(yaml_documents))
def test_config_file_yaml_soak(workdir: Path, data: bytes) -> None:
    check_config(workdir / "gpusched.yaml", data)


# ---- the jobs-file line parser (also fuzzed in test_jobsfile.py) ---------------------------

jobs_lines = (
    st.text()
    | fragments_text
    | st.builds(
        lambda p, rest: f"{p},{{script}},{rest}",
        st.sampled_from(["0", "-1", "9" * 5000, "x", " 1 ", ""]),
        fragments_text,
    )
)


def check_jobs_line(workdir: Path, text: str) -> None:
    (workdir / "t.py").touch()
    line = text.replace("{script}", str(workdir / "t.py"))
    result = parse_line(line, file="jobs.txt", line=3, base_dir=workdir, gpu_count=8)
    assert result is None or isinstance(result, JobSpec | LineError)
    if isinstance(result, LineError):
        assert str(result).startswith("jobs.txt:3: ") and result.reason


@FUZZ
@given(text=jobs_lines)
def test_jobs_line(workdir: Path, text: str) -> None:
    check_jobs_line(workdir, text)


@soak_run
@SOAK
@given(text=jobs_lines)
def test_jobs_line_soak(workdir: Path, text: str) -> None:
    check_jobs_line(workdir, text)


# ---- the running scheduler: a bad llm_config.json is reported and the last good one kept -----


def test_running_scheduler_keeps_the_last_good_llm_config(tmp_path: Path, tmux_socket: str) -> None:
    ws = make_workspace(tmp_path / "ws", tmux_socket, gpus=1)
    llm = ws.root / "llm_config.json"
    with serving(ws) as store:
        ws.append(ws.job_line("--llm half --sleep 60 --name a"))
        wait_until(lambda: job_status(store, 1) == JobState.RUNNING)
        for bad in (
            b"{",
            b"\xff\xfe{}",
            b'{"models": ' + b"[" * 100_000,
            b'{"default_requirement": ' + b"9" * 5000 + b"}",
            b'{"default_requirement": NaN}',
            b'{"models": []}',
        ):
            before = store.meta("config_error")
            llm.write_bytes(bad)
            error = wait_until(lambda: (e := store.meta("config_error")) != before and e)  # noqa: B023
            assert_names(str(error), llm)
        assert any(
            level == "error" and "keeping the last good configuration" in message
            for _, level, message in store.events(50)
        ), store.events(50)
        status = build_status(store, ws.paths)
        assert status["scheduler"]["config_error"] == store.meta("config_error")
        assert "llm config not in use" in format_status(status)
        # Still the last good configuration: `half` is half a GPU, so b fits next to a.
        ws.append(ws.job_line("--llm half --sleep 60 --name b"))
        wait_until(lambda: job_status(store, 2) == JobState.RUNNING)
        assert store.job(2).share == 0.5  # type: ignore[union-attr]
        # Fixed (and changed): the error clears, and the new value is used.
        llm.write_text(json.dumps({"models": {"half": 1.0}}))
        wait_until(lambda: store.meta("config_error") == "")
        assert any("read again: in use" in message for _, _, message in store.events(50))
        ws.append(ws.job_line("--llm half --name c"))
        wait_until(lambda: "GPU" in getattr(store.job(3), "reason", ""))  # waits for a whole GPU
        for job_id in (1, 2):
            control.kill_job(store, ws.paths, job_id)
        wait_until(lambda: job_status(store, 3) == JobState.COMPLETED, timeout=20)
        assert store.job(3).share == 1.0  # type: ignore[union-attr]
