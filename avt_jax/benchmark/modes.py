"""The benchmark's three modes: `train` (MFU and memory), `fusion` (scaling study), `input`.

Each `run_<mode>(args)` takes the parsed flags (`avt_jax.benchmark.cli.parse_args`) and returns a
JSON-able report {'mode', 'machine', 'command', 'results', ...} for `report.write_report`.
"""

import dataclasses
import os
import sys
import time
from types import SimpleNamespace
from typing import Callable, Sequence

import jax
import ml_collections
import numpy as np

from avt_jax.benchmark.configs import (BENCHMARKS, FUSION_STUDY_AUDIO_FRAMES, FUSION_STUDY_VIDEO,
                                       PAPER_SCALE, Benchmark, Controls, benchmark_config,
                                       token_counts)
from avt_jax.benchmark.measure import (GIB, add_mfu, available_memory_bytes, compile_train_step,
                                       machine_description, measure, spread, time_steps)
from avt_jax.benchmark.peak import PeakProbe, nominal_peak
from avt_jax.benchmark.synthetic_data import write_synthetic_records
from avt_jax.models.fusion import FUSIONS


def _controls(args: SimpleNamespace) -> Controls:
  return Controls(args.dtype, args.attention, args.attention_chunk_size, args.remat_policy,
                  args.scan_layers)


def _override(bench: Benchmark, args: SimpleNamespace) -> Benchmark:
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


def run_train(args: SimpleNamespace, log: Callable[[str], None] = print) -> dict:
  """The `train` mode: peak, then every requested benchmark config."""
  controls = _controls(args)
  log(f'Measuring the {args.dtype} matmul peak ...')
  probe = PeakProbe(args.dtype)
  probes = [probe] if args.dtype == 'float32' else [probe, PeakProbe('float32')]
  log('  start: ' + ', '.join(f'{p.dtype} {p.peak / 1e9:.1f} GFLOP/s (product {p.product})'
                              for p in probes))
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
      r['mfu_vs_nominal_peak'] = spread([x['achieved_flops'] / nominal for x in r['rounds']])
  return {'mode': 'train', 'machine': machine_description(), 'dtype': args.dtype,
          'peak': probe.report(), 'float32_peak': probes[-1].report(),
          'nominal_peak': nominal, 'command': ' '.join(sys.argv), 'results': results}


def run_fusion(args: SimpleNamespace, log: Callable[[str], None] = print) -> dict:
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
          'peak': probe.report(), 'command': ' '.join(sys.argv),
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


def _input_data_dir(args: SimpleNamespace) -> str:
  """The records `--mode=input` reads: synthetic, `--data_dir`, the config's, or demo data.

  Raises:
    ValueError: when none of them is given.
  """
  config = args.config
  if args.synthetic_clips:
    return write_synthetic_records(config, os.path.join(args.output_dir, 'synthetic_records'),
                                   args.synthetic_clips)
  data_dir = args.data_dir or config.data.data_dir
  if not data_dir and config.data.synthetic == 'demo':
    from avt_jax.prep import demo_data  # pylint: disable=g-import-not-at-top
    data_dir = demo_data.ensure_demo_data(config.data.cache_dir or None)
  if not data_dir:
    raise ValueError('--mode=input: pass --data_dir (prepared records), --synthetic_clips, or a '
                     'config with data.data_dir / data.synthetic.')
  return data_dir


def _input_seconds_per_batch(config: ml_collections.ConfigDict, data_dir: str, batches: int) -> float:
  """Seconds per batch of the training input pipeline, after building it and filling its buffer."""
  from avt_jax import input as input_lib  # pylint: disable=g-import-not-at-top
  iterator = input_lib.make_train_iterator(config, data_dir, seed=0)
  next(iterator)  # builds the pipeline and fills the prefetch buffer
  start = time.perf_counter()
  for _ in range(batches):
    next(iterator)
  return (time.perf_counter() - start) / batches


def run_input(args: SimpleNamespace, log: Callable[[str], None] = print) -> dict:
  """The `input` mode: examples/s of the training input pipeline vs the train step's consumption."""
  config = args.config
  if args.batch_size:
    config.input.batch_size = args.batch_size
  data_dir = _input_data_dir(args)
  batch_size = int(config.input.batch_size)
  input_seconds = _input_seconds_per_batch(config, data_dir, args.input_batches)
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
