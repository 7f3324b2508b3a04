"""Settings from real config files (TOML, YAML), the environment and flags; `gpusched config`."""

from __future__ import annotations

import json
import os
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from app.cli import main
from app.config import load_settings, read_config
from app.settings import Settings, SettingsError
from app.settings_sources import env_names, from_sources

DOCS = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"

# The earlier GPU dispatcher's config.yaml (shared/seeds/001), verbatim.
DISPATCHER_YAML = """\
gpu_ids: [0, 1, 2]          # Which GPUs to use
min_free_mem_mb: 10000      # Minimum free memory required
poll_interval: 30           # Check interval in seconds
commands_file: jobs.txt     # Job commands source
log_dir: ./job_logs         # Log storage location
jobs_file: ./queue.jsonl    # Job tracking file
"""


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No setting leaks in from the developer's shell, and no gpusched.toml from the checkout."""
    for var in list(os.environ):
        if var.startswith("GPUSCHED_") or var in ("MAX_RAM", "MAX_VRAM", "RAMP_UP_TIME"):
            monkeypatch.delenv(var)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def config_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    code, out, err = run(capsys, "config", "--json", *argv)
    assert code == 0, err
    settings: dict[str, Any] = json.loads(out)["settings"]
    return settings


def error_of(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code, _, err = run(capsys, *argv)
    assert code == 1
    return err


# ---- files ---------------------------------------------------------------------------------


def test_toml_file_sets_every_kind_of_value(tmp_path: Path) -> None:
    path = write(
        tmp_path / "conf" / "sched.toml",
        """\
gpu_ids = [0, 1, 2]
min_free_mem_mb = 10000
poll_interval = 30
commands_file = "commands.txt"
log_dir = "./job_logs"
jobs_file = "/abs/jobs.txt"
runner = "screen"
mode = "exclusive"
max_ram = 0.7
max_vram = true
backfill = false
max-workers = 3
""",
    )
    effective = load_settings({}, {}, config_file=path)
    s = effective.settings
    assert s.gpu_ids == (0, 1, 2)
    assert s.min_free_mem_mb == 10000
    assert s.tick_interval == 30.0
    assert s.commands_file == tmp_path / "conf" / "commands.txt"
    assert s.log_dir == tmp_path / "conf" / "job_logs"
    assert s.jobs_file == Path("/abs/jobs.txt")
    assert (s.runner, s.mode, s.max_workers, s.backfill) == ("screen", "exclusive", 3, False)
    assert (s.max_ram, s.max_vram) == (0.7, 0.5)
    assert effective.config_file == path
    assert effective.sources["max_workers"] == f"file {path}"
    assert effective.sources["load_threshold"] == "default"


@pytest.mark.parametrize("name", ["config.yaml", "config.yml"])
def test_yaml_file_from_the_earlier_dispatcher(tmp_path: Path, name: str) -> None:
    path = write(tmp_path / "conf" / name, DISPATCHER_YAML)
    s = load_settings({}, {}, config_file=path).settings
    assert s.gpu_ids == (0, 1, 2)
    assert s.min_free_mem_mb == 10000
    assert s.tick_interval == 30.0
    assert s.commands_file == tmp_path / "conf" / "jobs.txt"
    assert s.log_dir == tmp_path / "conf" / "job_logs"
    assert s.jobs_file == tmp_path / "conf" / "queue.jsonl"


def test_empty_yaml_and_toml_files_are_all_defaults(tmp_path: Path) -> None:
    for name in ("a.yaml", "a.toml"):
        s = load_settings({}, {}, config_file=write(tmp_path / name, "# nothing yet\n")).settings
        assert s == Settings()


def test_relative_paths_resolve_against_the_files_directory(tmp_path: Path) -> None:
    write(
        tmp_path / "project" / "gpusched.toml",
        'spool_dir = "spool"\nstate_dir = "../state"\nllm_config = "/etc/llm.json"\n'
        'fake_gpus = "~/gpus.json"\n',
    )
    os.chdir(tmp_path / "work")
    s = load_settings({}, {}, config_file=Path("../project/gpusched.toml")).settings
    assert s.spool_dir == tmp_path / "work" / ".." / "project" / "spool"
    assert s.spool_dir.resolve() == tmp_path / "project" / "spool"
    assert s.state_dir is not None and s.state_dir.resolve() == tmp_path / "state"
    assert s.llm_config == Path("/etc/llm.json")
    assert s.fake_gpus == Path.home() / "gpus.json"
    # Paths from the environment and flags stay relative to the working directory.
    env = {"GPUSCHED_SPOOL_DIR": "env_spool"}
    assert load_settings(env, {}).settings.spool_dir == Path("env_spool")


def test_default_gpusched_toml_is_read_from_the_working_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert config_json(capsys)["mode"] == {"value": "share", "source": "default"}
    path = write(tmp_path / "work" / "gpusched.toml", 'mode = "memory"\n')
    assert config_json(capsys)["mode"] == {"value": "memory", "source": f"file {path}"}
    path.unlink()
    path = write(tmp_path / "work" / "gpusched.yaml", "mode: detected\n")
    assert config_json(capsys)["mode"] == {"value": "detected", "source": f"file {path}"}
    write(tmp_path / "work" / "gpusched.toml", 'mode = "memory"\n')
    err = error_of(capsys, "config")
    assert "gpusched.toml and gpusched.yaml" in err and "--config" in err
    # --config chooses when both exist.
    assert config_json(capsys, "--config", "gpusched.yaml")["mode"]["value"] == "detected"


def test_config_file_that_does_not_exist(capsys: pytest.CaptureFixture[str]) -> None:
    err = error_of(capsys, "config", "--config", "missing.toml")
    assert "missing.toml not found" in err
    err = error_of(capsys, "start", "--config", "missing.yaml")
    assert "missing.yaml not found" in err


def test_config_file_of_unknown_format(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path / "work" / "gpusched.json", "{}")
    err = error_of(capsys, "config", "--config", "gpusched.json")
    assert "gpusched.json" in err and ".toml, *.yaml or *.yml" in err


# ---- errors in files -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("c.toml", 'mode = "share"\nmin_fre_mem_mb = 5\n', ":2: unknown key 'min_fre_mem_mb'"),
        ("c.yaml", "mode: share\n\nmde: share\n", ":3: unknown key 'mde'"),
        ("c.toml", '[scheduler]\nmode = "share"\n', ":1: unknown key 'scheduler'"),
    ],
)
def test_unknown_key_names_the_key_the_file_and_the_line(
    tmp_path: Path, name: str, text: str, expected: str
) -> None:
    path = write(tmp_path / name, text)
    with pytest.raises(SettingsError) as exc:
        read_config(path)
    assert f"{path}{expected}" in str(exc.value)


