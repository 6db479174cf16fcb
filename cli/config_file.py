"""Config files for `mft cache-teacher`, `mft train` and `mft sweep`, and the resolved run config.

A config file (YAML or JSON) maps option names to values: ``eval-every: 25`` or
``eval_every: 25``. The `--config` option loads it into click's ``default_map``, so every value
in the file takes the place of the option's default and a flag given on the command line still
wins. Values are checked against each option's type here, with an error naming the key, because
click would otherwise convert them silently (``int(2.5)`` is 2).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from pathlib import Path

import click
import yaml

from mft_pipeline.errors import ConfigError
from mft_pipeline.run_folder import write_settings

CONFIG_PARAM = "config"


def load_config_file(path: str | Path, command: click.Command) -> dict:
    """The values of a config file for ``command``, keyed by parameter name.

    Args:
        path: a .json file, or YAML (any other suffix; YAML also reads JSON).
        command: the click command whose options the keys name.

    Returns:
        ``{param_name: value}`` with values of the option's type (int, float, str, bool, or
        None where the option's default is None), ready to serve as click's ``default_map``.

    Raises:
        ConfigError: unreadable file, not a mapping, an unknown or repeated key, or a value of
            the wrong type; the message names the file and the key.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file ({e.strerror})") from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'}: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must map option names to values, got a {type(data).__name__}")

    params = {p.name: p for p in command.params if p.name != CONFIG_PARAM and p.name is not None}
    out: dict = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in params:
            near = difflib.get_close_matches(name, params, n=1)
            hint = f"; did you mean {near[0].replace('_', '-')!r}?" if near else ""
            raise ConfigError(f"{path}: unknown key {key!r} for `mft {command.name}`{hint}")
        if name in out:
            raise ConfigError(f"{path}: key {key!r} given twice (dashes and underscores name the same option)")
        out[name] = _checked(path, key, value, params[name])
    return out


def _checked(path: Path, key, value, param: click.Parameter):
    """``value`` as the type of ``param``, or ConfigError naming ``key``."""
    if value is None:
        if param.default is None and not param.required:
            return None
        raise ConfigError(f"{path}: {key!r} cannot be empty (null)")
    want = param.type
    if getattr(param, "is_flag", False) or isinstance(want, click.types.BoolParamType):
        if isinstance(value, bool):
            return value
        expected = "true or false"
    elif isinstance(want, click.types.IntParamType):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        expected = "an integer"
    elif isinstance(want, click.types.FloatParamType):
        # YAML 1.1 reads 1e-5 (no dot) as a string; take any string that is a number.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        expected = "a number"
    elif isinstance(want, click.types.StringParamType):
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # `taus: 0.25` or `peft-targets: 0` read as numbers
        expected = "a string (lists are comma-separated strings, as on the command line)"
    else:
        # Any other click type (a choice, a path) converts and checks the value itself.
        try:
            return want.convert(value, param, None)
        except click.BadParameter as e:
            raise ConfigError(f"{path}: {key!r}: {e.message}") from None
    raise ConfigError(f"{path}: {key!r} must be {expected}, got {value!r}")


def dump_run_config(config, path: str | Path) -> Path:
    """Write a config dataclass (e.g. ``CacheConfig``) as YAML that ``--config`` reads back.

    Keys are the field names in field order; ``--config PATH`` rebuilds an equal config. The
    run folder's own ``run-config.yaml`` is written the same way.
    """
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    return write_settings(values, Path(path), header=f"Resolved {type(config).__name__}")
