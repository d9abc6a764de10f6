"""Command line of `python -m avt_jax.benchmark`: absl flags, the usage in `avt_jax.benchmark`.

`--config` is an ml_collections config file with `--config.<field>=value` overrides, as in
`python -m avt_jax.main`; the older spelling `--config_file=PATH [--config_arg=ARG]` means
`--config=PATH:ARG`.
"""

import functools
import os
import sys
import types
from typing import Sequence

import jax
from absl import flags
from ml_collections import config_flags

from avt_jax import benchmark, command_line
from avt_jax.benchmark import modes, report
from avt_jax.benchmark.configs import BENCHMARKS
from avt_jax.models import build
from avt_jax.models.options import ATTENTION_IMPLEMENTATIONS, DEFAULT_CHUNK_SIZE, REMAT_POLICIES

PROG = 'python -m avt_jax.benchmark'
# configs/demo.py of the checkout this package runs from (editable installs), else of the cwd.
_CHECKOUT_DEMO = os.path.join(os.path.dirname(os.path.abspath(benchmark.__file__)), os.pardir,
                              os.pardir, 'configs', 'demo.py')
DEFAULT_CONFIG = (os.path.normpath(_CHECKOUT_DEMO) if os.path.exists(_CHECKOUT_DEMO)
                  else 'configs/demo.py')
# Flags that only one mode reads: given with another mode they would be ignored, so they are refused.
MODE_FLAGS = {
    'train': ('configs',),
    'fusion': ('fusion_size', 'paper_scale', 'paper_step_time'),
    'input': ('config', 'config_file', 'config_arg', 'data_dir', 'input_batches', 'synthetic_clips',
              'step_batch_size'),
}


def _define_flags(fv: flags.FlagValues, argv: Sequence[str]) -> None:
  """Adds the command's flags to `fv`; `argv` names the `--config.<field>` overrides."""
  flags.DEFINE_enum('mode', 'train', ('train', 'fusion', 'input'), 'what to measure', flag_values=fv)
  flags.DEFINE_list('configs', ['tiny', 'small', 'base'],
                    f'comma-separated subset of {sorted(BENCHMARKS)} (train mode)', flag_values=fv)
  flags.DEFINE_integer('steps', 5, 'timed steps per round', flag_values=fv)
  flags.DEFINE_integer('repeats', 3, 'timing rounds (the spread is reported)', flag_values=fv)
  flags.DEFINE_integer('batch_size', None, "override the configs' batch size", flag_values=fv)
  flags.DEFINE_integer('audio_frames', None, "override the configs' audio frames", flag_values=fv)
  flags.DEFINE_enum('dtype', 'float32', sorted(build.DTYPES),
                    'compute dtype (parameters stay float32)', flag_values=fv)
  flags.DEFINE_enum('attention', 'xla', ATTENTION_IMPLEMENTATIONS, 'attention implementation',
                    flag_values=fv)
  flags.DEFINE_integer('attention_chunk_size', DEFAULT_CHUNK_SIZE, 'chunked attention: chunk size',
                       flag_values=fv)
  flags.DEFINE_enum('remat_policy', 'none', sorted(REMAT_POLICIES), 'rematerialisation',
                    flag_values=fv)
  flags.DEFINE_bool('scan_layers', False, 'nn.scan over identical layers', flag_values=fv)
  flags.DEFINE_enum('objectives', 'classification', ('classification', 'all'), 'trained objectives',
                    flag_values=fv)
  flags.DEFINE_bool('compile_only', False, 'FLOPs, memory and compile time only (no timed steps)',
                    flag_values=fv)
  flags.DEFINE_enum('fusion_size', 'small', sorted(BENCHMARKS), 'encoder size of the fusion study',
                    flag_values=fv)
  flags.DEFINE_bool('paper_scale', False, 'fusion mode: add the base model at 32 x 224 (compiled; '
                    'timed with --paper_step_time)', flag_values=fv)
  flags.DEFINE_bool('paper_step_time', False, 'fusion mode: time the paper-scale step',
                    flag_values=fv)
  config_flags.DEFINE_config_file('config', DEFAULT_CONFIG, 'input mode: config file[:argument]',
                                  flag_values=fv, sys_argv=list(argv))
  flags.DEFINE_string('config_file', None, 'input mode: config file (as --config)', flag_values=fv)
  flags.DEFINE_string('config_arg', None, 'input mode: argument of get_config', flag_values=fv)
  flags.DEFINE_string('data_dir', None, 'input mode: prepared records', flag_values=fv)
  flags.DEFINE_integer('input_batches', 20, 'input mode: batches timed', flag_values=fv)
  flags.DEFINE_integer('synthetic_clips', 0, "input mode: write this many random clips at the "
                       "config's scale and read them", flag_values=fv)
  flags.DEFINE_integer('step_batch_size', None, 'input mode: batch size of the train step '
                       '(default: the input batch size)', flag_values=fv)
  flags.DEFINE_string('output_dir', 'benchmark_results', 'where the reports go', flag_values=fv)


