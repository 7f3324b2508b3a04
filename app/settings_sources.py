"""The sources of settings, layered: defaults < config file < environment < flags.

Each source is a layer of typed values with where each came from ("env GPUSCHED_GPUS",
"flag --gpus"); `merge` applies them and validates the result (app/settings.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields, replace

from app.settings import CONVERTERS, Settings, SettingsError, convert

Layer = Mapping[str, tuple[object, str]]
"""One source's settings: name -> (typed value, source such as "env GPUSCHED_GPUS")."""

ENV_ALIASES: dict[str, tuple[str, ...]] = {
    "tick_interval": ("GPUSCHED_POLL_INTERVAL",),
    "max_ram": ("MAX_RAM",),
    "max_vram": ("MAX_VRAM",),
    "ramp_up": ("RAMP_UP_TIME",),
}
"""Variables read after `GPUSCHED_<NAME>` (which wins): the earlier tools' names."""


def env_names(name: str) -> tuple[str, ...]:
    """The environment variables for a setting, highest precedence first."""
    return (f"GPUSCHED_{name.upper()}", *ENV_ALIASES.get(name, ()))


def env_layer(env: Mapping[str, str]) -> dict[str, tuple[object, str]]:
    """Settings from the environment; an empty variable counts as unset."""
    layer: dict[str, tuple[object, str]] = {}
    for f in fields(Settings):
        for var in env_names(f.name):
            raw = env.get(var, "")
            if raw.strip():
                layer[f.name] = (convert(f.name, raw, f"env {var}"), f"env {var}")
                break
    return layer


def flag_layer(
    flags: Mapping[str, object], flag_names: Mapping[str, str] | None = None
) -> dict[str, tuple[object, str]]:
    """Settings from flags given on the command line (None = not given)."""
    layer: dict[str, tuple[object, str]] = {}
    for name, raw in flags.items():
        if raw is None:
            continue
        if name not in CONVERTERS:
            raise SettingsError(f"unknown setting {name!r}")
        flag = (flag_names or {}).get(name) or "--" + name.replace("_", "-")
        layer[name] = (convert(name, raw, f"flag {flag}"), f"flag {flag}")
    return layer


def merge(*layers: Layer) -> tuple[Settings, dict[str, str]]:
    """Apply layers, lowest precedence first: the validated settings and each one's source."""
    values: dict[str, object] = {}
    sources = {f.name: "default" for f in fields(Settings)}
    for layer in layers:
        for name, (value, source) in layer.items():
            values[name] = value
            sources[name] = source
    settings = replace(Settings(), **values)  # type: ignore[arg-type]
    try:
        settings.validate()
    except SettingsError as exc:
        if exc.setting is None or sources[exc.setting] == "default":
            raise
        raise SettingsError(f"{sources[exc.setting]}: {exc}", exc.setting) from None
    return settings, sources


def from_sources(env: Mapping[str, str], flags: Mapping[str, object]) -> Settings:
    """Defaults < environment < flags given on the command line (not None); no config file.

    `app.config.load_settings` adds the config file and reports each value's source.
    """
    return merge(env_layer(env), flag_layer(flags))[0]
