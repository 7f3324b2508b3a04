"""How many GPUs a job needs, from `llm_config.json` and the job's `--llm NAME` argument.

File format (shared with an older tool)::

    {"default_requirement": 1.0,
     "models": {"qwen2.5-3b-inst": 0.5, "big": {"gpus": 2, "vram_gb": 40}}}

A model entry is a number (the GPU requirement) or an object with `gpus` and an optional
`vram_gb` (memory per GPU). Errors are split in two levels:

* The file as a whole (unreadable, invalid JSON, top level or `models` not an object, a bad
  `default_requirement`) -> `ConfigError` from `load_llm_config`: nothing in it can be trusted.
* One bad model entry does not disable the others: it is kept in `LlmConfig.invalid` and only
  the jobs asking for that model get a `RequirementError` from `LlmConfig.requirement`.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from app import headers
from app.models import Requirement, RequirementError, loose_words, validate_amount
from app.reprs import short_repr

DEFAULT_REQUIREMENT = 1.0


class ConfigError(ValueError):
    """llm_config.json cannot be used at all; the message names the file and the key."""


def llm_name(args: str) -> str | None:
    """The value of `--llm NAME` or `--llm=NAME` in the arguments; the last one wins."""
    if "--llm" not in args:
        return None
    words = loose_words(args)  # unbalanced quotes: still find the model, as the old tool did
    name: str | None = None
    for i, word in enumerate(words):
        if word == "--llm" and i + 1 < len(words):
            name = words[i + 1]
        elif word.startswith("--llm="):
            name = word.removeprefix("--llm=")
    return name or None


@dataclass(frozen=True)
class LlmConfig:
    default: float = DEFAULT_REQUIREMENT
    #: model -> (GPU amount, declared memory per GPU in MB or None); only valid entries
    models: Mapping[str, tuple[float, int | None]] = field(default_factory=dict)
    #: model -> why its entry is unusable; asking for such a model raises RequirementError
    invalid: Mapping[str, str] = field(default_factory=dict)
    #: the file name used in messages
    source: str = "llm_config.json"

    def requirement(self, args: str) -> Requirement:
        """The requirement of a job with these arguments: its model's, else the default."""
        name = llm_name(args)
        if name is not None and name in self.invalid:
            raise RequirementError(f"model '{name}' in {self.source}: {self.invalid[name]}")
        if name is not None and name in self.models:
            amount, vram_mb = self.models[name]
            return Requirement(amount, vram_mb)
        return Requirement(self.default)


def _number(value: object) -> float | None:
    """A JSON number as a float; None for anything else (bool is not a number here)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        return float(value)
    except OverflowError:  # an integer too large for a float
        return math.inf


def _model_entry(value: object) -> tuple[float, int | None]:
    """Validate one model entry; raises RequirementError with the reason (without the name)."""
    vram_mb: int | None = None
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"gpus", "vram_gb"})
        if unknown:
            raise RequirementError(
                f"unknown key '{unknown[0]}' (an entry has 'gpus' and optionally 'vram_gb')"
            )
        if "gpus" not in value:
            raise RequirementError('missing \'gpus\' (e.g. {"gpus": 2, "vram_gb": 40})')
        amount = _number(value["gpus"])
        if amount is None:
            raise RequirementError(f"'gpus' must be a number, not {short_repr(value['gpus'])}")
        if "vram_gb" in value:
            vram_gb = _number(value["vram_gb"])
            if vram_gb is None or not math.isfinite(vram_gb) or vram_gb <= 0:
                raise RequirementError(
                    f"'vram_gb' must be a positive number, not {short_repr(value['vram_gb'])}"
                )
            if vram_gb > headers.MAX_GB:  # a typo; and its MB could not be stored with a job
                raise RequirementError(f"'vram_gb' {vram_gb:g} is more than 1 PiB")
            vram_mb = int(vram_gb * 1024)
    else:
        number = _number(value)
        if number is None:
            raise RequirementError(
                f"entry must be a number or an object with 'gpus', not {short_repr(value)}"
            )
        amount = number
    validate_amount(amount)
    return amount, vram_mb


def parse_llm_config(data: object, source: str) -> LlmConfig:
    """Build an LlmConfig from decoded JSON; `source` names the file in messages."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a JSON object")
    default = DEFAULT_REQUIREMENT
    if "default_requirement" in data:
        raw = data["default_requirement"]
        number = _number(raw)
        if number is None:
            raise ConfigError(
                f"{source}: 'default_requirement' must be a number, not {short_repr(raw)}"
            )
        try:
            validate_amount(number)
        except RequirementError as exc:
            raise ConfigError(f"{source}: 'default_requirement': {exc}") from None
        default = number
    raw_models = data.get("models", {})
    if not isinstance(raw_models, dict):
        raise ConfigError(f"{source}: 'models' must be an object mapping model names to GPUs")
    models: dict[str, tuple[float, int | None]] = {}
    invalid: dict[str, str] = {}
    for name, value in raw_models.items():
        try:
            models[name] = _model_entry(value)
        except RequirementError as exc:
            invalid[name] = str(exc)
    return LlmConfig(default=default, models=models, invalid=invalid, source=source)


