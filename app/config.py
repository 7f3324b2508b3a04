"""Config files and the effective settings: defaults < config file < environment < flags.

A config file is TOML or YAML, chosen by its extension, with one top-level key per setting:
the setting's name, or its flag's name (`min_free_mem_mb` or `min-free-mem-mb`). Relative
paths in it are relative to the file's directory. `gpusched config` prints the result.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from app import trust
from app.reprs import short_repr
from app.settings import CONVERTERS, Settings, SettingsError, convert
from app.settings_sources import env_layer, flag_layer, merge

CONFIG_FILES = ("gpusched.toml", "gpusched.yaml", "gpusched.yml")
"""Looked for in the working directory when no --config is given."""
KEY_ALIASES = {"poll_interval": "tick_interval"}
"""Config keys and flags that name a setting differently (the earlier dispatcher's names)."""


class ConfigError(SettingsError):
    """A config file that cannot be used: the message names the file (and line) and the key."""


@dataclass(frozen=True)
class Effective:
    """The settings in force and where each came from."""

    settings: Settings
    sources: Mapping[str, str]
    """Setting name -> "default", "file PATH", "env NAME" or "flag --name"."""
    config_file: Path | None
    """The config file read, if any."""


def load_settings(
    env: Mapping[str, str],
    flags: Mapping[str, object],
    *,
    config_file: Path | None = None,
    cwd: Path | None = None,
    flag_names: Mapping[str, str] | None = None,
) -> Effective:
    """Defaults < config file < environment < flags (None = not given).

    The config file is `config_file` (an error if missing), else the first of CONFIG_FILES
    found in `cwd` (default: the working directory); one that others can change is refused
    (trust.UntrustedPathError) unless the environment or a flag turns strict_modes off.
    `flag_names` says which flag gave a setting (`{"runner": "--screen"}`), for the sources;
    the default is `--` + the name.
    """
    directory = cwd or Path.cwd()
    path = directory / config_file if config_file is not None else find_config(directory)
    env_values, flag_values = env_layer(env), flag_layer(flags, flag_names)
    # The file cannot vouch for itself: only the environment or a flag turns its check off.
    strict, _ = {**env_values, **flag_values}.get("strict_modes", (True, "default"))
    if path is not None and strict:
        problem = trust.check(path, "config file")
        if problem is not None:
            raise trust.UntrustedPathError(f"refusing to read {problem}", "strict_modes")
    file_layer = read_config(path) if path is not None else {}
    settings, sources = merge(file_layer, env_values, flag_values)
    return Effective(settings, sources, path)


def find_config(directory: Path) -> Path | None:
    """The default config file in `directory`, or None; two of them is an error."""
    found = [directory / name for name in CONFIG_FILES if (directory / name).is_file()]
    if len(found) > 1:
        names = " and ".join(p.name for p in found)
        raise ConfigError(f"found {names} in {directory}: keep one, or choose with --config FILE")
    return found[0].absolute() if found else None


def setting_for_key(key: str) -> str | None:
    """A config key as written (`min-free-mem-mb`, `poll_interval`) -> setting name, or None."""
    name = key.strip().lower().replace("-", "_")
    name = KEY_ALIASES.get(name, name)
    return name if name in CONVERTERS else None


def read_config(path: Path) -> dict[str, tuple[object, str]]:
    """A config file -> setting name -> (typed value, "file PATH"); ConfigError if unusable."""
    path = path.expanduser().absolute()
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml"):
        raise ConfigError(f"config file {path}: unknown format; name it *.toml, *.yaml or *.yml")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    data, lines = _parse_toml(text, path) if suffix == ".toml" else _parse_yaml(text, path)
    layer: dict[str, tuple[object, str]] = {}
    spelled: dict[str, str] = {}
    for key, raw in data.items():
        where = f"{path}:{lines[key]}" if key in lines else str(path)
        name = setting_for_key(key)
        if name is None:
            raise ConfigError(f"{where}: unknown key {short_repr(key)}{_suggestion(key)}")
        if name in spelled:
            raise ConfigError(
                f"{where}: {key!r} sets {name} again (already set as {spelled[name]!r})"
            )
        spelled[name] = key
        value = convert(name, raw, where, key)
        if isinstance(value, Path) and not value.is_absolute():
            value = path.parent / value
        layer[name] = (value, f"file {path}")
    return layer


def _suggestion(key: str) -> str:
    known = [*CONVERTERS, *KEY_ALIASES]
    close = difflib.get_close_matches(key.lower().replace("-", "_"), known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"; {hint}the keys are listed in docs/configuration.md"


def _parse_toml(text: str, path: Path) -> tuple[dict[str, object], dict[str, int]]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:  # its message ends "(at line N, column M)"
        if str(exc).endswith("(at end of document)"):  # ... or this: say which line that is
            last = len(text.splitlines()) or 1
            raise ConfigError(f"{path}:{last}: invalid TOML: {exc}") from None
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid TOML: arrays or tables nested too deeply") from None
    except ValueError:  # int() of more than 4300 digits
        raise ConfigError(f"{path}: invalid TOML: a number has too many digits") from None
    return data, _toml_key_lines(text)


_TOML_KEY = re.compile(r"""^\s*(\[+\s*)?(["']?)([A-Za-z0-9_-]+)\2\s*(=|\])""")


def _toml_key_lines(text: str) -> dict[str, int]:
    """Top-level key -> line, for messages (tomllib keeps no positions); tables by header."""
    lines: dict[str, int] = {}
    in_table = False
    for number, line in enumerate(text.splitlines(), start=1):
        match = _TOML_KEY.match(line)
        if match is None:
            continue
        is_header = match.group(1) is not None
        if is_header or not in_table:
            lines.setdefault(match.group(3), number)
        in_table = in_table or is_header
    return lines


def _parse_yaml(text: str, path: Path) -> tuple[dict[str, object], dict[str, int]]:
    try:  # the reader checks every character already when the loader is made
        loader = yaml.SafeLoader(text)
    except yaml.reader.ReaderError as exc:  # a control character such as NUL
        line = text.count("\n", 0, exc.position) + 1
        char = exc.character
        what = f"character #x{char:04x}" if isinstance(char, int) else "a character"
        raise ConfigError(f"{path}:{line}: invalid YAML: {what} is not allowed") from None
    loader.name = str(path)  # marks in messages name the file, not "<unicode string>"
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else {}
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: invalid YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid YAML: nested too deeply") from None
    except ValueError:  # int() of more than 4300 digits
        raise ConfigError(f"{path}: invalid YAML: a number has too many digits") from None
    finally:
        loader.dispose()
    if not isinstance(data, dict) or not isinstance(node, yaml.MappingNode | None):
        raise ConfigError(f"{path}: expected `key: value` lines at the top level")
    lines: dict[str, int] = {}
    for key_node, _ in node.value if node is not None else []:
        key = str(key_node.value)
        if key in lines:
            raise ConfigError(f"{path}:{key_node.start_mark.line + 1}: key {key!r} given twice")
        lines[key] = key_node.start_mark.line + 1
    return {str(k): v for k, v in data.items()}, lines


# ---- showing the effective configuration (`gpusched config`) -------------------------------


def render_value(value: object) -> str:
    """A value as you would write it in a flag: paths as given, ids as `0,1,2`."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def json_value(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def effective_rows(effective: Effective) -> list[tuple[str, str, str]]:
    """(setting, value, source) for every setting, in the model's order."""
    return [
        (f.name, render_value(getattr(effective.settings, f.name)), effective.sources[f.name])
        for f in fields(Settings)
    ]


def format_effective(effective: Effective) -> str:
    path = effective.config_file
    header = f"config file: {path}" if path else "config file: none"
    rows = effective_rows(effective)
    width = max(len(name) for name, _, _ in rows)
    value_width = min(40, max(len(value) for _, value, _ in rows))
    lines = [f"{name:<{width}}  {value:<{value_width}}  {source}" for name, value, source in rows]
    return "\n".join([header, *lines])


def effective_json(effective: Effective) -> dict[str, object]:
    path = effective.config_file
    return {
        "config_file": str(path) if path else None,
        "settings": {
            f.name: {
                "value": json_value(getattr(effective.settings, f.name)),
                "source": effective.sources[f.name],
            }
            for f in fields(Settings)
        },
    }
