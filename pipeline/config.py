"""Typed configuration: frozen dataclasses loaded from one YAML file plus dotted overrides.

Each stage defines its own frozen, keyword-only dataclasses next to the code they configure and
composes them into one job config. ``load_config(JobConfig, "jobs/configs/x.yaml", ["a.b=3"])``
builds it, and every unknown key or value of the wrong type is a ``ValueError`` that names the
dotted key (nanoGPT's configurator does the same checks).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")
_EXPONENT_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert containers; raise naming ``key``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:  # Optional[X]: X's own, more precise error
            return _coerce(value, non_none[0], key)
        for arg in non_none:
            try:
                return _coerce(value, arg, key)
            except ValueError:
                pass
        raise ValueError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ValueError(f"{key} must be one of {list(get_args(tp))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, str) and hasattr(tp, "from_str"):
            return tp.from_str(value)
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ValueError(f"{key}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping, got {value!r}")
        k_tp, v_tp = get_args(tp) or (Any, Any)
        out = {}
        for k, v in value.items():
            # integer keys arrive as strings from overrides and JSON (top_ngram_max_frac.2=0.3)
            k_value = int(k) if k_tp is int and isinstance(k, str) and re.fullmatch(r"\s*[+-]?\d+\s*", k) else k
            out[_coerce(k_value, k_tp, key)] = _coerce(v, v_tp, f"{key}.{k}")
        return out
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        # 1000.0, or "1e3" (YAML 1.1 reads an exponent without a dot as a string): an integer's value
        number = float(value) if isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value.strip()) else value
        if isinstance(number, float) and number.is_integer():
            return int(number)
        if isinstance(number, bool) or not isinstance(number, int):
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        return number
    if tp is float:
        # YAML 1.1 (PyYAML) reads exponents without a dot ("2e-3", "1E5") as strings
        number = float(value) if isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value.strip()) else value
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise ValueError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(number):  # YAML's .inf / .nan, 1e999: no setting is unbounded (null turns a rule off)
            raise ValueError(f"{key}: expected a finite number, got {value!r}")
        return float(number)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{key}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ValueError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping; unknown keys and wrong types raise ``ValueError``."""
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        names = ", ".join(f"{prefix}.{k}" if prefix else str(k) for k in unknown)
        raise ValueError(f"unknown config key(s): {names} (valid: {', '.join(sorted(fields))})")
    missing = [n for n, f in fields.items() if n not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError("missing required config key(s): " + ", ".join(f"{prefix}.{n}" if prefix else n for n in missing))
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key)
    try:
        obj = cls(**kwargs)  # its own checks first: they say more about their keys than the one below
    except TypeError as exc:  # a required field is missing
        raise ValueError(f"{prefix or cls.__name__}: {exc}") from None
    # no config string is empty: an empty path reads the working directory, an empty term matches everywhere
    for name, value in kwargs.items():
        key = f"{prefix}.{name}" if prefix else name
        for where, item in ([(key, value)] if isinstance(value, str) else
                            [(f"{key}[{i}]", v) for i, v in enumerate(value)] if isinstance(value, (list, tuple)) else []):
            if isinstance(item, str) and not item.strip():
                raise ValueError(f"{where}: expected a non-empty string, got {item!r}")
    return obj


