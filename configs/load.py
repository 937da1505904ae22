"""YAML -> typed dataclass config, with `--set section.key=value` overrides.

Strict on purpose: an unknown key or a value of the wrong type is an error that names the dotted key,
because a typo'd key that is silently ignored costs a whole training run.

Floats follow YAML 1.2 (`1e-3`, `3e4`, `.5`, `-2E-5`, `1_000.5`), not PyYAML's YAML 1.1 rule, which
reads `1e-3` as a string (it wants `1.0e-3`) and would also refuse the `1e-05` that `json.dumps` writes.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import re
import textwrap
import typing
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A config problem; the message names the dotted key."""


class _Loader(yaml.SafeLoader):
    """SafeLoader whose implicit float rule is YAML 1.2's: a dot or an exponent makes a number a float
    (a bare `3` stays an int). SafeConstructor's float constructor already drops `_` and reads `.inf`."""


_FLOAT = re.compile(r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?  # 1.  1.5  1.5e-3
                     |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?             # .5  .5e3
                     |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+                     # 1e-3  3e4  -2E-5
                     |[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""", re.X)
_Loader.yaml_implicit_resolvers = {  # SafeLoader's table without its YAML 1.1 float rule, then ours
    ch: [(tag, rx) for tag, rx in rules if tag != "tag:yaml.org,2002:float"]
    for ch, rules in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+.0123456789"))


def parse_yaml(text: str, where: str):
    """YAML text -> Python values with YAML 1.2 floats; a syntax error is a one-line ConfigError."""
    try:
        return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.YAMLError as e:
        mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None) or str(e)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{where}: invalid YAML{at}: {' '.join(problem.split())}") from None


def _check_scalar(key: str, value, typ):
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {typ!r}")


def _convert(key: str, value, typ):
    """Check `value` against the annotation `typ` (scalars, list[...], nested dataclasses)."""
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {typ.__name__} fields, got {value!r}")
        return _build(typ, value, prefix=key + ".")
    if typing.get_origin(typ) is list:
        (elem,) = typing.get_args(typ)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_convert(f"{key}[{i}]", v, elem) for i, v in enumerate(value)]
    return _check_scalar(key, value, typ)


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]} (valid keys of {cls.__name__}: "
                          f"{', '.join(sorted(names))})")
    base = cls()
    kwargs = {}
    choices = getattr(cls, "CHOICES", {})
    for name in names:
        if name in data:
            kwargs[name] = _convert(prefix + name, data[name], hints[name])
            if name in choices and kwargs[name] not in choices[name]:
                raise ConfigError(f"{prefix}{name}: expected one of {', '.join(map(repr, choices[name]))}, "
                                  f"got {kwargs[name]!r}")
        else:
            kwargs[name] = getattr(base, name)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value):
    *parents, leaf = dotted.split(".")
    node = tree
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: '{p}' is not a section")
    node[leaf] = value


def load_config(cls, path: str | Path | None = None, overrides: list[str] | tuple = (), start=None):
    """Defaults of `cls` (or the config `start`, e.g. a saved run's), then the YAML file at `path`, then
    `section.key=value` overrides, in order.

    Override values are parsed as YAML, so `train.lr=3e-4`, `data.domains=[a,b]`, `x.flag=true` work.
    A missing file or a YAML syntax error is a ConfigError too.
    """
    tree = dataclasses.asdict(cls() if start is None else start)
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"config file {path} not found")
        loaded = parse_yaml(Path(path).read_text(), str(path)) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        _merge(tree, loaded)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        dotted, raw = item.split("=", 1)
        _set_dotted(tree, dotted.strip(), parse_yaml(raw, f"override {item!r}") if raw.strip() else "")
    return _build(cls, tree)


def _merge(base: dict, new: dict):
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v


def save_config(cfg, path: str | Path):
    """Write the resolved config as JSON (the run directory's record of what actually ran)."""
    Path(path).write_text(json.dumps(dataclasses.asdict(cfg), indent=2, sort_keys=True) + "\n")


def field_docs(cls) -> dict[str, str]:
    """Attribute docstrings of a dataclass (the string literal under each field), read with `ast`; a
    subclass (DistillConfig extends PretrainConfig) also gets its base classes' docs."""
    docs = {}
    for c in reversed([c for c in cls.__mro__ if dataclasses.is_dataclass(c)]):
        body = ast.parse(textwrap.dedent(inspect.getsource(c))).body[0].body
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) \
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def describe(cls, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, docstring) for every leaf field, for `--help`."""
    rows = []
    docs, hints, base = field_docs(cls), typing.get_type_hints(cls), cls()
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            rows += describe(typ, prefix + f.name + ".")
        else:
            rows.append((prefix + f.name, json.dumps(getattr(base, f.name)), docs.get(f.name, "")))
    return rows


def help_text(cls) -> str:
    lines = [f"config keys of {cls.__name__} (override with --set KEY=VALUE):"]
    for key, default, doc in describe(cls):
        lines.append(f"  {key} = {default}")
        lines += ["      " + ln for ln in textwrap.wrap(doc, 92)]
    return "\n".join(lines)
