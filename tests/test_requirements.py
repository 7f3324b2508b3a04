"""GPU requirements from llm_config.json."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from app.models import Requirement, RequirementError
from app.requirements import (
    ConfigError,
    LlmConfig,
    LlmConfigCache,
    RequirementMemo,
    llm_name,
    load_llm_config,
    parse_llm_config,
)

EXAMPLE = {
    "default_requirement": 1.0,
    "models": {
        "qwen2.5-3b-inst": 0.5,
        "qwen2.5-7b-inst": 1.0,
        "big": {"gpus": 2, "vram_gb": 40},
        "small-mem": {"gpus": 0.25, "vram_gb": 7.5},
    },
}


def write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    ("args", "name"),
    [
        ("--llm qwen2.5-7b-inst --epochs 100", "qwen2.5-7b-inst"),
        ("--epochs 1 --llm=big", "big"),
        ("--llm a --llm=b", "b"),
        ("--llm=a --llm b", "b"),
        ("--llm 'x y'", "x y"),
        ("--llm 'unbalanced x", "'unbalanced"),  # split error: whitespace split
        ("--epochs 1", None),
        ("--llm", None),
        ("--llm=", None),
        ("--llmx a", None),
        ("", None),
    ],
)
def test_llm_name(args: str, name: str | None) -> None:
    assert llm_name(args) == name


def test_requirement_from_example(tmp_path: Path) -> None:
    config = load_llm_config(write(tmp_path / "llm_config.json", EXAMPLE))
    assert config.requirement("--llm qwen2.5-3b-inst") == Requirement(0.5)
    assert config.requirement("--llm=qwen2.5-7b-inst") == Requirement(1.0)
    assert config.requirement("--llm big") == Requirement(2, vram_mb=40 * 1024)
    assert config.requirement("--llm small-mem") == Requirement(0.25, vram_mb=7680)
    assert config.requirement("--llm unknown") == Requirement(1.0)
    assert config.requirement("--epochs 3") == Requirement(1.0)
    assert config.invalid == {}


def test_default_requirement(tmp_path: Path) -> None:
    config = load_llm_config(write(tmp_path / "c.json", {"default_requirement": 0.5}))
    assert config.default == 0.5
    assert config.requirement("--llm anything") == Requirement(0.5)
    assert load_llm_config(write(tmp_path / "c.json", {})).default == 1.0


def test_missing_file_means_defaults(tmp_path: Path) -> None:
    config = load_llm_config(tmp_path / "absent.json")
    assert config.default == 1.0
    assert dict(config.models) == {}
    assert config.requirement("--llm x") == Requirement(1.0)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "top level must be a JSON object"),
        ('{"default_requirement": "one"}', "'default_requirement' must be a number"),
        ('{"default_requirement": true}', "'default_requirement' must be a number"),
        ('{"default_requirement": 1.5}', "'default_requirement': GPU requirement 1.5 must be"),
        ('{"default_requirement": 0}', "'default_requirement': GPU requirement 0 must be"),
        ('{"models": [1]}', "'models' must be an object"),
    ],
)
def test_whole_file_errors(tmp_path: Path, content: str, fragment: str) -> None:
    path = tmp_path / "llm_config.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=fragment) as info:
        load_llm_config(path)
    assert str(path) in str(info.value)


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_llm_config(tmp_path)  # a directory
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(ConfigError, match="cannot read"):
        load_llm_config(tmp_path / "bin.json")


def test_bad_model_fails_only_that_model(tmp_path: Path) -> None:
    path = write(
        tmp_path / "llm_config.json",
        {
            "models": {
                "good": 0.5,
                "frac": 1.5,
                "zero": 0,
                "neg": -1,
                "word": "two",
                "nogpus": {"vram_gb": 10},
                "badvram": {"gpus": 1, "vram_gb": -3},
                "typo": {"gpus": 1, "vram_GB": 3},
                "flag": True,
            }
        },
    )
    config = load_llm_config(path)
    assert config.requirement("--llm good") == Requirement(0.5)
    assert set(config.invalid) == {
        "frac", "zero", "neg", "word", "nogpus", "badvram", "typo", "flag"
    }  # fmt: skip
    with pytest.raises(RequirementError) as info:
        config.requirement("--llm frac")
    message = str(info.value)
    assert message.startswith(f"model 'frac' in {path}: GPU requirement 1.5 must be")
    for name, fragment in [
        ("zero", "must be greater than 0"),
        ("neg", "must be greater than 0"),
        ("word", "must be a number or an object"),
        ("nogpus", "missing 'gpus'"),
        ("badvram", "'vram_gb' must be a positive number"),
        ("typo", "unknown key 'vram_GB'"),
        ("flag", "must be a number or an object"),
    ]:
        with pytest.raises(RequirementError, match=fragment):
            config.requirement(f"--llm {name}")


def test_llm_config_constructed_directly() -> None:
    config = LlmConfig(default=0.5, models={"m": (3.0, None)})
    assert config.requirement("--llm m").gpu_count == 3
    assert config.requirement("").amount == 0.5


def _rewrite(path: Path, text: str) -> None:
    """Write in place, making sure the mtime moves even on a coarse-grained file system."""
    before = path.stat() if path.exists() else None
    path.write_text(text)
    if before is not None:
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, max(st.st_mtime_ns, before.st_mtime_ns) + 1_000_000))


def test_cache_reloads_only_on_change(tmp_path: Path) -> None:
    path = tmp_path / "llm_config.json"
    cache = LlmConfigCache(path)
    assert cache.get().requirement("--llm m") == Requirement(1.0)  # missing: defaults
    assert cache.generation == 1
    assert cache.error is None

    _rewrite(path, json.dumps({"models": {"m": 0.5}}))
    first = cache.get()
    assert first.requirement("--llm m") == Requirement(0.5)
    assert cache.generation == 2
    assert cache.get() is first  # unchanged file: no re-read
    assert cache.generation == 2

    # Invalid content: the last good config stays, with the error exposed.
    _rewrite(path, "{broken")
    assert cache.get() is first
    assert cache.error is not None
    assert "invalid JSON" in cache.error
    assert cache.generation == 2

    # Fixed by an atomic replace: picked up, error cleared.
    tmp = tmp_path / "new.json"
    write(tmp, {"models": {"m": 2}})
    tmp.replace(path)
    assert cache.get().requirement("--llm m") == Requirement(2)
    assert cache.error is None
    assert cache.generation == 3

    # Deleted: back to the defaults.
    path.unlink()
    assert cache.get().requirement("--llm m") == Requirement(1.0)
    assert cache.generation == 4


def test_requirement_memo_follows_the_config_and_keeps_errors() -> None:
    memo = RequirementMemo()
    half = parse_llm_config({"default_requirement": 1.0, "models": {"m": 0.5}}, "a.json")
    assert memo.get(half, "--llm m").amount == 0.5
    bad = parse_llm_config({"default_requirement": 1.0, "models": {"m": 1.5}}, "b.json")
    for _ in range(2):  # the error is remembered and raised again, not swallowed
        with pytest.raises(RequirementError, match=r"1\.5"):
            memo.get(bad, "--llm m")
    assert memo.get(half, "--llm m").amount == 0.5  # a new config object: resolved afresh