def to_dict(cfg: Any) -> Any:
    """Plain-data (JSON/YAML-serialisable) view of a config."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b.c=3"`` -> (["a", "b", "c"], 3); the value is parsed as YAML (so ``[1,2]``, ``true``). A
    list index is a number between dots, or in brackets as in Python and jq: ``models[0].path``
    is ``models.0.path``."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like key=value")
    key, raw = text.split("=", 1)
    key = re.sub(r"\[\s*(\d+)\s*\](?=\.|\[|$)", r".\1", key.strip())
    if "[" in key or "]" in key:
        raise ValueError(f"override {text!r}: a list index is a number, as in models.0.path or models[0].path")
    if not key or any(not part for part in key.split(".")):
        raise ValueError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    data = json.loads(json.dumps(data))  # deep copy of plain data
    for item in overrides:
        path, value = parse_override(item)
        node: Any = data
        for depth, part in enumerate(path):
            last = depth == len(path) - 1
            if isinstance(node, list):  # a list element by index: models.0.threads=2
                where = ".".join(path[:depth]) or "the config"
                if not (part.isdigit() and int(part) < len(node)):
                    raise ValueError(f"override {item!r}: {where} is a list of {len(node)}; "
                                     f"{part!r} is not an index into it")
                part = int(part)
            elif not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {'.'.join(path[:depth])} is {node!r}, not a mapping or a list "
                                 f"(replace it whole: {'.'.join(path[:depth])}=...)")
            if last:
                node[part] = value
                break
            child = node[part] if isinstance(node, list) else node.get(part)
            if child is None:
                child = node[part] = {}
            node = child
    return data


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file not found: {path}")
    try:
        with path.open(encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except UnicodeDecodeError as exc:
        raise ValueError(f"config file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:  # its message names the line and column
        raise ValueError(f"config file {path} is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping at the top level")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    data = load_yaml(path) if path else {}
    return from_dict(cls, apply_overrides(data, list(overrides or [])))


def config_hash(data: Any, length: int = 12) -> str:
    """Stable short hash of plain config data (sorted keys), for deterministic output paths."""
    blob = json.dumps(to_dict(data), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def without_defaults(data: dict, later: dict) -> dict:
    """``data`` (plain config data, as hashed for an output path) without the keys of ``later``
    that hold their default value there (nested dicts apply to sections). ``later`` names keys added
    after runs were made: left at their defaults, those runs keep their output directories (and
    the caches keyed by them still resolve)."""
    out = dict(data)
    for key, default in later.items():
        if isinstance(default, dict) and isinstance(out.get(key), dict):
            out[key] = without_defaults(out[key], default)
        elif key in out and out[key] == default:
            del out[key]
    return out


def check(condition: bool, message: str) -> None:
    """Raise ``ValueError(message)`` for bad user input (configs validate with this in ``__post_init__``)."""
    if not condition:
        raise ValueError(message)


SEED_MAX = 2**32 - 1  # numpy's RandomState, SeedSequence and scikit-learn's random_state take [0, 2**32 - 1]


def check_name(value: str, key: str = "name") -> None:
    """A name that becomes one directory of a run's path (``<output_dir>/<name>-<hash>``): not
    empty, no path separator, not ``.`` or ``..`` (which would leave the output directory)."""
    check(isinstance(value, str) and value.strip() not in ("", ".", "..") and not any(c in value for c in "/\\\0"),
          f"{key} must be a plain, non-empty name (one path component), got {value!r}")


def check_local(value: str | None, key: str) -> None:
    """A directory a job writes (``output_dir``), or reads as a tree of files (a prepare output, a
    model directory), is a local path: on a cluster, shared storage mounted at the same path on
    every node. A URI there would be taken for a relative path (``s3:/bucket/...``): refused,
    naming the key. Corpora and labeled or chat data files are read from URIs, elsewhere."""
    if value is None or "://" not in str(value):
        return
    scheme, rest = str(value).split("://", 1)
    check(False, f"{key}: {value} is a URI, but {key} names a local directory"
                 + (f": write it as a path, /{rest.lstrip('/')}" if scheme == "file" else
                    "; on a cluster, use shared storage mounted at the same path on every node (NFS; a bucket "
                    "mounted with s3fs-fuse, gcsfuse or mountpoint-s3)"))


def check_output_outside(output_dir: str, value: str | None, key: str) -> None:
    """A job's ``output_dir`` inside a data directory it reads (``key``): the next run would read
    this one's outputs (JSON, JSONL, Parquet) as data. Refused, naming both keys. (The prepare
    stage instead leaves its output directory out of a corpus directory, and counts what it left.)"""
    if value is None or "://" in str(value):
        return
    data = Path(value).expanduser().resolve()
    check(not (data.is_dir() and Path(output_dir).expanduser().resolve().is_relative_to(data)),
          f"output_dir ({output_dir}) is inside {key} ({value}), a directory read as data: every run's outputs "
          f"there would be read as {key} by the next; write output_dir elsewhere")


def check_seed(value: int, key: str) -> None:
    """A seed every random generator the stages use accepts (a negative one fails deep in numpy)."""
    check(0 <= value <= SEED_MAX, f"{key} must be in [0, {SEED_MAX}], got {value}")


def check_fraction(value: float | None, key: str) -> None:
    """A share in [0, 1] (``None``: the rule it sets is off)."""
    check(value is None or 0 <= value <= 1, f"{key} must be in [0, 1] or null, got {value}")


def check_at_least(value: float | None, low: float, key: str) -> None:
    """A count or threshold of at least ``low`` (``None``: the rule it sets is off)."""
    check(value is None or value >= low, f"{key} must be >= {low:g} or null, got {value}")


__all__ = [
    "apply_overrides", "check", "check_at_least", "check_fraction", "check_local", "check_seed", "config_hash", "from_dict", "load_config", "load_yaml",
    "parse_override", "to_dict", "typing", "without_defaults",
]
