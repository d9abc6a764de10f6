"""Train-step benchmark (step time, FLOPs, MFU, memory, compile time) and the fusion scaling study.

    python -m avt_jax.benchmark [--configs=tiny,small,base] [--steps=5] [--repeats=3]
        [--batch_size=N] [--dtype=float32|bfloat16] [--attention=xla|chunked|cudnn]
        [--attention_chunk_size=128] [--remat_policy=none|dots|full] [--scan_layers]
        [--objectives=classification|all] [--output_dir=benchmark_results]
    python -m avt_jax.benchmark --mode=fusion [--fusion_size=small] [--paper_scale] ...

`--mode=train` (default) first measures the machine's matmul peak for the dtype in use (the best
of square matmuls of a few sizes), then for each benchmark config (`BENCHMARKS`) compiles the train
step (`avt_jax.train_step.make_train_step`: forward, backward, AdamW update) and reports

  - step time: median over `--steps` timed steps after compilation and one warm-up step, in each of
    `--repeats` rounds;
  - model FLOPs per step: XLA's cost analysis of the *plain* step (xla attention, no remat, no scan)
    as lowered, before backend passes: recomputation by remat or chunked attention does not count as
    useful work, loops (scan) are not under-counted, and the count is the same on every backend (on
    an H100, XLA's analysis of the *compiled* GPU program reported 1606 of the 2943 GFLOP of the base
    step that the lowered program and a hand count give);
  - achieved FLOP/s = model FLOPs / step time, and MFU = achieved / matmul peak, where the peak is
    the best sustained matmul throughput measured in the whole run: at the start and after every
    timed step (one block of products), so that a moment when the machine was busy with other work
    can only lower the MFU, never raise it. For bfloat16 the float32 peak is measured as well and
    `mfu_vs_float32_peak` uses it. `cores_used` (process CPU time / wall time during the steps) shows
    how much of the machine the step had;
  - peak memory of the compiled step (arguments + outputs - donated + temporaries, XLA's memory
    analysis), for the configured controls and for the plain step;
  - trace (lowering) and compile time, with the persistent compilation cache off.

`--mode=fusion` measures bottleneck vs concat vs late fusion as the number of video tokens grows
(`FUSION_STUDY_VIDEO`: 8 -> 32 frames, 112 -> 224 pixels) at fixed audio (800 x 128): FLOPs, peak
memory and step time per fusion, and with `--paper_scale` the base model at 32 x 224 (paper scale).

`--mode=input --config_file=configs/demo.py [--data_dir=... | --synthetic_clips=N]` compares the
examples per second the training input pipeline (`avt_jax.input.make_train_iterator`) delivers with
what the train step of that config consumes (`--step_batch_size` and the control flags apply to the
step). `--synthetic_clips` writes random clips at the config's scale first (e.g. for the paper-scale
configs without their datasets).

Each mode writes `<mode>.json`, `<mode>.md` (a markdown table) and `<mode>.png` to `--output_dir`.
The benchmark runs on one device (the first of `jax.devices()`).
"""

import argparse
import dataclasses
import json
import os
import platform
import resource
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from avt_jax import train_step
from avt_jax.default_config import get_base_config
from avt_jax.models import build
from avt_jax.models.avt import OBJECTIVES
from avt_jax.models.fusion import FUSIONS, REMAT_POLICIES
from avt_jax.models.transformer import ATTENTION_IMPLEMENTATIONS, DEFAULT_CHUNK_SIZE

GIB = 2.0 ** 30
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


# `tiny` is specified with 200 audio frames, which 16-frame patches do not tile: we pad to 208
# (13 x 8 = 104 patches; `--audio_frames` changes it). A stride would give overlapping patches instead,
# more tokens and no masked-audio objectives.
BENCHMARKS = {
    'tiny': Benchmark('tiny', 3, 8, 112, 208, 2),  # 192 / 3 heads / 768 MLP / 6 layers
    'small': Benchmark('small', 8, 16, 160, 400, 2),  # 384 / 6 / 1536 / 12
    'base': Benchmark('base', 8, 32, 224, 800, 1),  # 768 / 12 / 3072 / 12 (ViT-B)
}
# (frames, image size) of the fusion study, in order of video tokens: 196, 392, 800, 1600, 3136.
FUSION_STUDY_VIDEO = ((8, 112), (16, 112), (16, 160), (32, 160), (32, 224))
FUSION_STUDY_AUDIO_FRAMES = 800
PAPER_SCALE = Benchmark('base', 8, 32, 224, 800, 1)

# Square matmul sizes tried for the peak, per platform.
PEAK_SIZES = {'cpu': (512, 1024, 2048), 'gpu': (4096, 8192), 'tpu': (4096, 8192)}
# Vendor dense bfloat16 peaks (FLOP/s) by `device_kind` substring, first match wins; reported next to
# the measured peak on accelerators.
NOMINAL_BFLOAT16_PEAKS = (
    ('H200', 989e12), ('H100 PCIe', 756e12), ('H100', 989e12), ('A100', 312e12), ('L40S', 362e12),
    ('L4', 121e12), ('A10G', 70e12), ('TPU v5 lite', 197e12), ('TPU v5e', 197e12), ('TPU v5p', 459e12),
    ('TPU v5', 459e12), ('TPU v4', 275e12), ('TPU v6', 918e12))


