"""The one command-line convention of the `python -m avt_jax.<command>` entry points: absl flags.

Every command defines its flags in a fresh `absl.flags.FlagValues` (so its module can be imported
next to the others and its `main(argv)` called from Python) and parses them with `parse`:

- `--flag=value` or `--flag value`; lists are comma-separated (`--annotations=a.csv,b.csv`);
  booleans are `--flag` / `--noflag`;
- `--help`, `--helpshort`, `--helpfull` and `-h` print the command's usage and every flag, exit 0;
- where a command takes a config, `--config.<field>=value` overrides a field
  (`ml_collections.config_flags`), as in `python -m avt_jax.main`;
- an unknown flag, a bad value, a missing required flag or an argument the command would ignore
  stops with one line `<prog>: error: ...` and exit status 2 (argparse's status).

Our design: `main` and `benchmark` used absl already (as big_vision, Scenic and the Flax examples
do); the other commands follow.
"""

import os
import sys
from typing import Callable, NoReturn, Sequence

from absl import flags

HELP_FLAGS = ('-h', '--help', '--helpshort', '--helpfull')
# Set before TensorFlow loads, unless the user set them: TF_CPP_MIN_LOG_LEVEL=2 keeps TensorFlow's
# C++ INFO and WARNING lines off stderr, and TF_ENABLE_ONEDNN_OPTS=0 removes the two lines that
# tensorflow 2.21 prints on import whatever TF_CPP_MIN_LOG_LEVEL says (`oneDNN custom operations are
# on ...` and absl's `WARNING: All log messages before absl::InitializeLog() is called ...`, which it
# prints before that first message; once from each of TF's two native libraries). oneDNN's custom
# ops only change TensorFlow's own CPU kernels; the model runs in JAX.
QUIET_ENVIRONMENT = {'TF_CPP_MIN_LOG_LEVEL': '2', 'TF_ENABLE_ONEDNN_OPTS': '0'}


def quiet_native_logs() -> None:
  """Sets `QUIET_ENVIRONMENT` where unset; entry points call it before importing TF (or JAX)."""
  for name, value in QUIET_ENVIRONMENT.items():
    os.environ.setdefault(name, value)


def usage_error(prog: str, message: str) -> NoReturn:
  """Prints `<prog>: error: <message>` on stderr and exits with status 2."""
  print(f'{prog}: error: {message}', file=sys.stderr, flush=True)
  raise SystemExit(2)


# What parsing raises for a bad flag: absl's errors (config files' own errors included), and
# ml_collections' AttributeError / KeyError for a `--config.<field>` override of a field the config
# does not have.
FLAG_ERRORS = (flags.Error, AttributeError, KeyError)


def flag_error_message(error: BaseException) -> str:
  """One line for an error of `FLAG_ERRORS`: a config file's traceback is cut to its first and last
  lines (the flag and the config's own message)."""
  if isinstance(error, (AttributeError, KeyError)):
    field = str(error).strip('"')
    return f'a --config.<field> override names no field of the config: {field}'
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  if len(lines) > 1:
    return f'{lines[0].rstrip(":")}: {lines[-1]}'
  return lines[0] if lines else type(error).__name__


def parse(prog: str, usage: str, define: Callable[[flags.FlagValues], None],
          argv: Sequence[str], positional: str | None = None
          ) -> tuple[flags.FlagValues, list[str]]:
  """Parses `argv` (without the program name) with the flags that `define` adds.

  Args:
    prog: the command, e.g. 'python -m avt_jax.predict' (shown in usage and errors).
    usage: what the command does and how it is called (printed first by --help).
    define: adds the command's flags to the FlagValues it is given (`flag_values=fv`).
    argv: the arguments.
    positional: the name of the positional arguments the command takes (e.g. 'FILE_OR_FOLDER'),
      or None when it takes none.

  Returns:
    (the parsed flags, the positional arguments).

  Raises:
    SystemExit: 0 after printing the help; 2 after one error line (see the module docstring).
  """
  fv = flags.FlagValues()
  define(fv)
  if set(HELP_FLAGS) & set(argv):
    print(f'usage: {prog} [flags]' + (f' {positional} [{positional} ...]' if positional else '')
          + f'\n\n{usage.strip()}\n\nflags:\n{fv.get_help(prefix="  ", include_special_flags=False)}')
    raise SystemExit(0)
  try:
    rest = fv([prog, *argv])[1:]
  except FLAG_ERRORS as e:
    usage_error(prog, flag_error_message(e))
  if positional and not rest:
    usage_error(prog, f'expected at least one {positional}')
  if rest and not positional:
    usage_error(prog, f'unexpected arguments {rest} (lists are comma-separated, e.g. '
                '--flag=a,b)')
  return fv, rest
