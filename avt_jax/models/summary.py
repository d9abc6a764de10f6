"""Parameter count and FLOPs per clip of an AVT model, without allocating its parameters.

    python -m avt_jax.models.summary [--size=base] [--fusion=bottleneck] [--fusion_layer=8]
        [--num_classes=309] [--batch=2] [--config.<field>=value ...]

The model is built from `avt_jax.default_config.get_base_config()` (ViT-B/16 per modality, 32 frames
of 224x224 in 2x16x16 tubelets, 8 s of audio as 800x128 log-mel in 16x16 patches, 4 bottlenecks from
layer 8). Parameters are only shapes (`jax.eval_shape`), and the forward passes are lowered with
`jax.ShapeDtypeStruct`s, never compiled or run, so the command needs little memory and time. FLOPs
are `model_flops` of the plain model's forward passes (a multiply-add counts as 2 FLOPs), divided by
the batch size; a training step adds the backward pass, roughly twice the forward.
"""

import functools
import sys
from typing import Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags

from avt_jax import command_line
from avt_jax.default_config import get_base_config
from avt_jax.models import build
from avt_jax.models.avt import AVT, OBJECTIVES
from avt_jax.models.fusion import FUSIONS

INFERENCE_OBJECTIVES = ('classification',)
PASSES = ('inference', 'training')
# `config.model` settings that change how the model is computed but not what: the plain model has
# these values (the base config's).
PLAIN_MODEL = {'attention_implementation': 'xla', 'remat_policy': 'none', 'scan_layers': False}


def model_flops(lowered: jax.stages.Lowered) -> float:
  """Model FLOPs of a lowered function: XLA's cost analysis of the program before backend passes.

  The one FLOP count of this repository: the train-step benchmark's model FLOPs (for MFU) and this
  module's FLOPs per clip. A multiply-add is 2 FLOPs; the elementwise work (norms, softmax, GELU,
  the optimizer update) counts too, a few percent above a hand count of the matrix products
  (tests/test_benchmark.py and tests/test_summary.py check both). Our design:
    - the lowered, not the compiled, program: backend passes rewrite it differently per backend (on
      an H100 the compiled GPU program of the base train step reported 1606 of the 2943 GFLOP that
      the lowered program and a hand count give), so this count is the same on every backend and
      needs no compilation;
    - of the plain model (`plain`): remat and chunked attention recompute products, which are not
      useful work, and a loop (scan over layers, attention chunks) would count its body once.
  """
  return float(lowered.cost_analysis()['flops'])


