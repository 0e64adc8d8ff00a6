"""Shared pieces of `scripts/*.py`: the `--config` flag and `run`, with clear errors for bad overrides."""
import re
import sys
from typing import Callable, Optional

from absl import app, flags, logging
from ml_collections import config_flags


def _exit_unknown_key(error: AttributeError, argv: list[str]) -> None:
  # ml_collections reports an override of a field the config lacks as an AttributeError holding the key's repr,
  # sometimes followed by a "Did you mean" suggestion.
  text = str(error)
  key = re.search(r"'(\w+)", text)[1] if re.search(r"'(\w+)", text) else text
  suggestion = re.search(r'Did you mean \\?"(\w+)', text)
  culprits = [a for a in argv if a.startswith("--config.") and key in a.split("=", 1)[0].split(".")]
  flag = culprits[0] if culprits else key
  hint = f" Did you mean {suggestion[1]!r}?" if suggestion else ""
  sys.exit(f"FATAL: unknown config key in {flag}: the config has no field {key!r} there.{hint} Check the "
           "spelling against the config file (configs/common.py defines the fields); new keys cannot be added "
           "from the command line.")


def define_config(default: Optional[str], help_text: str) -> flags.FlagHolder:
  """`--config=configs/<file>.py` plus `--config.a.b=value` overrides, locked so that code cannot add keys either.

  With a default file, absl applies the overrides while defining the flag, so errors are caught here too.
  """
  try:
    return config_flags.DEFINE_config_file("config", default, help_text, lock_config=True)
  except AttributeError as error:
    _exit_unknown_key(error, sys.argv)


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except AttributeError as error:
    _exit_unknown_key(error, argv)
  except flags.Error as error:
    sys.exit(f"FATAL: {error}\nPass --help to list the flags.")


def run(main: Callable[[list[str]], None]) -> None:
  """`absl.app.run(main)` with readable errors for bad flags and `--config.*` overrides.

  Library INFO logs (JAX probing for TPUs, orbax internals) are hidden by default; `--verbosity=0` shows them.
  """

  def main_with_quiet_libraries(argv: list[str]) -> None:
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)
    main(argv)

  app.run(main_with_quiet_libraries, flags_parser=_parse_flags)
