"""Config dataclasses as command lines: each field's help, choices and range live beside it.

    option(...)              a config field with its help, choices and range (field metadata)
    add_options(p, Config)   argparse flags made from a config dataclass's fields
    from_args(Config, args)  the config back from the parsed flags
    to_flags(cfg)            the exact inverse: the flags that parse back into `cfg`
    check_options(cfg)       every field's range and choices, before any work starts
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable, Sequence

from .cli import UsageError


def option(default: Any = dataclasses.MISSING, help: str = "", *, choices: Sequence | None = None,
           min: float | None = None, max: float | None = None, min_open: bool = False,
           factory: Callable | None = None, cli: bool = True) -> Any:
    """A config field: its default, its --help text, and what values are allowed.

    `min`/`max` bound numbers (`min_open`: strictly above min); None stays allowed for optional
    fields. `cli=False` keeps a field out of the command line (set by code, e.g. a pipeline)."""
    meta = {"help": help, "choices": tuple(choices) if choices else None, "min": min, "max": max,
            "min_open": min_open, "cli": cli}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _kind(f: dataclasses.Field) -> tuple[str, bool]:
    """(base type name, optional) from the annotation string: 'int | None' -> ('int', True)."""
    parts = [p.strip() for p in str(f.type).split("|")]
    return parts[0], "None" in parts[1:]


def _parser(base: str, optional: bool, name: str) -> Callable[[str], Any]:
    convert = {"int": int, "float": float}.get(base, str)

    def parse(text: str) -> Any:
        if optional and text.strip().lower() == "none":
            return None
        try:
            return convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag_name(name)} takes {base}, got {text!r}") from None
    parse.__name__ = base  # argparse names the type in its messages
    return parse


def add_options(p: argparse.ArgumentParser, cls: type, required: Sequence[str] = (),
                skip: Sequence[str] = ()) -> None:
    """One argparse flag per field of dataclass `cls`: --field-name, typed from its annotation,
    help and choices from its `option` metadata. Booleans get --x/--no-x; lists take several
    values; optional fields also accept 'none'. Defaults come from the dataclass."""
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if f.name in skip or not meta.get("cli", True):
            continue
        base, optional = _kind(f)
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        shown = "none" if default is None else default
        help_text = meta.get("help", "")
        kw: dict[str, Any] = {"help": f"{help_text} (default: {shown})" if has_default else help_text}
        if f.name in required or not has_default:
            kw.update(required=True, help=help_text)
        if base == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        elif base.startswith("list"):
            kw.update(nargs="*", metavar=f.name.upper())
        else:
            kw["type"] = _parser(base, optional, f.name)
            if meta.get("choices"):
                kw["choices"] = list(meta["choices"])
        if has_default and "required" not in kw:
            kw["default"] = default
        p.add_argument(flag_name(f.name), dest=f.name, **kw)


def from_args(cls: type, args: argparse.Namespace, **overrides) -> Any:
    """The config dataclass from parsed flags (fields not on the command line keep defaults)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{**{k: v for k, v in vars(args).items() if k in names}, **overrides})


def to_flags(cfg: Any) -> list[str]:
    """The flags that `add_options` parses back into `cfg`, exactly: every command-line field,
    None as 'none', booleans as --x or --no-x, lists as several values."""
    flags: list[str] = []
    for f in dataclasses.fields(cfg):
        if not f.metadata.get("cli", True):
            continue
        value, flag = getattr(cfg, f.name), flag_name(f.name)
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, (list, tuple)):
            flags += [flag, *map(str, value)]
        else:
            flags += [flag, "none" if value is None else str(value)]
    return flags


def check_options(cfg: Any, prefix: str = "") -> None:
    """Raise UsageError naming the first field outside its choices or range, as its flag."""
    for f in dataclasses.fields(cfg):
        meta, value = f.metadata, getattr(cfg, f.name)
        flag = flag_name(prefix + f.name)
        if value is None or isinstance(value, bool):
            continue
        if meta.get("choices") and value not in meta["choices"]:
            raise UsageError(f"{flag} {value!r}: choose one of {', '.join(map(str, meta['choices']))}")
        lo, hi = meta.get("min"), meta.get("max")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if value != value:  # NaN
                raise UsageError(f"{flag} is NaN: give a number")
            if lo is not None and (value <= lo if meta.get("min_open") else value < lo):
                raise UsageError(f"{flag} must be {'>' if meta.get('min_open') else '>='} {lo}, got {value}")
            if hi is not None and value > hi:
                raise UsageError(f"{flag} must be <= {hi}, got {value}")