def load_llm_config(path: Path) -> LlmConfig:
    """Read llm_config.json; a missing file means every job needs the default (1 GPU)."""
    try:
        # utf-8-sig: a byte-order mark (editors on Windows write one) is not part of the JSON.
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        return LlmConfig(source=str(path))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: invalid JSON: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid JSON: nested too deeply") from None
    except ValueError:  # an integer of more than 4300 digits
        raise ConfigError(f"{path}: invalid JSON: a number has too many digits") from None
    return parse_llm_config(data, str(path))


_Signature = tuple[int, int, int] | None


class LlmConfigCache:
    """The current config, re-read only when the file changes (cheap to call every tick).

    A change is a different (st_ino, st_mtime_ns, st_size), which catches in-place writes and
    atomic replaces. When the new content is invalid the last good config stays in use and
    `error` holds the message; `generation` counts successful (re)loads so the daemon can
    re-evaluate pending jobs when it moves. Thread-safe.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._config = LlmConfig(source=str(path))
        self._signature: _Signature = None
        self._loaded = False
        self._lock = threading.Lock()
        #: why the file on disk is not in use, None when it is
        self.error: str | None = None
        #: incremented on every successful load, starting at 1 with the first get()
        self.generation = 0

    def _stat(self) -> _Signature:
        try:
            st = self.path.stat()
        except OSError:  # missing (or unreadable: load_llm_config will say why)
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def get(self) -> LlmConfig:
        with self._lock:
            # Stat before reading: a write racing with the read changes the signature again,
            # so the next get() re-reads instead of keeping a half-written view.
            signature = self._stat()
            if self._loaded and signature == self._signature:
                return self._config
            self._signature = signature
            self._loaded = True
            try:
                config = load_llm_config(self.path)
            except ConfigError as exc:
                self.error = str(exc)
                return self._config
            self._config = config
            self.error = None
            self.generation += 1
            return config


def resolve(
    config: LlmConfig, args: str, declared: str = "", directives: bool = True
) -> Requirement:
    """A job's requirement: GPUs (and memory) from its `--llm` model, then what the script's
    header (`declared`) and the line's `--gpusched-*` directives declare, the line winning.
    A commands-file line is the user's shell code: no directives are read from it."""
    base = config.requirement(args)
    words = loose_words(args) if directives else []
    line, _ = headers.split_directives(words)
    own = line.over(headers.decode(declared))
    vram = own.vram_mb if own.vram_mb is not None else base.vram_mb
    return Requirement(base.amount, vram, ram_mb=own.ram_mb, ramp_up_s=own.ramp_up_s)


class RequirementMemo:
    """Requirements by (arguments, declared) for one config, so a scheduler pass over thousands
    of pending jobs does not split every job's arguments again; reset when the config changes."""

    def __init__(self) -> None:
        self._config: LlmConfig | None = None
        self._found: dict[tuple[str, str, bool], Requirement | RequirementError] = {}

    def get(
        self, config: LlmConfig, args: str, declared: str = "", directives: bool = True
    ) -> Requirement:
        if config is not self._config:
            self._config = config
            self._found.clear()
        key = (args, declared, directives)
        if key not in self._found:
            try:
                self._found[key] = resolve(config, args, declared, directives)
            except RequirementError as exc:
                self._found[key] = exc
        found = self._found[key]
        if isinstance(found, RequirementError):
            raise found
        return found
