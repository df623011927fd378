"""absl flags generated from `maxrec.config.Config`: one flag per leaf field, same name,
same default, help text from the field's metadata. Only `main` functions read them."""

from __future__ import annotations

import dataclasses
import logging
import sys
import types
import typing

from absl import app, flags

from maxrec.config import Config

# JAX probes for a TPU at start and logs the (expected) failure at INFO on every CPU/GPU
# machine; keep that line out of the experiments' logs. Warnings still show.
logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)


def _leaf_fields():
  """(field, type) of every field that is a flag (test hooks are not)."""
  for group in Config.groups().values():
    hints = typing.get_type_hints(group)
    for f in dataclasses.fields(group):
      if f.metadata.get("flag", True):
        yield f, hints[f.name]


def _group_title(group) -> str:
  """The first sentence of a config group's docstring, without its § references."""
  doc = (group.__doc__ or "").strip().split("\n")[0]
  return doc.split(" (")[0].rstrip(".")


def grouped_help(flag_values=flags.FLAGS) -> str:
  """The configuration flags grouped by what they configure (data, model, train, aux,
  meta), each with its help text and default."""
  out = []
  for name, group in Config.groups().items():
    out.append(f"\n{name}: {_group_title(group)}")
    for f in dataclasses.fields(group):
      if f.metadata.get("flag", True):
        flag = flag_values[f.name]
        text = f"--{f.name}: {flag.help}\n(default: {flag.default_as_str})"
        out.append(flags.text_wrap(text, indent="      ", firstline_indent="  "))
  return "\n".join(out)


HELP_ARGS = ("--help", "-help", "--helpshort", "-helpshort", "-?", "-h")


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a `--help` that shows the script's own flags and then the
  configuration flags grouped (absl's own lists only the main module's flags). Pass as
  `app.run(main, flags_parser=parse_flags)`."""
  if any(a in HELP_ARGS for a in argv[1:]):
    main = sys.modules["__main__"]
    print((main.__doc__ or "").strip())
    own = flags.FLAGS.main_module_help()
    if own:
      print(f"\nflags of this script:\n{own}")
    print(f"\nconfiguration flags:{grouped_help()}")
    print("\nTry --helpfull for every flag, including absl's and JAX's.")
    sys.exit(0)
  return app.parse_flags_with_usage(argv)


def _split_optional(tp):
  """`X | None` -> (X, True); X -> (X, False)."""
  if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0], True
  return tp, False


def define_config_flags(flag_values=flags.FLAGS) -> None:
  """Defines every config flag (call once, at import time of an experiment script)."""
  for f, tp in _leaf_fields():
    base, optional = _split_optional(tp)
    help_ = f.metadata.get("help", "")
    default = f.default
    if "choices" in f.metadata:
      flags.DEFINE_enum(
        f.name, default, list(f.metadata["choices"]), help_, flag_values=flag_values
      )
    elif typing.get_origin(base) is tuple:
      dflt = None if default is None else [str(x) for x in default]
      flags.DEFINE_list(f.name, dflt, help_, flag_values=flag_values)
    elif optional:
      dflt = None if default is None else str(default)
      flags.DEFINE_string(f.name, dflt, help_ + " (empty: none)", flag_values=flag_values)
    elif base is bool:
      flags.DEFINE_bool(f.name, default, help_, flag_values=flag_values)
    elif base is int:
      flags.DEFINE_integer(f.name, default, help_, flag_values=flag_values)
    elif base is float:
      flags.DEFINE_float(f.name, default, help_, flag_values=flag_values)
    else:
      flags.DEFINE_string(f.name, default, help_, flag_values=flag_values)


def _convert(name: str, raw, tp):
  base, optional = _split_optional(tp)
  if raw is None or (optional and raw in ("", "none", "None")):
    return None
  if typing.get_origin(base) is tuple:
    (elem, *_) = typing.get_args(base)
    try:
      return tuple(elem(x) for x in raw if str(x).strip() != "")
    except ValueError:
      raise ValueError(f"--{name}={','.join(raw)}: each entry must be a {elem.__name__}.") from None
  if optional and base in (int, float):
    try:
      return base(raw)
    except ValueError:
      raise ValueError(f"--{name}={raw!r} must be a {base.__name__} or empty.") from None
  return raw


def config_from_flags(flag_values=flags.FLAGS, **overrides) -> Config:
  """The validated `Config` of the parsed flags (raises ValueError on a bad value)."""
  values = {f.name: _convert(f.name, flag_values[f.name].value, tp) for f, tp in _leaf_fields()}
  values.update(overrides)
  cfg = Config.from_flat(**values)
  from maxrec.objective import check_tasks  # imports JAX: only once flags are parsed

  check_tasks(cfg.aux.aux_tasks)
  return cfg
