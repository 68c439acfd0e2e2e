"""Config dataclasses as command lines: each field's help, choices and range live beside it
(`option`). add_options makes the flags, from_args and to_flags turn flags into a config and back,
check_options checks the values. A config can hold another's settings (`settings`): the pipeline's
field `gan` holds the CycleGAN trainer's, and --gan-size sets cfg.gan.size."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import MISSING
from typing import Any, Callable, Sequence

from .cli import UsageError


def option(default: Any = MISSING, help: str = "", *, choices: Sequence | None = None, min: float | None = None,
           max: float | None = None, min_open: bool = False, factory: Callable | None = None) -> Any:
    """A config field: its default, its --help text, and the values allowed (`min_open`: strictly
    above min). None stays allowed for optional fields."""
    meta = {"help": help, "choices": tuple(choices) if choices else None, "min": min, "max": max,
            "min_open": min_open}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def settings(cls: type, name: str, skip: Sequence[str], help: dict[str, str] | None = None, **defaults) -> type:
    """A dataclass of `cls`'s fields but `skip` (those the holder sets itself), with their types,
    help and ranges, and `defaults` (and `help`) in place of cls's. A config holds it as a field,
    option(help=title, factory=<it>), whose flags are --<field>-<name>."""
    fields = []
    for f in dataclasses.fields(cls):
        if f.name not in skip:
            kw = {"default": f.default} if f.default is not MISSING else {"default_factory": f.default_factory}
            kw = {"default": defaults.pop(f.name)} if f.name in defaults else kw
            meta = {**f.metadata, "help": (help or {}).get(f.name, f.metadata["help"])}
            fields.append((f.name, f.type, dataclasses.field(metadata=meta, **kw)))
    if defaults:
        raise TypeError(f"{name}: {cls.__name__} has no field {', '.join(defaults)} (or it is skipped)")
    return dataclasses.make_dataclass(name, fields)


def _held(f: dataclasses.Field) -> type | None:  # the settings class that field `f` holds, if any
    return f.default_factory if dataclasses.is_dataclass(f.default_factory) else None


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


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
                aliases: dict[str, str] | None = None, prefix: str = "") -> None:
    """One flag per field of dataclass `cls`: --field-name, typed from its annotation, with the help
    and choices of its `option`; booleans get --x/--no-x, lists several values, optional fields
    also 'none'. Held settings get a group, --<field>-<name>. `aliases`: other flag -> field name."""
    for f in dataclasses.fields(cls):
        meta, dest = f.metadata, prefix + f.name
        if _held(f):
            add_options(p.add_argument_group(meta["help"]), _held(f), aliases=aliases, prefix=dest + "_")
            continue
        base, *rest = [t.strip() for t in str(f.type).split("|")]  # 'int | None': int, optional
        default = f.default if f.default is not MISSING else (
            f.default_factory() if f.default_factory is not MISSING else MISSING)
        kw: dict[str, Any] = {"help": meta.get("help", "")}
        if f.name in required or default is MISSING:
            kw["required"] = True
        else:
            kw.update(default=default, help=f"{kw['help']} (default: {'none' if default is None else default})")
        if base == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        elif base.startswith("list"):
            kw.update(nargs="*", metavar=f.name.upper())
        else:
            kw["type"] = _parser(base, "None" in rest, dest)
            if meta.get("choices"):
                kw["choices"] = list(meta["choices"])
        names = [dest] + [old for old, new in (aliases or {}).items() if new == dest]
        p.add_argument(*map(flag_name, names), dest=dest, **kw)


def nest(cls: type, flat: dict) -> dict:
    """`cls`'s keyword arguments from flat names, as the flags spell them: {'seeds': 2,
    'gan_size': 32} -> {'seeds': 2, 'gan': <cls's gan settings, size 32>}."""
    kwargs = dict(flat)
    for f in dataclasses.fields(cls):
        if _held(f):
            names, start = {g.name for g in dataclasses.fields(_held(f))}, len(f.name) + 1
            mine = [k for k in kwargs if k.startswith(f.name + "_") and k[start:] in names]
            kwargs[f.name] = _held(f)(**{k[start:]: kwargs.pop(k) for k in mine})
    return kwargs


def flat(cfg: Any, aliases: dict[str, str] | None = None) -> dict:
    """nest's inverse: cfg's values by their flags' names ({'seeds': 2, 'gan_size': 32}), under the
    other spelling in `aliases` where there is one."""
    values = {}
    for f in dataclasses.fields(cfg):
        held = dataclasses.asdict(getattr(cfg, f.name)).items() if _held(f) else None
        values.update({f"{f.name}_{k}": v for k, v in held} if held else {f.name: getattr(cfg, f.name)})
    back = {new: old for old, new in (aliases or {}).items()}
    return {back.get(k, k): v for k, v in values.items()}


def from_args(cls: type, args: argparse.Namespace, **overrides) -> Any:
    """The config dataclass from parsed flags (fields not on the command line keep defaults)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{**{k: v for k, v in vars(args).items() if k in names}, **overrides})


def to_flags(cfg: Any) -> list[str]:
    """The flags that `add_options` parses back into `cfg`, exactly: None as 'none', booleans as
    --x or --no-x, lists as several values."""
    flags: list[str] = []
    for f in dataclasses.fields(cfg):
        value, flag = getattr(cfg, f.name), flag_name(f.name)
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, (list, tuple)):
            flags += [flag, *map(str, value)]
        else:
            flags += [flag, "none" if value is None else str(value)]
    return flags


def check_options(cfg: Any, prefix: str = "") -> None:
    """Raise UsageError naming the first field outside its choices or range, as its flag; held
    settings too, as --<field>-<name>."""
    for f in dataclasses.fields(cfg):
        meta, value, flag = f.metadata, getattr(cfg, f.name), flag_name(prefix + f.name)
        if _held(f):
            check_options(value, prefix + f.name + "_")
            continue
        if value is None or isinstance(value, bool):
            continue
        if meta.get("choices") and value not in meta["choices"]:
            raise UsageError(f"{flag} {value!r}: choose one of {', '.join(map(str, meta['choices']))}")
        lo, hi = meta.get("min"), meta.get("max")
        if isinstance(value, (int, float)):
            if value != value:  # NaN
                raise UsageError(f"{flag} is NaN: give a number")
            if lo is not None and (value <= lo if meta.get("min_open") else value < lo):
                raise UsageError(f"{flag} must be {'>' if meta.get('min_open') else '>='} {lo}, got {value}")
            if hi is not None and value > hi:
                raise UsageError(f"{flag} must be <= {hi}, got {value}")