def test_unknown_key_suggests_the_close_one(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="did you mean 'min_free_mem_mb'"):
        read_config(write(tmp_path / "c.yaml", "min-free-mem: 100\n"))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('mode = "bogus"', "mode must be share, exclusive, memory or detected, got 'bogus'"),
        ("max_ram = 1.5", "max_ram must be in (0, 1], got 1.5"),
        ("max-workers = 0", "max-workers must be 1 or more, got 0"),
        ('min_free_mem_mb = "lots"', "bad value 'lots' for min_free_mem_mb: expected a whole"),
        ("gpu_ids = []", "bad value [] for gpu_ids: no GPU ids given"),
        ("backfill = 3", "bad value 3 for backfill: expected true or false"),
        ('runner = "tmux"\npoll_interval = -1', ":2: poll_interval must be positive, got -1.0"),
    ],
)
def test_bad_value_in_a_file_names_the_key_and_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, expected: str
) -> None:
    path = write(tmp_path / "work" / "gpusched.toml", text + "\n")
    err = error_of(capsys, "config")
    assert str(path) in err and expected in err


def test_same_setting_twice_in_a_file(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", "poll_interval = 5\ntick_interval = 6\n")
    with pytest.raises(SettingsError, match=r"c\.toml:2: 'tick_interval' sets tick_interval again"):
        read_config(path)
    path = write(tmp_path / "c.yaml", "ramp_up: 5\nramp_up: 6\n")
    with pytest.raises(SettingsError, match=r"c\.yaml:2: key 'ramp_up' given twice"):
        read_config(path)


def test_bad_toml_syntax_shows_the_line(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", 'mode = "share"\nramp_up = \n')
    with pytest.raises(SettingsError) as exc:
        read_config(path)
    assert str(path) in str(exc.value) and "invalid TOML" in str(exc.value)
    assert "line 2" in str(exc.value)


def test_bad_yaml_syntax_shows_the_line(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "mode: share\ngpu_ids: [0, 1\n")
    with pytest.raises(SettingsError, match=rf"{path}:3: invalid YAML"):
        read_config(path)
    path = write(tmp_path / "d.yaml", "- mode\n- share\n")
    with pytest.raises(SettingsError, match="key: value"):
        read_config(path)


# ---- precedence and the environment --------------------------------------------------------


def test_precedence_defaults_file_environment_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(
        tmp_path / "work" / "gpusched.toml",
        'mem_threshold = 0.5\nramp_up = 10\nrunner = "screen"\ngpu_ids = "0,1"\nmax_workers = 2\n',
    )
    monkeypatch.setenv("GPUSCHED_MEM_THRESHOLD", "0.6")
    monkeypatch.setenv("GPUSCHED_RAMP_UP", "20")
    monkeypatch.setenv("GPUSCHED_GPU_IDS", "1-3")
    got = config_json(capsys, "--ramp-up", "40", "--gpu-ids", "2")
    file = f"file {path}"
    assert got["load_threshold"] == {"value": 0.8, "source": "default"}
    assert got["runner"] == {"value": "screen", "source": file}
    assert got["max_workers"] == {"value": 2, "source": file}
    assert got["mem_threshold"] == {"value": 0.6, "source": "env GPUSCHED_MEM_THRESHOLD"}
    assert got["ramp_up"] == {"value": 40.0, "source": "flag --ramp-up"}
    assert got["gpu_ids"] == {"value": [2], "source": "flag --gpu-ids"}
    monkeypatch.delenv("GPUSCHED_GPU_IDS")
    assert config_json(capsys)["gpu_ids"] == {"value": [0, 1], "source": file}


def test_earlier_tools_environment_names(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"MAX_RAM": "0.7", "MAX_VRAM": "0.8", "RAMP_UP_TIME": "45"}
    effective = load_settings(env, {})
    assert (effective.settings.max_ram, effective.settings.max_vram) == (0.7, 0.8)
    assert effective.settings.ramp_up == 45.0
    assert effective.sources["ramp_up"] == "env RAMP_UP_TIME"
    # GPUSCHED_ names win over the bare ones; an empty variable counts as unset.
    env |= {"GPUSCHED_MAX_RAM": "0.25", "GPUSCHED_RAMP_UP": "", "GPUSCHED_MAX_VRAM": "off"}
    effective = load_settings(env, {})
    assert (effective.settings.max_ram, effective.settings.max_vram) == (0.25, None)
    assert effective.sources["max_ram"] == "env GPUSCHED_MAX_RAM"
    assert effective.sources["max_vram"] == "env GPUSCHED_MAX_VRAM"
    assert effective.settings.ramp_up == 45.0
    with pytest.raises(SettingsError, match=r"env MAX_RAM: max_ram must be in \(0, 1\], got 1.5"):
        load_settings({"MAX_RAM": "1.5"}, {})


def test_every_setting_has_an_environment_variable() -> None:
    for f in fields(Settings):
        assert env_names(f.name)[0] == f"GPUSCHED_{f.name.upper()}"
    env = {"GPUSCHED_RUNNER": "direct", "GPUSCHED_GPU_IDS": "3", "GPUSCHED_LOG_DIR": "logs"}
    env |= {"GPUSCHED_POLL_INTERVAL": "2", "GPUSCHED_MIN_FREE_MEM_MB": "512"}
    s = from_sources(env, {})  # the older entry point: environment < flags, no file
    assert (s.runner, s.gpu_ids, s.log_dir) == ("direct", (3,), Path("logs"))
    assert (s.tick_interval, s.min_free_mem_mb) == (2.0, 512)
    # The setting's own name wins over the alias.
    assert from_sources({**env, "GPUSCHED_TICK_INTERVAL": "3"}, {}).tick_interval == 3.0


@pytest.mark.parametrize(
    ("argv", "env", "file", "expected"),
    [
        ([], {}, "", None),
        (["--max-ram"], {}, "", 0.5),
        (["--max-ram", "0.7"], {}, "", 0.7),
        ([], {"MAX_RAM": "on"}, "", 0.5),
        ([], {"MAX_RAM": "0.9"}, "", 0.9),
        ([], {}, "max_ram = true", 0.5),
        ([], {}, "max_ram = 0.3", 0.3),
        ([], {"MAX_RAM": "off"}, "max_ram = 0.3", None),
        (["--max-ram", "off"], {"MAX_RAM": "0.9"}, "", None),
    ],
)
def test_max_ram_is_off_until_enabled_then_half_unless_given(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
    env: dict[str, str],
    file: str,
    expected: float | None,
) -> None:
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    if file:
        write(tmp_path / "work" / "gpusched.toml", file + "\n")
    assert config_json(capsys, *argv)["max_ram"]["value"] == expected


def test_max_vram_flag_without_a_value_before_another_flag(
    capsys: pytest.CaptureFixture[str],
) -> None:
    got = config_json(capsys, "--max-vram", "--max-workers", "2")
    assert got["max_vram"] == {"value": 0.5, "source": "flag --max-vram"}
    assert got["max_workers"]["value"] == 2


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("0,1,2", (0, 1, 2)),
        ("2, 0,0", (0, 2)),
        ("0-3", (0, 1, 2, 3)),
        ([1, 0], (0, 1)),
        (3, (3,)),
        ("all", None),
    ],
)
def test_gpu_ids_forms(raw: object, expected: tuple[int, ...] | None, tmp_path: Path) -> None:
    assert from_sources({}, {"gpu_ids": raw}).gpu_ids == expected
    path = write(tmp_path / "c.yaml", f"gpu_ids: {json.dumps(raw)}\n")
    assert load_settings({}, {}, config_file=path).settings.gpu_ids == expected