def plain(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` whose model is plain (`PLAIN_MODEL`: xla attention, no remat, no scan;
  the dtype is kept): the model `model_flops` counts."""
  config = config.copy_and_resolve_references()
  config.model.update(PLAIN_MODEL)
  return config


def _input_shapes(config: ml_collections.ConfigDict, batch: int) -> dict[str, jax.ShapeDtypeStruct]:
  return {name: jax.ShapeDtypeStruct(x.shape, x.dtype)
          for name, x in build.example_inputs(config, batch).items()}


def param_shapes(model: AVT, inputs: dict[str, jax.ShapeDtypeStruct],
                 objectives: Sequence[str] = OBJECTIVES) -> dict:
  """Shapes (`jax.ShapeDtypeStruct`) of the parameters used by `objectives`; nothing is allocated."""
  rngs = {name: jax.random.key(i) for i, name in enumerate(('params', 'masking', 'dropout'))}
  variables = jax.eval_shape(
      lambda r, x: model.init(r, x, train=False, objectives=tuple(objectives)), rngs, inputs)
  return nn.meta.unbox(variables['params'])


def parameter_counts(params: dict) -> dict[str, int]:
  """Number of parameters per top-level module, plus `total`."""
  counts = {name: sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(subtree))
            for name, subtree in sorted(params.items())}
  counts['total'] = sum(counts.values())
  return counts


def flops_per_clip(model: AVT, params: dict, inputs: dict[str, jax.ShapeDtypeStruct], *,
                   train: bool, objectives: Sequence[str]) -> float:
  """`model_flops` of one forward pass of a plain `model`, per example."""
  rngs = {'masking': jax.random.key(1), 'dropout': jax.random.key(2)}

  def forward(p, x):
    return model.apply({'params': p}, x, train=train, objectives=tuple(objectives), rngs=rngs)

  batch = inputs['audio'].shape[0] if 'audio' in inputs else inputs['video'].shape[0]
  return model_flops(jax.jit(forward).lower(params, inputs)) / batch


def summarize(config: ml_collections.ConfigDict, batch: int = 2,
              passes: Sequence[str] = PASSES) -> dict:
  """Parameter counts and FLOPs per clip of the model `config` describes, counted on its plain form
  (`plain`: the remat, scan and attention settings change neither).

  Args:
    config: a full config (see `avt_jax.default_config`).
    batch: batch size the passes are compiled for (FLOPs are divided by it).
    passes: subset of PASSES: `inference` is the classification-only forward pass (train=False);
      `training` the forward pass (train=True) with every objective that has a non-zero weight in
      `config.loss.weights` (all of them in the base config).

  Returns:
    {'params': {module: count, 'total': count} for the parameters of classification and every
    trained objective, 'inference_params': count of the parameters the inference pass uses,
    'training_objectives': the objectives of the training pass, 'flops': {pass: FLOPs per clip}}.

  Raises:
    ValueError: for passes outside PASSES, or a config `build.build_model` rejects.
  """
  unknown = set(passes) - set(PASSES)
  if unknown:
    raise ValueError(f'summarize: passes must be a subset of {PASSES}, got {sorted(unknown)}.')
  config = plain(config)
  model = build.build_model(config)
  inputs = _input_shapes(config, batch)
  trained = build.objectives(config)
  used = tuple(o for o in OBJECTIVES if o in trained or o in INFERENCE_OBJECTIVES)
  params = param_shapes(model, inputs, used)
  inference_params = param_shapes(model, inputs, INFERENCE_OBJECTIVES)
  flops = {}
  if 'inference' in passes:
    flops['inference'] = flops_per_clip(model, inference_params, inputs, train=False,
                                        objectives=INFERENCE_OBJECTIVES)
  if 'training' in passes:
    flops['training'] = flops_per_clip(model, params, inputs, train=True,
                                       objectives=trained)
  return {'params': parameter_counts(params), 'training_objectives': trained,
          'inference_params': parameter_counts(inference_params)['total'],
          'flops': flops}


PROG = 'python -m avt_jax.models.summary'
USAGE = 'Parameter count and FLOPs per clip of the base AVT configuration.'
# The shortcut flags and the config field each sets (only when given: `--config.<field>` works too).
SHORTCUTS = {'size': 'model.size', 'fusion': 'model.fusion', 'fusion_layer': 'model.fusion_layer',
             'num_classes': 'data.num_classes'}


def define_flags(fv: flags.FlagValues, argv: Sequence[str] = ()) -> None:
  """The command's flags (`avt_jax.command_line`): shortcuts and the `--config.<field>` overrides
  that `argv` names."""
  flags.DEFINE_enum('size', 'base', sorted(build.SIZES), 'encoder size preset', flag_values=fv)
  flags.DEFINE_enum('fusion', 'bottleneck', FUSIONS, 'fusion type', flag_values=fv)
  flags.DEFINE_integer('fusion_layer', None, 'first fused layer (default: the base config, 8)',
                       flag_values=fv)
  flags.DEFINE_integer('num_classes', None, 'classes of the single label head (default: the base '
                       'config)', flag_values=fv)
  flags.DEFINE_integer('batch', 2, 'batch size to compile for', flag_values=fv)
  config_flags.DEFINE_config_dict('config', get_base_config(), 'the base config; override fields '
                                  'with --config.<field>=value', flag_values=fv,
                                  sys_argv=[PROG, *argv])


def config_from_flags(fv: flags.FlagValues) -> ml_collections.ConfigDict:
  """The base config with the `--config.<field>` overrides, then the shortcut flags given.

  Raises:
    SystemExit: (status 2) a shortcut and the config field it sets are both given.
  """
  config = fv.config
  for name, field in SHORTCUTS.items():
    if fv[name].present and f'config.{field}' in fv and fv[f'config.{field}'].present:
      command_line.usage_error(PROG, f'--{name} and --config.{field} set the same field; give one')
    if fv[name].present:
      value = {'class': fv[name].value} if name == 'num_classes' else fv[name].value
      section, key = field.split('.')
      config[section][key] = value
  return config


def main(argv: Sequence[str] | None = None) -> None:
  """Prints the summary of the config the command line (default: sys.argv[1:]) gives."""
  argv = sys.argv[1:] if argv is None else argv
  fv, _ = command_line.parse(PROG, USAGE, functools.partial(define_flags, argv=argv), argv)
  config = config_from_flags(fv)
  try:
    result = summarize(config, batch=fv.batch)
  except build.ConfigError as e:
    command_line.usage_error(PROG, str(e))
  m, inp = config.model, config.input
  print(f'AVT size={m.size} fusion={m.fusion} fusion_layer={m.fusion_layer} '
        f'n_bottlenecks={m.n_bottlenecks}; video {inp.num_frames}x{inp.image_size}x{inp.image_size} '
        f'tubelets {tuple(m.video_patch)}; audio {inp.audio_frames}x{inp.n_mels} patches '
        f'{tuple(m.audio_patch)}; classes {dict(config.data.num_classes)}')
  print('Parameters (classification and every trained objective):')
  width = max(len(k) for k in result['params'])
  for name, count in result['params'].items():
    print(f'  {name:<{width}}  {count:>13,d}  ({count / 1e6:8.2f} M)')
  print(f'Parameters used for inference (classification): {result["inference_params"]:,d} '
        f'({result["inference_params"] / 1e6:.2f} M)')
  print('FLOPs per clip (XLA cost analysis of the lowered forward pass; multiply-add = 2 FLOPs):')
  print(f'  inference (classification only): {result["flops"]["inference"] / 1e9:10.1f} GFLOPs')
  print(f'  training forward ({", ".join(result["training_objectives"])}): '
        f'{result["flops"]["training"] / 1e9:10.1f} GFLOPs')


if __name__ == '__main__':
  main()
