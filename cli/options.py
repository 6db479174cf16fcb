"""Click options generated from a config dataclass, so help text lives only in the field docs."""

from __future__ import annotations

import dataclasses
import types
import typing

import click

from mft_pipeline.errors import ConfigError

_TYPES = {int: int, float: float, str: str}


def _base(tp):
    """`int | None` -> (int, optional)."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def options_from(cls, positional: tuple[str, ...] = (), exclude: tuple[str, ...] = ()):
    """Decorator adding one click parameter per field of ``cls``.

    Fields named in ``positional`` become arguments; booleans become ``--flag``s; tuples become
    repeatable options; every other field becomes ``--field-name`` with the field's default and
    help. Fields in ``exclude`` get no parameter.
    """
    hints = typing.get_type_hints(cls)

    def decorate(f):
        for fld in reversed([d for d in dataclasses.fields(cls) if d.name not in exclude]):
            tp, _ = _base(hints[fld.name])
            help_ = fld.metadata.get("help", "")
            if fld.name in positional:
                f = click.argument(fld.name, type=_TYPES[tp])(f)
                continue
            flag = "--" + fld.name.replace("_", "-")
            required = fld.default is dataclasses.MISSING
            if tp is bool:
                f = click.option(flag, fld.name, is_flag=True, default=fld.default, help=help_)(f)
            elif typing.get_origin(tp) is tuple:
                f = click.option(flag, fld.name, type=_TYPES[typing.get_args(tp)[0]], multiple=True, help=help_)(f)
            else:
                default = None if required else fld.default
                f = click.option(flag, fld.name, type=_TYPES[tp], default=default, required=required, show_default=not required and default is not None, help=help_)(f)
        return f

    return decorate


def build(cls, params: dict):
    """Make the config, turning its validation errors into usage errors."""
    names = {f.name for f in dataclasses.fields(cls)}
    try:
        return cls(**{k: v for k, v in params.items() if k in names})
    except ConfigError as e:
        raise click.UsageError(str(e)) from None


def config_file_option(f):
    """Decorator adding ``--config FILE``: option values from a YAML or JSON file; flags given on the command line win.

    The file is read before any other option (the option is eager) into ``ctx.default_map``,
    so its values take the place of the defaults; keys are option names with dashes or
    underscores. An unknown key or a wrong type is a usage error naming the key (exit 2).
    """
    return click.option(
        "--config",
        "config",
        type=click.Path(exists=True, dir_okay=False),
        is_eager=True,
        expose_value=False,
        callback=_load_config_defaults,
        help="YAML or JSON file of option values (keys are option names); flags on the command line override it.",
    )(f)


def _load_config_defaults(ctx: click.Context, param: click.Parameter, value):
    from cli.config_file import load_config_file

    if value is None:
        return
    try:
        loaded = load_config_file(value, ctx.command)
    except ConfigError as e:
        raise click.BadParameter(str(e), ctx=ctx, param=param) from None
    ctx.default_map = {**(ctx.default_map or {}), **loaded}