def nominal_peak(device_kind: str, dtype: str) -> float | None:
  """The vendor's dense bfloat16 peak of an accelerator (None for CPUs, float32, unknown devices)."""
  if dtype != 'bfloat16':
    return None
  for name, flops in NOMINAL_BFLOAT16_PEAKS:
    if name.lower() in device_kind.lower():
      return flops
  return None


# ----------------------------------------------------------------------------- configurations


@dataclasses.dataclass(frozen=True)
class Controls:
  """Memory and speed controls (`config.model` fields) applied to a benchmark config."""
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
  """
  if objectives not in ('classification', 'all'):
    raise ValueError(f"--objectives: expected 'classification' or 'all', got {objectives!r}.")
  c = get_base_config()
  c.data.name = 'benchmark'
  c.data.num_classes = {'class': NUM_CLASSES}
  c.model.size = bench.size
  c.model.fusion = fusion
  c.model.fusion_layer = bench.fusion_layer
  c.model.n_bottlenecks = n_bottlenecks
  c.model.stochastic_depth = 0.0
  controls.apply(c.model)
  c.input.num_frames = bench.num_frames
  c.input.image_size = bench.image_size
  c.input.audio_frames = bench.audio_frames
  c.input.n_mels = 128
  c.input.batch_size = bench.batch_size
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


# ----------------------------------------------------------------------------- measurements


def _matmul(size: int, dtype: str, accumulate: str | None = None
            ) -> tuple[Callable[[], jax.Array], float]:
  """A compiled [size, size] @ [size, size] product and its FLOPs; the output is in `accumulate`
  (e.g. float32 for bfloat16 inputs), else in `dtype`."""
  a = jax.random.normal(jax.random.key(0), (size, size), jnp.dtype(dtype))
  b = jax.random.normal(jax.random.key(1), (size, size), jnp.dtype(dtype))
  product = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=accumulate)
                    ).lower(a, b).compile()
  return (lambda: product(a, b)), 2.0 * size ** 3


def _seconds(fn: Callable[[], Any]) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


class PeakProbe:
  """Measures the matmul peak (FLOP/s) of one dtype and re-measures it between train steps.

  A measurement is the throughput of a block of back-to-back products lasting about
  `block_seconds` (sustained, not a burst). Products narrower than float32 are measured both with
  outputs in that dtype and accumulated into float32 outputs (`preferred_element_type`, the form the
  model's attention uses): CPUs with AMX or AVX512-BF16 only run the second form at full speed
  (on a Sapphire Rapids VM: ~1000 vs ~170 GFLOP/s in bfloat16). The start value is the best
  product's median over `repeats` blocks; `peak` is the highest measurement so far (the probes
  between train steps included), so a busy machine can only lower the MFU computed from it, never
  raise it.
  """

  def __init__(self, dtype: str, sizes: Sequence[int] | None = None, repeats: int = 3,
               block_seconds: float = 0.2):
    sizes = sizes or PEAK_SIZES.get(jax.default_backend()) or (4096, 8192)
    outputs = (None,) if jnp.dtype(dtype).itemsize >= 4 else (None, 'float32')
    self.dtype = dtype
    self.by_product, products = {}, {}  # '<size>' or '<size>->float32' -> FLOP/s
    for size in sizes:
      for accumulate in outputs:
        name = f'{size}->{accumulate}' if accumulate else str(size)
        fn, flops = _matmul(size, dtype, accumulate)
        fn()
        count = max(1, int(round(block_seconds / _seconds(fn))))
        products[name] = (fn, flops, count)
        self.by_product[name] = float(
            np.median([self._block(fn, flops, count) for _ in range(repeats)]))
    self.product = max(self.by_product, key=self.by_product.get)
    self._product = products[self.product]
    self.samples: list[float] = [self.by_product[self.product]]

  @property
  def peak(self) -> float:
    return max(self.samples)

  @staticmethod
  def _block(fn: Callable[[], jax.Array], flops: float, count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
      out = fn()
    jax.block_until_ready(out)
    return flops * count / (time.perf_counter() - start)

  def sample(self) -> float:
    """One block of products of the best size; the FLOP/s are recorded in `samples`."""
    rate = self._block(*self._product)
    self.samples.append(rate)
    return rate


@dataclasses.dataclass
class CompiledStep:
  """A train step compiled from shapes, with XLA's analyses and what running it needs."""
  run: Callable  # (state, batch) -> (state, metrics); donates the state
  init: Callable[[], Any]  # () -> initial train state
  batch: dict[str, np.ndarray]
  trace_seconds: float
  compile_seconds: float
  flops: float  # XLA cost analysis of the lowered step (before backend passes; loop bodies once)
  memory: dict[str, float]  # bytes


def random_batch(config: ml_collections.ConfigDict, seed: int = 0) -> dict[str, np.ndarray]:
  """Random inputs and one-hot labels of the configured shapes."""
  rng = np.random.default_rng(seed)
  batch = build.example_inputs(config, int(config.input.batch_size))
  batch['video'] = rng.uniform(-1, 1, batch['video'].shape).astype(np.float32)
  batch['audio'] = rng.normal(size=batch['audio'].shape).astype(np.float32)
  for head, classes in config.data.num_classes.items():
    labels = rng.integers(0, classes, batch['mask'].shape[0])
    batch[f'labels/{head}'] = np.eye(classes, dtype=np.float32)[labels]
  return batch