@pytest.mark.parametrize("raw", ["a,b", "-1", "1-0", ""])
def test_bad_gpu_ids(capsys: pytest.CaptureFixture[str], raw: str) -> None:
    err = error_of(capsys, "config", "--gpu-ids", raw)
    assert f"flag --gpu-ids: bad value {raw!r} for gpu_ids" in err


# ---- flags and `gpusched config` -----------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "runner", "source"),
    [
        ([], "tmux", "default"),
        (["--screen"], "screen", "flag --screen"),
        (["--direct"], "direct", "flag --direct"),
        (["--runner", "screen"], "screen", "flag --runner"),
        (["--screen", "--runner", "direct"], "direct", "flag --runner"),
    ],
)
def test_runner_flags(
    capsys: pytest.CaptureFixture[str], argv: list[str], runner: str, source: str
) -> None:
    assert config_json(capsys, *argv)["runner"] == {"value": runner, "source": source}


def test_config_prints_one_line_per_setting_with_its_source(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path / "work" / "gpusched.yaml", "min-free-mem-mb: 8000\nlog_dir: logs\n")
    monkeypatch.setenv("MAX_VRAM", "0.7")
    code, out, _ = run(capsys, "config", "--poll-interval", "2", "--no-backfill", "--gpu-ids", "1")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"config file: {path}"
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == {f.name for f in fields(Settings)}
    assert rows["min_free_mem_mb"] == ["min_free_mem_mb", "8000", "file", str(path)]
    assert rows["log_dir"] == ["log_dir", str(tmp_path / "work" / "logs"), "file", str(path)]
    assert rows["max_vram"] == ["max_vram", "0.7", "env", "MAX_VRAM"]
    assert rows["tick_interval"] == ["tick_interval", "2", "flag", "--poll-interval"]
    assert rows["backfill"] == ["backfill", "false", "flag", "--no-backfill"]
    assert rows["gpu_ids"] == ["gpu_ids", "1", "flag", "--gpu-ids"]
    assert rows["mode"] == ["mode", "share", "default"]
    assert rows["max_workers"] == ["max_workers", "none", "default"]


