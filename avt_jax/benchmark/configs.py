"""The benchmark's model configurations and the memory and speed controls applied to them."""

import dataclasses

import ml_collections
import numpy as np

from avt_jax.default_config import get_base_config
from avt_jax.models import build
from avt_jax.models.transformer import DEFAULT_CHUNK_SIZE

NUM_CLASSES = 309  # VGGSound


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """One benchmark configuration (per modality encoder; 16x16 audio patches, 2x16x16 tubelets)."""
  size: str  # encoder preset in avt_jax.models.build.SIZES
  fusion_layer: int
  num_frames: int
  image_size: int
  audio_frames: int  # a multiple of the 16-frame patch
  batch_size: int


# The benchmark configurations (our design). `tiny` is specified with 200 audio frames, which
# 16-frame patches do not tile: we pad to 208 (13 x 8 = 104 patches; `--audio_frames` changes it). A stride would give overlapping patches instead, more tokens and no
# masked-audio objectives.
BENCHMARKS = {
    'tiny': Benchmark('tiny', 3, 8, 112, 208, 2),  # 192 / 3 heads / 768 MLP / 6 layers
    'small': Benchmark('small', 8, 16, 160, 400, 2),  # 384 / 6 / 1536 / 12
    'base': Benchmark('base', 8, 32, 224, 800, 1),  # 768 / 12 / 3072 / 12 (ViT-B)
}
# (frames, image size) of the fusion study, in order of video tokens: 196, 392, 800, 1600, 3136.
FUSION_STUDY_VIDEO = ((8, 112), (16, 112), (16, 160), (32, 160), (32, 224))
FUSION_STUDY_AUDIO_FRAMES = 800
PAPER_SCALE = Benchmark('base', 8, 32, 224, 800, 1)  # the paper's base model at 32 x 224


@dataclasses.dataclass(frozen=True)
class Controls:
  """Memory and speed controls (`config.model` fields) applied to a benchmark config.

  The defaults are the plain model (`avt_jax.models.summary.plain`) in float32.
  """
  dtype: str = 'float32'
  attention: str = 'xla'
  attention_chunk_size: int = DEFAULT_CHUNK_SIZE
  remat_policy: str = 'none'
  scan_layers: bool = False

  @classmethod
  def of(cls, model: ml_collections.ConfigDict) -> 'Controls':
    """The controls a `config.model` holds."""
    return cls(model.dtype, model.attention_implementation, int(model.attention_chunk_size),
               model.remat_policy, bool(model.scan_layers))

  def apply(self, model: ml_collections.ConfigDict) -> None:
    """Sets these controls on a `config.model`, in place."""
    model.update(dtype=self.dtype, attention_implementation=self.attention,
                 attention_chunk_size=self.attention_chunk_size, remat_policy=self.remat_policy,
                 scan_layers=self.scan_layers)

  def plain(self) -> 'Controls':
    """The same dtype without memory controls: the reference for model FLOPs and memory."""
    return Controls(dtype=self.dtype)

  def describe(self) -> str:
    """E.g. 'bfloat16, attention=chunked/64, remat=dots, scan'."""
    parts = [self.dtype, f'attention={self.attention}']
    if self.attention == 'chunked':
      parts[-1] += f'/{self.attention_chunk_size}'
    if self.remat_policy != 'none':
      parts.append(f'remat={self.remat_policy}')
    if self.scan_layers:
      parts.append('scan')
    return ', '.join(parts)


def benchmark_config(bench: Benchmark, controls: Controls = Controls(), *,
                     objectives: str = 'classification', fusion: str = 'bottleneck',
                     n_bottlenecks: int = 4) -> ml_collections.ConfigDict:
  """The full training config of a benchmark (classification only unless objectives='all').

  Args:
    bench: model size, input size and batch size.
    controls: dtype, attention, remat and scan settings.
    objectives: 'classification' or 'all' (the six objectives with the base config's weights).
    fusion: one of FUSIONS.
    n_bottlenecks: bottleneck tokens.

  Raises:
    ValueError: for other `objectives`, or a config `build.validate` rejects.
  """
  if objectives not in ('classification', 'all'):
    raise ValueError(f"--objectives: expected 'classification' or 'all', got {objectives!r}.")
  c = get_base_config()
  c.data.name = 'benchmark'
  c.data.num_classes = {'class': NUM_CLASSES}
  c.model.update(size=bench.size, fusion=fusion, fusion_layer=bench.fusion_layer,
                 n_bottlenecks=n_bottlenecks, stochastic_depth=0.0)
  controls.apply(c.model)
  c.input.update(num_frames=bench.num_frames, image_size=bench.image_size,
                 audio_frames=bench.audio_frames, n_mels=128, batch_size=bench.batch_size)
  if objectives == 'classification':
    for name in c.loss.weights:
      c.loss.weights[name] = 1.0 if name == 'classification' else 0.0
  c.optim.warmup_steps = 10
  c.train.steps = 1000
  build.validate(c)
  return c


def token_counts(config: ml_collections.ConfigDict) -> dict[str, int]:
  """Tokens per example and modality (CLS included)."""
  return {m: int(np.prod(g)) + 1 for m, g in build.token_grids(config).items()
          if m in config.model.modalities}
