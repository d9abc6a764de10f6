"""Test setup: 8 simulated CPU devices, a shared compilation cache and a tiny AVT config."""

import importlib.util
import os
import tempfile

# 8 simulated devices for the sharding tests; tests use tiny models whose run time is dominated by
# compilation, so XLA's backend optimisations are turned down (outputs agree to ~1e-6).
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8 '
                      '--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# One persistent compilation cache per test process, inherited by the training subprocesses that
# tests start, so identical programs (same model, same mesh) compile once.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', tempfile.mkdtemp(prefix='avt_jax_jit_cache_'))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from avt_jax.default_config import MODEL_PRESETS, get_base_config  # noqa: E402


def fast_jit(fun, **kwargs):
  """jax.jit; on CPU with XLA options that compile the tests' tiny graphs ~4x faster (LLVM -O0,
  classic fusion emitters). They change how the code is generated, not what it computes."""
  if jax.default_backend() == 'cpu':
    kwargs['compiler_options'] = {'xla_backend_optimization_level': 0,
                                  'xla_cpu_use_fusion_emitters': False}
  return jax.jit(fun, **kwargs)


# Flags that shrink configs/demo.py for `python -m avt_jax.main` runs in tests (tests/test_main.py,
# tests/test_multihost.py) to the 'smoke' model preset (the demo's 0.48 s audio segments stay); the
# records come from --config.data.data_dir.
TINY_MAIN_FLAGS = [
    *[f'--config.model.{k}={v}' for k, v in MODEL_PRESETS['smoke'].items()
      if k != 'segment_seconds'],
    '--config.input.batch_size=8', '--config.input.eval_batch_size=8', '--config.train.log_every=2',
    '--config.train.checkpoint_every=2', '--config.data.synthetic=']


def demo_main_config(*flags: str) -> ml_collections.ConfigDict:
  """configs/demo.py with `TINY_MAIN_FLAGS` and `flags` ('--config.a.b=value') applied."""
  spec = importlib.util.spec_from_file_location(
      'demo_config', os.path.join(os.path.dirname(os.path.dirname(__file__)), 'configs/demo.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  for flag in TINY_MAIN_FLAGS + list(flags):
    key, value = flag.removeprefix('--config.').split('=')
    node = c
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = type(node[leaf])(value) if value else value
  return c


def tiny_config(**overrides) -> ml_collections.ConfigDict:
  """The 'smoke' model preset (2 layers, width 32) with 2 bottlenecks and 2 masked segments on
  4x32x32 video and 64x32 spectrograms, all objectives on."""
  c = get_base_config()
  c.data.name = 'tiny'
  c.data.num_classes = {'class': 5}
  c.model.update(MODEL_PRESETS['smoke'])
  c.model.update(dict(n_bottlenecks=2, num_segments=2))
  c.input.num_frames = 4
  c.input.image_size = 32
  c.input.min_resize = 36
  c.input.audio_frames = 64
  c.input.n_mels = 32
  c.input.batch_size = 8
  c.input.eval_batch_size = 8
  c.optim.warmup_steps = 1
  c.optim.learning_rate = 1e-3
  c.train.steps = 4
  c.train.log_every = 2
  c.train.checkpoint_every = 2
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def random_params(shapes, seed: int = 0):
  """Random parameters for abstract `shapes` (e.g. `jax.eval_shape(module.init, ...)`, boxed or
  not), no compile.

  Kernels are N(0, 1/fan_in), LayerNorm scales 1 + N(0, 0.01), everything else N(0, 0.01); the
  contrastive temperature is 0.1. Unlike the real init, the classifier kernel is non-zero, so
  classification sends gradients into the encoder.
  """
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    x = rng.normal(size=leaf.shape).astype(np.float32)
    name = path[-1].key
    if name == 'kernel':
      return x / np.sqrt(np.prod(leaf.shape[:-1]))
    if name == 'scale':
      return 1.0 + 0.1 * x
    if name == 'log_inverse_temperature':
      return np.float32(np.log(10.0))
    return 0.1 * x

  return jax.tree_util.tree_map_with_path(fill, nn.meta.unbox(shapes))