def memory_stats(compiled) -> dict[str, float]:
  """Bytes of the compiled program: arguments, outputs, donated (alias), temporaries and the peak."""
  stats = compiled.memory_analysis()
  out = {'arguments': stats.argument_size_in_bytes, 'outputs': stats.output_size_in_bytes,
         'aliased': stats.alias_size_in_bytes, 'temporaries': stats.temp_size_in_bytes}
  estimate = out['arguments'] + out['outputs'] - out['aliased'] + out['temporaries']
  reported = getattr(stats, 'peak_memory_in_bytes', 0) or 0
  out['peak'] = max(estimate, reported)
  return {k: float(v) for k, v in out.items()}


def lower_train_step(config: ml_collections.ConfigDict):
  """The train step of `config` for one device (state donated), lowered from shapes only.

  Returns:
    (lowered step, random batch, init() -> train state, trace seconds).
  """
  model, tx, schedule, init = train_step.setup(config)
  step = jax.jit(train_step.make_train_step(config, model, tx, schedule), donate_argnums=(0,))
  batch = random_batch(config)
  rng = jax.random.PRNGKey(config.seed)
  state = jax.eval_shape(init, rng)
  shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
  start = time.perf_counter()
  lowered = step.lower(state, shapes)
  return lowered, batch, lambda: jax.jit(init)(rng), time.perf_counter() - start


def compile_train_step(config: ml_collections.ConfigDict) -> CompiledStep:
  """Compiles the lowered train step, so FLOPs, memory and compile time are known before anything
  is allocated."""
  lowered, batch, init, trace_seconds = lower_train_step(config)
  start = time.perf_counter()
  compiled = lowered.compile()
  return CompiledStep(compiled, init, batch, trace_seconds, time.perf_counter() - start,
                      float(lowered.cost_analysis()['flops']), memory_stats(compiled))


