"""The config of a run, as every command reads it: a run directory is the unit.

`train.py` writes the run's whole config to `<workdir>/config.json`. Every command pointed at a run (eval,
resume, the linear probe, the augmentation preview; predict and export read it through their --weights /
--workdir) starts from that saved config, with command-line overrides (`--config.a.b=v`) on top; `--config`
is then optional, and a `--config` naming another file applies only to a workdir that holds no run yet. A
saved config.json is accepted wherever a config file is (`--config=runs/x/config.json`).

JSON loses the types of the fields that hold None (`model.width`, `training_steps`, ...), which
ml_collections needs to parse an override. A saved config is therefore read into its template, the recipe
`configs/base.py` builds for the saved model name (the commands pass `base.get_config`; the library imports
no config file): every saved value replaces the template's, fields the template lacks (a recipe's own, such
as a fine-tune's) are added as saved, and fields the saved file lacks keep the template's defaults.

Mistakes on the command line (a missing config file, an unknown `--config.x` field, a config function that
refuses its argument, an unreadable config.json) are one `error: ...` line and exit status 2.
"""
import difflib
import importlib.util
import json
import os
import re
import sys
from typing import Callable, List, Optional

from absl import flags
import ml_collections
from ml_collections import config_dict
from ml_collections import config_flags

from nfnets import console
from nfnets.config_validation import ConfigError

CONFIG_JSON = 'config.json'
Template = Callable[[str], ml_collections.ConfigDict]   # model name -> the recipe's ConfigDict

# The --config value the user gave that a workdir holding a run replaced (see `parse_flags`), or None.
replaced_config_arg: Optional[str] = None


def saved_config_path(path: Optional[str]) -> Optional[str]:
  """`<path>/config.json` when `path` is a run's workdir (or its `checkpoints` folder); None otherwise."""
  if not path or not os.path.isdir(path):
    return None
  folders = [path]
  if os.path.basename(os.path.normpath(path)) == 'checkpoints':
    folders.append(os.path.dirname(os.path.normpath(path)))
  for folder in folders:
    candidate = os.path.join(folder, CONFIG_JSON)
    if os.path.isfile(candidate):
      return candidate
  return None


def _as_field(value):
  """A JSON value as a config field: lists become tuples (JSON has no tuple), null an `object`
  placeholder (its type is unknown; an override is parsed as a Python literal)."""
  if isinstance(value, list):
    return tuple(value)
  if value is None:
    return config_dict.placeholder(object)
  return value


def _merge(node: ml_collections.ConfigDict, saved: dict) -> None:
  for key, value in saved.items():
    if isinstance(value, dict):
      if not isinstance(node.get(key), ml_collections.ConfigDict):
        node[key] = ml_collections.ConfigDict()
      _merge(node[key], value)
    elif key in node:
      node[key] = tuple(value) if isinstance(value, list) else value
    else:
      node[key] = _as_field(value)


def config_from_json(path: str, template: Template) -> ml_collections.ConfigDict:
  """The (locked) config saved at `path` by `train.py`, read into `template(model name)`.

  Raises ConfigError (one line naming the file) when it cannot be read or is not a saved run config.
  """
  try:
    with open(path, encoding='utf-8') as f:
      saved = json.load(f)
  except OSError as e:
    raise ConfigError(f'{path}: cannot read the saved config ({e.strerror or e})') from None
  except ValueError as e:
    raise ConfigError(f'{path}: not valid JSON ({e}); accepted: the config.json train.py writes in a '
                      "run's workdir, or a config file (.py)") from None
  model = saved.get('model') if isinstance(saved, dict) else None
  if not isinstance(model, dict) or not isinstance(model.get('name'), str):
    raise ConfigError(f"{path}: not a run's saved config (it has no model.name); accepted: the config.json "
                      "train.py writes in a run's workdir, or a config file (.py)")
  config = template(model['name'])
  _merge(config, saved)
  config.lock()
  return config