def _usage_error(message: str):
  command_line.usage_error(PROG, message)


def _parse(argv: Sequence[str]) -> flags.FlagValues:
  """Parses `argv` (program name first); exits with status 2 on an error, 0 after --help."""
  define = functools.partial(_define_flags, argv=argv)
  return command_line.parse(PROG, benchmark.__doc__, define, argv[1:])[0]


def parse_args(argv: Sequence[str] | None = None) -> types.SimpleNamespace:
  """The flags of `argv` (default: sys.argv[1:]) as attributes; `config` is the loaded config,
  `config_file` and `config_arg` name it.

  Exits with status 2 on an unknown flag or value, and on a flag that the chosen `--mode` would
  ignore (`MODE_FLAGS`, e.g. `--config` without `--mode=input`).
  """
  argv = [PROG, *(sys.argv[1:] if argv is None else argv)]
  fv = _parse(argv)
  for mode, names in MODE_FLAGS.items():
    given = [f'--{name}' for name in fv if fv[name].present and (
        name in names or mode == 'input' and name.startswith('config.'))]
    if given and mode != fv.mode:
      _usage_error(f'{", ".join(given)}: only --mode={mode} reads this; --mode={fv.mode} would '
                   'ignore it')
  if fv.config_file or fv.config_arg:  # the older spelling of --config=PATH:ARG
    if fv['config'].present:
      _usage_error('pass either --config or --config_file / --config_arg')
    spec = (fv.config_file or DEFAULT_CONFIG) + (f':{fv.config_arg}' if fv.config_arg else '')
    fv = _parse([argv[0], f'--config={spec}', *argv[1:]])  # before any --config.<field>
  args = types.SimpleNamespace(**{name: fv[name].value for name in fv if '.' not in name})
  args.config_file, _, arg = fv['config'].config_filename.partition(':')
  args.config_arg = arg or None
  args.configs = [c.strip() for c in args.configs if c.strip()]
  unknown = [c for c in args.configs if c not in BENCHMARKS]
  if unknown:
    _usage_error(f'--configs: unknown {unknown}; expected names in {sorted(BENCHMARKS)}')
  if args.steps < 1 or args.repeats < 1:
    _usage_error('--steps and --repeats must be >= 1')
  return args


def main(argv: Sequence[str] | None = None) -> dict:
  """Runs the mode of `argv`, writes and prints its report, and returns it."""
  args = parse_args(argv)
  jax.config.update('jax_enable_compilation_cache', False)  # compile times must be real
  run = {'train': modes.run_train, 'fusion': modes.run_fusion, 'input': modes.run_input}[args.mode]
  result = run(args)
  paths = report.write_report(result, args.output_dir)
  print(report.markdown(result))
  print('Wrote ' + ', '.join(paths.values()))
  return result