def time_steps(step: CompiledStep, steps: int, probes: Sequence[PeakProbe] = (),
               state: Any = None) -> tuple[Any, dict[str, list]]:
  """Times `steps` train steps, each followed by one sample of every probe.

  Without `state`, initialises it and runs one untimed warm-up step first. Returns the final state
  (pass it back for further rounds) and {'step_seconds': [...], 'cpu_seconds': [...]} (the process's
  CPU time during each step: about cores x step time when nothing else runs on the machine).
  """
  batch = jax.device_put(step.batch)
  if state is None:
    state, metrics = step.run(step.init(), batch)
    jax.block_until_ready(metrics)
  times, cpu = [], []
  for _ in range(steps):
    start, start_cpu = time.perf_counter(), time.process_time()
    state, metrics = step.run(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
    cpu.append(time.process_time() - start_cpu)
    for probe in probes:
      probe.sample()
  if not np.isfinite(float(metrics['loss'])):
    raise FloatingPointError(f'benchmark: the train step produced a non-finite loss {metrics["loss"]}.')
  return state, {'step_seconds': times, 'cpu_seconds': cpu}


def available_memory_bytes() -> float:
  """MemAvailable of /proc/meminfo (inf where unknown)."""
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          return float(line.split()[1]) * 1024
  except OSError:
    pass
  return float('inf')


def max_rss_bytes() -> float:
  """High-water mark of this process's resident memory."""
  return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _spread(values: Sequence[float]) -> dict[str, float]:
  return {'median': float(np.median(values)), 'min': float(np.min(values)),
          'max': float(np.max(values))}


def measure(config: ml_collections.ConfigDict, *, steps: int, repeats: int,
            probes: Sequence[PeakProbe] = (), time_it: bool = True,
            log: Callable[[str], None] = print) -> dict:
  """Compiles the plain and the configured train step of `config`, and times the configured one.

  Returns:
    A JSON-able dict: controls, tokens, `model_flops` (plain step), `memory` / `plain_memory`
    (bytes), compile and trace seconds, and when timed `rounds` and the spreads (median, min, max over
    rounds) `step_seconds`, `achieved_flops` and `cores_used`. `add_mfu` adds the MFU.
  """
  controls = Controls.of(config.model)
  result = {'controls': dataclasses.asdict(controls), 'controls_text': controls.describe(),
            'batch_size': int(config.input.batch_size), 'tokens': token_counts(config)}
  plain_config = config.copy_and_resolve_references()
  plain = controls.plain()
  plain.apply(plain_config.model)
  reference = compile_train_step(plain_config)
  result['model_flops'] = reference.flops
  result['plain_memory'] = reference.memory
  result['plain_compile_seconds'] = reference.compile_seconds
  result['plain_trace_seconds'] = reference.trace_seconds
  log(f'  plain step: {reference.flops / 1e9:.1f} GFLOP, peak memory '
      f'{reference.memory["peak"] / GIB:.2f} GiB, compiled in {reference.compile_seconds:.1f} s')
  step = reference if plain == controls else compile_train_step(config)
  del reference
  result.update(flops_with_controls=step.flops, memory=step.memory, compile_seconds=step.compile_seconds,
                trace_seconds=step.trace_seconds)
  if time_it and step.memory['peak'] > 0.9 * available_memory_bytes():
    log(f'  skipping the timed run: needs {step.memory["peak"] / GIB:.1f} GiB, '
        f'{available_memory_bytes() / GIB:.1f} GiB available')
    time_it = False
  if not time_it:
    return result
  rounds, state = [], None
  for _ in range(repeats):
    state, timed = time_steps(step, steps, probes, state)
    seconds = float(np.median(timed['step_seconds']))
    rounds.append({**timed, 'median_step_seconds': seconds,
                   'achieved_flops': result['model_flops'] / seconds,
                   'cores_used': float(np.sum(timed['cpu_seconds']) / np.sum(timed['step_seconds']))})
  del state
  result['rounds'] = rounds
  for key, name in (('median_step_seconds', 'step_seconds'), ('achieved_flops', 'achieved_flops'),
                    ('cores_used', 'cores_used')):
    result[name] = _spread([r[key] for r in rounds])
  result['max_rss_bytes'] = max_rss_bytes()
  return result


def add_mfu(results: Sequence[dict], peak: float, float32_peak: float) -> None:
  """Adds `mfu` and `mfu_vs_float32_peak` (spreads over rounds) to the timed results, in place."""
  for r in results:
    if 'rounds' in r:
      r['mfu'] = _spread([x['achieved_flops'] / peak for x in r['rounds']])
      r['mfu_vs_float32_peak'] = _spread([x['achieved_flops'] / float32_peak for x in r['rounds']])


# ----------------------------------------------------------------------------- modes


def machine_description() -> dict[str, Any]:
  """Backend, device and host facts recorded with every result."""
  device = jax.devices()[0]
  info = {'backend': jax.default_backend(), 'device_kind': device.device_kind,
          'device_count': jax.device_count(), 'cpu_count': os.cpu_count(),
          'platform': platform.platform(), 'python': sys.version.split()[0],
          'jax': jax.__version__, 'memory_available_gib': available_memory_bytes() / GIB}
  try:
    with open('/proc/cpuinfo') as f:
      names = [line.split(':', 1)[1].strip() for line in f if line.startswith('model name')]
    info['cpu'] = names[0] if names else platform.processor()
  except OSError:
    info['cpu'] = platform.processor()
  return info


def run_train(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict:
  """The `train` mode: peak, then every requested benchmark config."""
  controls = _controls(args)
  log(f'Measuring the {args.dtype} matmul peak ...')
  probe = PeakProbe(args.dtype)
  probes = [probe] if args.dtype == 'float32' else [probe, PeakProbe('float32')]
  log(f'  start: ' + ', '.join(f'{p.dtype} {p.peak / 1e9:.1f} GFLOP/s (product {p.product})' for p in probes))
  results = []
  for name in args.configs:
    bench = _override(BENCHMARKS[name], args)
    config = benchmark_config(bench, controls, objectives=args.objectives)
    log(f'{name}: {dataclasses.asdict(bench)}, {controls.describe()}, objectives={args.objectives}')
    result = measure(config, steps=args.steps, repeats=args.repeats, probes=probes,
                     time_it=not args.compile_only, log=log)
    result.update(name=name, benchmark=dataclasses.asdict(bench), objectives=args.objectives)
    add_mfu([result], probe.peak, probes[-1].peak)
    _log_result(result, log)
    results.append(result)
  add_mfu(results, probe.peak, probes[-1].peak)  # with the final (highest) peaks
  nominal = nominal_peak(jax.devices()[0].device_kind, args.dtype)
  for r in results:
    if nominal and 'rounds' in r:
      r['mfu_vs_nominal_peak'] = _spread([x['achieved_flops'] / nominal for x in r['rounds']])
  return {'mode': 'train', 'machine': machine_description(), 'dtype': args.dtype,
          'peak': _peak_report(probe), 'float32_peak': _peak_report(probes[-1]),
          'nominal_peak': nominal, 'command': ' '.join(sys.argv), 'results': results}


def _peak_report(probe: PeakProbe) -> dict:
  return {'dtype': probe.dtype, 'flops': probe.peak, 'product': probe.product,
          'start_by_product': probe.by_product, 'samples': probe.samples}


def run_fusion(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict:
  """The `fusion` mode: bottleneck vs concat vs late as the video grows, fixed audio."""
  controls = _controls(args)
  probe = PeakProbe(args.dtype)
  base = BENCHMARKS[args.fusion_size]
  points = [(args.fusion_size, dataclasses.replace(
      base, num_frames=f, image_size=s, audio_frames=FUSION_STUDY_AUDIO_FRAMES,
      batch_size=args.batch_size or base.batch_size)) for f, s in FUSION_STUDY_VIDEO]
  if args.paper_scale:
    points.append(('paper', PAPER_SCALE))
  results = []
  for label, bench in points:
    for fusion in FUSIONS:
      config = benchmark_config(bench, controls, objectives=args.objectives, fusion=fusion)
      log(f'{label} {fusion}: {bench.num_frames}x{bench.image_size}^2 video, '
          f'{bench.audio_frames} audio frames, tokens {token_counts(config)}')
      time_it = not args.compile_only and (label != 'paper' or args.paper_step_time)
      result = measure(config, steps=args.steps, repeats=args.repeats, probes=[probe],
                       time_it=time_it, log=log)
      result.update(point=label, fusion=fusion, benchmark=dataclasses.asdict(bench))
      _log_result(result, log)
      results.append(result)
  add_mfu(results, probe.peak, probe.peak)
  return {'mode': 'fusion', 'machine': machine_description(), 'dtype': args.dtype,
          'peak': _peak_report(probe), 'command': ' '.join(sys.argv),
          'results': results, 'ratios': fusion_ratios(results)}


def fusion_ratios(results: Sequence[dict]) -> dict[str, dict[str, float]]:
  """Concat / bottleneck and late / bottleneck ratios (FLOPs, memory, step time) per study point."""
  ratios = {}
  by_point: dict[str, dict[str, dict]] = {}
  for r in results:
    key = r['point'] if r['point'] == 'paper' else f'{r["point"]}:{r["tokens"]["video"]}'
    by_point.setdefault(key, {})[r['fusion']] = r
  for key, fusions in by_point.items():
    if 'bottleneck' not in fusions:
      continue
    ref = fusions['bottleneck']
    for other in ('concat', 'late'):
      if other not in fusions:
        continue
      r = fusions[other]
      entry = {'flops': r['model_flops'] / ref['model_flops'],
               'peak_memory': r['plain_memory']['peak'] / ref['plain_memory']['peak']}
      if 'step_seconds' in r and 'step_seconds' in ref:
        entry['step_time'] = r['step_seconds']['median'] / ref['step_seconds']['median']
      ratios[f'{key} {other}/bottleneck'] = entry
  return ratios


def load_config_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """`get_config(arg)` of an ml_collections config file such as configs/demo.py."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location('benchmark_config_file', path)
  if spec is None:
    raise FileNotFoundError(f'--config_file: cannot load {path!r}.')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def write_synthetic_records(config: ml_collections.ConfigDict, folder: str, clips: int,
                            seed: int = 0) -> str:
  """Writes `clips` random training clips at the config's scale in the prepared-record format.

  Frames are stored with short side `input.min_resize` (4:3), 25 fps, as JPEGs of smooth random
  images with noise (typical JPEG sizes, unlike pure noise); log-mels are random. Each clip is long
  enough for a training window (`num_frames` x `frame_stride` frames, `audio_frames` spectrogram
  frames). Returns `folder`, which then holds `train-*.tfrecord` and `stats.json`.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from avt_jax import records  # pylint: disable=g-import-not-at-top
  from avt_jax.input import pipeline  # pylint: disable=g-import-not-at-top
  inp = config.input
  fps, audio_fps = 25.0, 100.0
  seconds = max(((inp.num_frames - 1) * inp.frame_stride + 1) / fps, inp.audio_frames / audio_fps)
  seconds += 0.5
  height, width = int(inp.min_resize), int(round(inp.min_resize * 4 / 3))
  rng = np.random.default_rng(seed)
  heads = {h: int(config.data.num_classes[h]) for h in config.data.label_heads}
  os.makedirs(folder, exist_ok=True)
  shards = max(1, min(8, clips))
  writers = [tf.io.TFRecordWriter(os.path.join(folder, f'train-{i:05d}-of-{shards:05d}.tfrecord'))
             for i in range(shards)]
  for index in range(clips):
    coarse = rng.uniform(0, 255, (4, 6, 3)).astype(np.float32)
    base = tf.image.resize(coarse[None], (height, width), method='bicubic')[0].numpy()
    frames = []
    for _ in range(int(seconds * fps)):
      image = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
      frames.append(tf.io.encode_jpeg(image, quality=90).numpy())
    clip = records.Clip(
        clip_id=f'synthetic_{index:06d}', source=f'synthetic_{index:06d}.mp4', start=0.0,
        end=seconds, labels={h: [int(rng.integers(n))] for h, n in heads.items()},
        jpeg_frames=frames, fps=fps, height=height, width=width,
        logmel=rng.normal(size=(int(seconds * audio_fps), inp.n_mels)).astype(np.float32),
        audio_fps=audio_fps)
    writers[index % shards].write(records.encode_clip(clip))
  for writer in writers:
    writer.close()
  with open(os.path.join(folder, pipeline.STATS_FILE), 'w') as f:
    json.dump({'logmel_mean': 0.0, 'logmel_std': 1.0, 'n_mels': int(inp.n_mels),
               'num_classes': heads, 'num_clips': {'train': clips}}, f)
  return folder


def run_input(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict:
  """The `input` mode: examples/s of the training input pipeline vs the train step's consumption."""
  from avt_jax import input as input_lib  # pylint: disable=g-import-not-at-top
  config = load_config_file(args.config_file, args.config_arg)
  if args.batch_size:
    config.input.batch_size = args.batch_size
  data_dir = args.data_dir or config.data.data_dir
  if args.synthetic_clips:
    data_dir = write_synthetic_records(config, os.path.join(args.output_dir, 'synthetic_records'),
                                       args.synthetic_clips)
  elif not data_dir and config.data.synthetic == 'demo':
    from avt_jax.prep import demo_data  # pylint: disable=g-import-not-at-top
    data_dir = demo_data.ensure_demo_data(config.data.cache_dir or None)
  if not data_dir:
    raise ValueError('--mode=input: pass --data_dir (prepared records), --synthetic_clips, or a '
                     'config with data.data_dir / data.synthetic.')
  batch_size = int(config.input.batch_size)
  batches = input_lib.make_train_iterator(config, data_dir, seed=0)
  next(batches)  # builds the pipeline and fills the prefetch buffer
  start = time.perf_counter()
  for _ in range(args.input_batches):
    next(batches)
  input_seconds = (time.perf_counter() - start) / args.input_batches
  del batches
  log(f'input pipeline: {batch_size / input_seconds:.2f} examples/s ({input_seconds:.3f} s per '
      f'batch of {batch_size}, {args.input_batches} batches)')

  step_config = config.copy_and_resolve_references()
  controls = _controls(args)
  controls.apply(step_config.model)
  step_config.input.batch_size = args.step_batch_size or batch_size
  step = compile_train_step(step_config)
  result = {'config_file': args.config_file, 'config_arg': args.config_arg, 'data_dir': data_dir,
            'batch_size': batch_size, 'input_seconds_per_batch': input_seconds,
            'input_examples_per_second': batch_size / input_seconds,
            'step_batch_size': int(step_config.input.batch_size),
            'step_controls': controls.describe(), 'step_memory': step.memory}
  if step.memory['peak'] > 0.9 * available_memory_bytes():
    log(f'train step not timed: needs {step.memory["peak"] / GIB:.1f} GiB')
  else:
    _, timed = time_steps(step, args.steps)
    step_seconds = float(np.median(timed['step_seconds']))
    result.update(step_seconds=timed['step_seconds'],
                  step_examples_per_second=result['step_batch_size'] / step_seconds,
                  ratio=result['input_examples_per_second'] * step_seconds / result['step_batch_size'])
    log(f'train step: {result["step_examples_per_second"]:.2f} examples/s ({step_seconds:.3f} s per '
        f'step of {result["step_batch_size"]}); input / step throughput: {result["ratio"]:.2f}')
  return {'mode': 'input', 'machine': machine_description(), 'command': ' '.join(sys.argv),
          'results': [result]}


def _controls(args: argparse.Namespace) -> Controls:
  return Controls(args.dtype, args.attention, args.attention_chunk_size, args.remat_policy,
                  args.scan_layers)


def _override(bench: Benchmark, args: argparse.Namespace) -> Benchmark:
  changes = {k: getattr(args, k) for k in ('batch_size', 'audio_frames') if getattr(args, k)}
  return dataclasses.replace(bench, **changes)


def _log_result(r: dict, log: Callable[[str], None]) -> None:
  text = (f'  model {r["model_flops"] / 1e9:.1f} GFLOP/step; peak memory {r["memory"]["peak"] / GIB:.2f} '
          f'GiB (plain {r["plain_memory"]["peak"] / GIB:.2f}); compile {r["compile_seconds"]:.1f} s')
  if 'mfu' in r:
    text += (f'; step {r["step_seconds"]["median"]:.3f} s, {r["achieved_flops"]["median"] / 1e9:.1f} '
             f'GFLOP/s, MFU {100 * r["mfu"]["median"]:.1f}% [{100 * r["mfu"]["min"]:.1f}-'
             f'{100 * r["mfu"]["max"]:.1f}] (peak so far), {r["cores_used"]["median"]:.2f} cores busy')
  log(text)


# ----------------------------------------------------------------------------- reports


def _fmt_range(spread: dict, scale: float = 1.0, digits: int = 2, suffix: str = '') -> str:
  return (f'{spread["median"] * scale:.{digits}f}{suffix} '
          f'[{spread["min"] * scale:.{digits}f}-{spread["max"] * scale:.{digits}f}]')


def markdown(report: dict) -> str:
  """The report as markdown: machine line, then one table."""
  m = report['machine']
  lines = [f'Machine: {m.get("cpu", "")} ({m["cpu_count"]} cores), backend {m["backend"]} '
           f'({m["device_kind"]}), jax {m["jax"]}.', '']
  if report['mode'] == 'train':
    lines.append(f'{report["dtype"]} matmul peak (best sustained block of the run): '
                 f'{report["peak"]["flops"] / 1e9:.1f} GFLOP/s; float32: '
                 f'{report["float32_peak"]["flops"] / 1e9:.1f} GFLOP/s. Values are the median '
                 f'[min-max] over rounds; cores = process CPU time / wall time during the steps.')
    if report.get('nominal_peak'):
      nominal = [f'{r["name"]} {_fmt_range(r["mfu_vs_nominal_peak"], 100, 1, "%")}'
                 for r in report['results'] if 'mfu_vs_nominal_peak' in r]
      lines.append(f'MFU against the vendor bfloat16 peak ({report["nominal_peak"] / 1e12:.0f} '
                   f'TFLOP/s): {", ".join(nominal)}.')
    lines.append('')
    lines.append('| config | controls | batch | tokens (video+audio) | step time s | model GFLOP/step '
                 '| achieved GFLOP/s | MFU | MFU vs f32 peak | cores | peak memory GiB (plain) '
                 '| compile s (plain) |')
    lines.append('|' + '---|' * 12)
    for r in report['results']:
      lines.append(_train_row(r))
  elif report['mode'] == 'fusion':
    lines.append('| point | video frames x size | tokens (video+audio) | fusion | model GFLOP/step '
                 '| peak memory GiB | step time s |')
    lines.append('|' + '---|' * 7)
    for r in report['results']:
      b = r['benchmark']
      lines.append(
          f'| {r["point"]} | {b["num_frames"]} x {b["image_size"]} | '
          f'{r["tokens"].get("video", 0)}+{r["tokens"].get("audio", 0)} | {r["fusion"]} | '
          f'{r["model_flops"] / 1e9:.1f} | {r["plain_memory"]["peak"] / GIB:.2f} | '
          f'{_fmt_range(r["step_seconds"], digits=3) if "step_seconds" in r else "-"} |')
    lines += ['', '| ratio | FLOPs | peak memory | step time |', '|---|---|---|---|']
    for key, ratio in report['ratios'].items():
      step = f'{ratio["step_time"]:.2f}' if 'step_time' in ratio else '-'
      lines.append(f'| {key} | {ratio["flops"]:.2f} | {ratio["peak_memory"]:.2f} | {step} |')
  else:
    lines.append('| config | input batch | input examples/s | train step (batch, controls) '
                 '| train step examples/s | input / step |')
    lines.append('|---|---|---|---|---|---|')
    for r in report['results']:
      name = r['config_file'] + (f':{r["config_arg"]}' if r.get('config_arg') else '')
      timed = 'ratio' in r
      step = f'{r["step_examples_per_second"]:.3f}' if timed else '-'
      ratio = f'{r["ratio"]:.1f}' if timed else '-'
      lines.append(f'| {name} | {r["batch_size"]} | {r["input_examples_per_second"]:.2f} | '
                   f'{r["step_batch_size"]}, {r["step_controls"]} | {step} | {ratio} |')

  return '\n'.join(lines) + '\n'


def _train_row(r: dict) -> str:
  timed = 'mfu' in r
  dash = '-'
  cells = [r['name'], r['controls_text'], str(r['batch_size']),
           f'{r["tokens"].get("video", 0)}+{r["tokens"].get("audio", 0)}',
           _fmt_range(r['step_seconds'], digits=3) if timed else dash,
           f'{r["model_flops"] / 1e9:.1f}',
           _fmt_range(r['achieved_flops'], 1e-9, 1) if timed else dash,
           _fmt_range(r['mfu'], 100, 1, '%') if timed else dash,
           _fmt_range(r['mfu_vs_float32_peak'], 100, 1, '%') if timed else dash,
           f'{r["cores_used"]["median"]:.2f}' if timed else dash,
           f'{r["memory"]["peak"] / GIB:.2f} ({r["plain_memory"]["peak"] / GIB:.2f})',
           f'{r["compile_seconds"]:.1f} ({r["plain_compile_seconds"]:.1f})']
  return '| ' + ' | '.join(cells) + ' |'


def plot(report: dict, path: str) -> None:
  """Writes the report's figure (needs matplotlib: `pip install -e .[bench]`)."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  results = report['results']
  if report['mode'] == 'train':
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    names = [r['name'] for r in results]
    x = np.arange(len(names))
    timed = ['step_seconds' in r for r in results]
    mfu = [100 * r['mfu']['median'] if t else 0 for r, t in zip(results, timed)]
    err = [[100 * (r['mfu']['median'] - r['mfu']['min']) if t else 0 for r, t in zip(results, timed)],
           [100 * (r['mfu']['max'] - r['mfu']['median']) if t else 0 for r, t in zip(results, timed)]]
    axes[0].bar(x, mfu, yerr=err, capsize=4)
    axes[0].set_ylabel('MFU (%)')
    axes[0].set_title('train-step MFU (vs measured matmul peak)')
    width = 0.4
    axes[1].bar(x - width / 2, [r['plain_memory']['peak'] / GIB for r in results], width,
                label='plain')
    axes[1].bar(x + width / 2, [r['memory']['peak'] / GIB for r in results], width,
                label='with controls')
    axes[1].set_ylabel('peak memory (GiB)')
    axes[1].set_title('compiled peak memory')
    axes[1].legend()
    axes[2].bar(x - width / 2, [r['plain_compile_seconds'] for r in results], width, label='plain')
    axes[2].bar(x + width / 2, [r['compile_seconds'] for r in results], width,
                label='with controls')
    axes[2].set_ylabel('compile time (s)')
    axes[2].set_title('compile time')
    axes[2].legend()
    for ax in axes:
      ax.set_xticks(x, names)
    fig.suptitle(f'{report["machine"]["device_kind"]}, {results[0]["controls_text"] if results else ""}')
  elif report['mode'] == 'fusion':
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    study = [r for r in results if r['point'] != 'paper']
    for fusion in FUSIONS:
      rows = [r for r in study if r['fusion'] == fusion]
      tokens = [r['tokens']['video'] for r in rows]
      axes[0].plot(tokens, [r['model_flops'] / 1e9 for r in rows], 'o-', label=fusion)
      axes[1].plot(tokens, [r['plain_memory']['peak'] / GIB for r in rows], 'o-', label=fusion)
      timed = [r for r in rows if 'step_seconds' in r]
      axes[2].plot([r['tokens']['video'] for r in timed],
                   [r['step_seconds']['median'] for r in timed], 'o-', label=fusion)
    for ax, title in zip(axes, ('GFLOP per train step', 'peak memory (GiB)', 'step time (s)')):
      ax.set_xlabel('video tokens per clip')
      ax.set_title(title)
      ax.set_xscale('log')
      ax.set_yscale('log')
      ax.legend()
    size = study[0]['benchmark']['size'] if study else ''
    fig.suptitle(f'fusion scaling, {size} encoders, audio {FUSION_STUDY_AUDIO_FRAMES} frames, '
                 f'{report["machine"]["device_kind"]}')
  else:
    fig, ax = plt.subplots(figsize=(6, 4))
    names = [os.path.basename(r['config_file']) for r in results]
    x = np.arange(len(names))
    ax.bar(x - 0.2, [r['input_examples_per_second'] for r in results], 0.4, label='input pipeline')
    ax.bar(x + 0.2, [r.get('step_examples_per_second', 0) for r in results], 0.4,
           label='train step')
    ax.set_yscale('log')
    ax.set_xticks(x, names)
    ax.set_ylabel('examples / s')
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write_report(report: dict, output_dir: str) -> dict[str, str]:
  """Writes `<mode>.json`, `<mode>.md` and `<mode>.png`; returns their paths."""
  os.makedirs(output_dir, exist_ok=True)
  paths = {ext: os.path.join(output_dir, f'{report["mode"]}.{ext}') for ext in ('json', 'md', 'png')}
  with open(paths['json'], 'w') as f:
    json.dump(report, f, indent=1)
  with open(paths['md'], 'w') as f:
    f.write(markdown(report))
  plot(report, paths['png'])
  return paths


# ----------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog='python -m avt_jax.benchmark', description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--mode', default='train', choices=('train', 'fusion', 'input'))
  p.add_argument('--configs', default='tiny,small,base',
                 help=f'comma-separated subset of {sorted(BENCHMARKS)} (train mode)')
  p.add_argument('--steps', type=int, default=5, help='timed steps per round')
  p.add_argument('--repeats', type=int, default=3, help='timing rounds (the spread is reported)')
  p.add_argument('--batch_size', type=int, default=None, help="override the configs' batch size")
  p.add_argument('--audio_frames', type=int, default=None, help="override the configs' audio frames")
  p.add_argument('--dtype', default='float32', choices=sorted(build.DTYPES),
                 help='compute dtype (parameters stay float32)')
  p.add_argument('--attention', default='xla', choices=ATTENTION_IMPLEMENTATIONS)
  p.add_argument('--attention_chunk_size', type=int, default=DEFAULT_CHUNK_SIZE)
  p.add_argument('--remat_policy', default='none', choices=sorted(REMAT_POLICIES))
  p.add_argument('--scan_layers', action='store_true', help='nn.scan over identical layers')
  p.add_argument('--objectives', default='classification', choices=('classification', 'all'))
  p.add_argument('--compile_only', action='store_true',
                 help='FLOPs, memory and compile time only (no timed steps)')
  p.add_argument('--fusion_size', default='small', choices=sorted(BENCHMARKS),
                 help='encoder size of the fusion study')
  p.add_argument('--paper_scale', action='store_true',
                 help='fusion mode: add the base model at 32 x 224 (compiled; timed with '
                      '--paper_step_time)')
  p.add_argument('--paper_step_time', action='store_true')
  p.add_argument('--config_file', default='configs/demo.py', help='input mode: config file')
  p.add_argument('--config_arg', default=None, help='input mode: argument of get_config')
  p.add_argument('--data_dir', default=None, help='input mode: prepared records')
  p.add_argument('--input_batches', type=int, default=20, help='input mode: batches timed')
  p.add_argument('--synthetic_clips', type=int, default=0,
                 help='input mode: write this many random clips at the config\'s scale and read them')
  p.add_argument('--step_batch_size', type=int, default=None,
                 help='input mode: batch size of the train step (default: the input batch size)')
  p.add_argument('--output_dir', default='benchmark_results')
  args = p.parse_args(argv)
  args.configs = [c.strip() for c in args.configs.split(',') if c.strip()]
  unknown = [c for c in args.configs if c not in BENCHMARKS]
  if unknown:
    p.error(f'--configs: unknown {unknown}; expected names in {sorted(BENCHMARKS)}')
  if args.steps < 1 or args.repeats < 1:
    p.error('--steps and --repeats must be >= 1')
  return args


def main(argv: Sequence[str] | None = None) -> dict:
  args = parse_args(argv)
  jax.config.update('jax_enable_compilation_cache', False)  # compile times must be real
  run = {'train': run_train, 'fusion': run_fusion, 'input': run_input}[args.mode]
  report = run(args)
  paths = write_report(report, args.output_dir)
  print(markdown(report))
  print('Wrote ' + ', '.join(paths.values()))
  return report


if __name__ == '__main__':
  main()