def test_config_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "config", "--json", "--state-dir", "st", "--max-workers", "4")
    assert code == 0
    data = json.loads(out)
    assert data["config_file"] is None
    assert set(data["settings"]) == {f.name for f in fields(Settings)}
    assert data["settings"]["state_dir"] == {"value": "st", "source": "flag --state-dir"}
    assert data["settings"]["max_workers"] == {"value": 4, "source": "flag --max-workers"}
    assert data["settings"]["jobs_file"] == {"value": "jobs.txt", "source": "default"}


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--max-ram", "1.5"], "flag --max-ram: max_ram must be in (0, 1], got 1.5"),
        (["--max-workers", "0"], "flag --max-workers: max_workers must be 1 or more, got 0"),
        (["--min-free-mem-mb", "-5"], "min_free_mem_mb must be 0 or more, got -5"),
        (["--poll-interval", "0"], "flag --poll-interval: tick_interval must be positive"),
        (["--gpu-backend", "fake"], "--gpu-backend fake needs --fake-gpus FILE"),
        (["--max-workers", "x"], "flag --max-workers: bad value 'x' for max_workers: expected"),
    ],
)
def test_bad_flag_values(
    capsys: pytest.CaptureFixture[str], argv: list[str], expected: str
) -> None:
    assert expected in error_of(capsys, "config", *argv)


