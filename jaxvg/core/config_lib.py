"""Experiment configs: frozen dataclasses written in python files under `configs/`, overridden from the command line.

`configs/<name>.py` defines `get_config() -> Config`. `--set rollout.group_size=8` replaces one field; the value is
parsed by the field's declared type, and an unknown key or a value of the wrong type is an error naming it.
"""

import dataclasses
import importlib.util
import os
import types
import typing
from typing import Any


def load_config(path: str):
  """Imports `path` (a python file) and returns its `get_config()`."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"config file {path} does not exist")
  spec = importlib.util.spec_from_file_location(f"jaxvg_config_{os.path.basename(path)[:-3]}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise AttributeError(f"config file {path} defines no get_config()")
  return module.get_config()


def _parse(value: str, typ, key: str):
  origin = typing.get_origin(typ)
  if origin in (typing.Union, types.UnionType):
    options = typing.get_args(typ)
    if value.lower() in ("none", "null") and type(None) in options:
      return None
    errors = []
    for option in options:
      if option is type(None):
        continue
      try:
        return _parse(value, option, key)
      except ValueError as e:
        errors.append(str(e))
    raise ValueError(f"--set {key}={value}: not a valid {typ} ({'; '.join(errors)})")
  if origin is tuple:
    args = typing.get_args(typ)
    items = [v for v in value.strip("()[] ").split(",") if v.strip()]
    elem = args[0] if args else str
    return tuple(_parse(v.strip(), elem, key) for v in items)
  if origin is typing.Literal:
    if value not in typing.get_args(typ):
      raise ValueError(f"--set {key}={value}: must be one of {typing.get_args(typ)}")
    return value
  if typ is bool:
    if value.lower() in ("1", "true", "yes", "on"):
      return True
    if value.lower() in ("0", "false", "no", "off"):
      return False
    raise ValueError(f"--set {key}={value}: expected a boolean (true/false)")
  if typ is int:
    try:
      return int(value)
    except ValueError:
      raise ValueError(f"--set {key}={value}: expected an integer") from None
  if typ is float:
    try:
      return float(value)
    except ValueError:
      raise ValueError(f"--set {key}={value}: expected a number") from None
  if typ is str:
    return value
  raise ValueError(f"--set {key}: fields of type {typ} cannot be set from the command line")


def override(cfg, assignment: str):
  """Returns `cfg` with one `dotted.key=value` replaced."""
  if "=" not in assignment:
    raise ValueError(f"--set {assignment!r}: expected key=value")
  key, value = assignment.split("=", 1)
  path = key.strip().split(".")

  def replace(node, parts):
    if not dataclasses.is_dataclass(node):
      raise KeyError(f"--set {key}: {'.'.join(path[:len(path) - len(parts)])} is not a config section")
    fields = {f.name: f for f in dataclasses.fields(node)}
    if parts[0] not in fields:
      raise KeyError(f"--set {key}: unknown key {parts[0]!r} in {type(node).__name__} (known: {', '.join(fields)})")
    if len(parts) == 1:
      hints = typing.get_type_hints(type(node))
      return dataclasses.replace(node, **{parts[0]: _parse(value.strip(), hints[parts[0]], key)})
    return dataclasses.replace(node, **{parts[0]: replace(getattr(node, parts[0]), parts[1:])})

  return replace(cfg, path)


def apply_overrides(cfg, assignments: list[str]):
  for a in assignments or []:
    cfg = override(cfg, a)
  return cfg


def to_dict(cfg) -> dict[str, Any]:
  return dataclasses.asdict(cfg)


def repr_without(cfg, *names: str) -> str:
  """The dataclass repr of `cfg` without the fields `names` (added fields that change no result: the repr of a
  config written before they existed stays the same)."""
  fields = (f"{f.name}={getattr(cfg, f.name)!r}" for f in dataclasses.fields(cfg) if f.name not in names)
  return f"{type(cfg).__qualname__}({', '.join(fields)})"