def load(spec: str, template: Template) -> ml_collections.ConfigDict:
  """A config file as `--config` reads it: `file.py[:arg]` (its `get_config`) or a saved `config.json`."""
  path, *args = spec.split(':', 1)
  if path.endswith('.json'):
    return config_from_json(path, template)
  module_spec = importlib.util.spec_from_file_location('_nfnets_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not callable(getattr(module, 'get_config', None)):
    raise ConfigError(f'--config={spec}: {path} has no get_config() function; accepted: a config file such '
                      "as configs/demo.py, or a run's saved config.json")
  config = module.get_config(*args)
  config.lock()
  return config


class _ConfigFileParser(flags.ArgumentParser):
  """ml_collections' config-file parser (`files`), which also reads a run's saved config.json."""

  def __init__(self, files: flags.ArgumentParser, template: Template):
    self.files, self.template = files, template

  def parse(self, argument):
    if isinstance(argument, str) and argument.split(':', 1)[0].endswith('.json'):
      return config_from_json(argument.split(':', 1)[0], self.template)
    return self.files.parse(argument)

  def flag_type(self):
    return self.files.flag_type()


def define_config_flag(template: Template, help_string: str, name: str = 'config',
                       flag_values: flags.FlagValues = flags.FLAGS, sys_argv=None) -> flags.FlagHolder:
  """`--config` (a recipe `.py[:arg]` or a saved `config.json`) with `--config.a.b=v` overrides; parse the
  command line with `parse_flags` so that a `--workdir` holding a run supplies it. `flag_values` and
  `sys_argv` as ml_collections' `DEFINE_config_file`."""
  holder = config_flags.DEFINE_config_file(name, None, help_string, flag_values=flag_values,
                                           lock_config=True, sys_argv=sys_argv)
  flag = flag_values[name]
  flag.parser = _ConfigFileParser(flag.parser, template)
  return holder


# ------------------------------------------------------------------------------------------ command line

def flag_value(argv: List[str], name: str) -> Optional[str]:
  """The value of the last `--name=V` / `--name V` in argv, or None."""
  value = None
  for i, arg in enumerate(argv):
    m = re.match(rf'^--?{name}(=(.*))?$', arg)
    if m:
      value = m.group(2) if m.group(1) else (argv[i + 1] if i + 1 < len(argv) else '')
  return value


def _without_flag(argv: List[str], name: str) -> List[str]:
  out, skip = [], False
  for arg in argv:
    if skip:
      skip = False
      continue
    if re.match(rf'^--?{name}$', arg):
      skip = True
      continue
    if not re.match(rf'^--?{name}=', arg):
      out.append(arg)
  return out


def unknown_override(argv: List[str], config) -> Optional[str]:
  """The first `--config.a.b` override in argv that names no field of `config`, as a message, or None."""
  for arg in argv:
    m = re.match(r'^--?(?:no)?config\.([^=]+)', arg)
    if not m:
      continue
    node, keys = config, m.group(1).split('.')
    for depth, key in enumerate(keys):
      fields = list(node.keys()) if hasattr(node, 'keys') else []
      if key not in fields:
        close = difflib.get_close_matches(key, fields, 1)
        hint = f"; did you mean '{'.'.join(keys[:depth] + close)}'?" if close else ''
        return f"--config.{m.group(1)}: the config has no field '{m.group(1)}'{hint}"
      node = node[key]
  return None


def parse_flags(argv: List[str], template: Template, require_config: bool = True) -> List[str]:
  """absl's flag parsing for a command with `--config` (and `--workdir`), as described in the module
  docstring; user mistakes end in one `error:` line and exit status 2.

  `require_config`: without --config and without a run in --workdir, say that --config is needed.
  """
  global replaced_config_arg
  spec, workdir = flag_value(argv, 'config'), flag_value(argv, 'workdir')
  saved = saved_config_path(workdir) if workdir and 'workdir' in flags.FLAGS else None
  if saved:
    if spec and os.path.abspath(spec) != os.path.abspath(saved):
      replaced_config_arg = spec
    argv = [argv[0], f'--config={saved}'] + _without_flag(argv[1:], 'config')
    spec = saved
    # ml_collections reads the overrides from sys.argv when it parses --config: keep the two in step.
    sys.argv[:] = argv
  if not spec:
    if require_config:
      where = f'--workdir={workdir} holds no run (no {CONFIG_JSON})' if workdir else 'no --workdir of a run'
      sys.exit(console.user_error(f'--config is required: {where}; give a config file, e.g. '
                                  '--config=configs/demo.py'))
    return flags.FLAGS(argv)
  path = spec.split(':', 1)[0]
  if not os.path.isfile(path):
    sys.exit(console.user_error(f'--config={spec}: no such config file {path!r}'))
  if path.endswith('.json'):
    try:
      config_from_json(path, template)
    except ConfigError as e:
      sys.exit(console.user_error(e.problems))
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError):   # no get_config, or an override of a field the config does not have
    try:
      message = unknown_override(argv, load(spec, template))
    except ConfigError as e:
      message = e.problems
    if message is None:
      raise
    sys.exit(console.user_error(message))
  except flags.Error as e:
    text = str(e)
    if 'Error whilst parsing config file' in text:   # the config's get_config refused its argument
      last = text.strip().splitlines()[-1]
      text = f'--config={spec}: ' + re.sub(r'^(ValueError|TypeError): ', '', last)
    sys.exit(console.user_error(' '.join(text.split())))


def describe(name: str = 'config') -> str:
  """One line for the console: which config file the command runs, and its command-line overrides."""
  flag = flags.FLAGS[name]
  overrides = config_flags.get_override_values(flag)
  text = f'Config {config_flags.get_config_filename(flag)}'
  if replaced_config_arg:
    text += (f" (the run's saved config; --config={replaced_config_arg} applies only to a workdir that "
             'holds no run)')
  if overrides:
    text += '; overrides ' + ', '.join(f'{k}={v!r}' for k, v in overrides.items())
  return text