def test_bad_choices_are_refused_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--mode", "bogus"], ["--runner", "bogus"]):
        with pytest.raises(SystemExit) as exc:
            main(["config", *argv])
        assert exc.value.code == 2
        assert "invalid choice: 'bogus'" in capsys.readouterr().err


def test_environment_errors_name_the_variable(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GPUSCHED_MODE", "bogus")
    err = error_of(capsys, "config")
    assert "env GPUSCHED_MODE: mode must be share, exclusive, memory or detected" in err


def test_direct_settings_are_validated() -> None:
    for bad in (
        {"runner": "ssh"},
        {"mode": "bogus"},
        {"max_ram": 1.5},
        {"max_vram": 0.0},
        {"max_workers": 0},
        {"min_free_mem_mb": -1},
        {"gpu_ids": ()},
        {"gpu_ids": (-1,)},
    ):
        with pytest.raises(SettingsError, match=next(iter(bad))):
            Settings(**bad).validate()  # type: ignore[arg-type]


def test_start_reads_the_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Refused before anything starts: proves `start` sees the file (and says which)."""
    path = write(tmp_path / "work" / "gpusched.toml", 'gpu_backend = "fake"\nmax_ram = 2\n')
    err = error_of(capsys, "start", "--state-dir", str(tmp_path / "s"))
    assert f"{path}:2: max_ram must be in (0, 1], got 2" in err


def test_other_commands_find_the_state_dir_from_the_config_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(tmp_path / "work" / "gpusched.toml", 'state_dir = "my_state"\n')
    code, out, _ = run(capsys, "status", "--json")
    assert code == 0
    assert json.loads(out)["scheduler"]["state_dir"] == str(tmp_path / "work" / "my_state")


def test_docs_describe_every_setting() -> None:
    text = DOCS.read_text()
    for f in fields(Settings):
        assert f"`{f.name}`" in text, f.name
        assert f"GPUSCHED_{f.name.upper()}" in text, f.name


def test_none_clears_a_file_value(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path / "work" / "gpusched.yaml", "max_workers: 3\ngpu_ids: [1]\nmax_vram: 0.6\n")
    got = config_json(capsys, "--max-workers", "none", "--gpu-ids", "all", "--max-vram", "off")
    assert got["max_workers"] == {"value": None, "source": "flag --max-workers"}
    assert got["gpu_ids"] == {"value": None, "source": "flag --gpu-ids"}
    assert got["max_vram"] == {"value": None, "source": "flag --max-vram"}
    write(tmp_path / "work" / "gpusched.yaml", "max_workers: null\n")
    assert config_json(capsys)["max_workers"]["value"] is None
