"""Measurements of a train step: model FLOPs, compiled memory, trace and compile time, step time."""

import dataclasses
import os
import platform
import resource
import sys
import time
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np

from avt_jax import data_format, train_step
from avt_jax.benchmark.configs import Controls, token_counts
from avt_jax.benchmark.peak import PeakProbe
from avt_jax.models import build, summary

GIB = 2.0 ** 30


@dataclasses.dataclass
class CompiledStep:
  """A train step compiled from shapes, with XLA's analyses and what running it needs."""
  run: Callable  # (state, batch) -> (state, metrics); donates the state
  init: Callable[[], Any]  # () -> initial train state
  batch: dict[str, np.ndarray]
  trace_seconds: float
  compile_seconds: float
  flops: float  # `summary.model_flops` of the lowered step
  memory: dict[str, float]  # bytes


def random_batch(config: ml_collections.ConfigDict, seed: int = 0) -> dict[str, np.ndarray]:
  """Random inputs and one-hot labels of the configured shapes."""
  rng = np.random.default_rng(seed)
  batch = build.example_inputs(config, int(config.input.batch_size))
  batch['video'] = rng.uniform(-1, 1, batch['video'].shape).astype(np.float32)
  batch['audio'] = rng.normal(size=batch['audio'].shape).astype(np.float32)
  for head, classes in config.data.num_classes.items():
    labels = rng.integers(0, classes, batch['mask'].shape[0])
    batch[data_format.label_key(head)] = np.eye(classes, dtype=np.float32)[labels]
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
                      summary.model_flops(lowered), memory_stats(compiled))


def time_steps(step: CompiledStep, steps: int, probes: Sequence[PeakProbe] = (),
               state: Any = None) -> tuple[Any, dict[str, list]]:
  """Times `steps` train steps, each followed by one sample of every probe.

  Without `state`, initialises it and runs one untimed warm-up step first. Returns the final state
  (pass it back for further rounds) and {'step_seconds': [...], 'cpu_seconds': [...]} (the process's
  CPU time during each step: about cores x step time when nothing else runs on the machine).

  Raises:
    FloatingPointError: when the last step's loss is not finite.
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


def spread(values: Sequence[float]) -> dict[str, float]:
  """{'median', 'min', 'max'} of `values`."""
  return {'median': float(np.median(values)), 'min': float(np.min(values)),
          'max': float(np.max(values))}


def measure(config: ml_collections.ConfigDict, *, steps: int, repeats: int,
            probes: Sequence[PeakProbe] = (), time_it: bool = True,
            log: Callable[[str], None] = print) -> dict:
  """Compiles the plain and the configured train step of `config`, and times the configured one.

  The timed run is skipped when the compiled step needs more than 90% of the available memory.

  Returns:
    A JSON-able dict: controls, tokens, `model_flops` (plain step), `memory` / `plain_memory`
    (bytes), compile and trace seconds, and when timed `rounds` and the spreads (median, min, max over
    rounds) `step_seconds`, `achieved_flops` and `cores_used`. `add_mfu` adds the MFU.
  """
  controls = Controls.of(config.model)
  result = {'controls': dataclasses.asdict(controls), 'controls_text': controls.describe(),
            'batch_size': int(config.input.batch_size), 'tokens': token_counts(config)}
  reference = compile_train_step(summary.plain(config))
  result.update(model_flops=reference.flops, plain_memory=reference.memory,
                plain_compile_seconds=reference.compile_seconds,
                plain_trace_seconds=reference.trace_seconds)
  log(f'  plain step: {reference.flops / 1e9:.1f} GFLOP, peak memory '
      f'{reference.memory["peak"] / GIB:.2f} GiB, compiled in {reference.compile_seconds:.1f} s')
  step = reference if controls.plain() == controls else compile_train_step(config)
  del reference
  result.update(flops_with_controls=step.flops, memory=step.memory, compile_seconds=step.compile_seconds,
                trace_seconds=step.trace_seconds)
  if time_it and step.memory['peak'] > 0.9 * available_memory_bytes():
    log(f'  skipping the timed run: needs {step.memory["peak"] / GIB:.1f} GiB, '
        f'{available_memory_bytes() / GIB:.1f} GiB available')
    time_it = False
  if time_it:
    result.update(_timed_rounds(step, steps, repeats, probes, result['model_flops']))
  return result


def _timed_rounds(step: CompiledStep, steps: int, repeats: int, probes: Sequence[PeakProbe],
                  model_flops: float) -> dict:
  """`repeats` rounds of `time_steps` on one train state: the rounds and their spreads."""
  rounds, state = [], None
  for _ in range(repeats):
    state, timed = time_steps(step, steps, probes, state)
    seconds = float(np.median(timed['step_seconds']))
    rounds.append({**timed, 'median_step_seconds': seconds,
                   'achieved_flops': model_flops / seconds,
                   'cores_used': float(np.sum(timed['cpu_seconds']) / np.sum(timed['step_seconds']))})
  del state
  result = {'rounds': rounds}
  for key, name in (('median_step_seconds', 'step_seconds'), ('achieved_flops', 'achieved_flops'),
                    ('cores_used', 'cores_used')):
    result[name] = spread([r[key] for r in rounds])
  result['max_rss_bytes'] = max_rss_bytes()
  return result


def add_mfu(results: Sequence[dict], peak: float, float32_peak: float) -> None:
  """Adds `mfu` and `mfu_vs_float32_peak` (spreads over rounds) to the timed results, in place."""
  for r in results:
    if 'rounds' in r:
      r['mfu'] = spread([x['achieved_flops'] / peak for x in r['rounds']])
      r['mfu_vs_float32_peak'] = spread([x['achieved_flops'] / float32_peak for x in r['rounds']])


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
