"""Tests for avt_jax.benchmark: configs, XLA analyses, MFU bookkeeping, reports, and one real run."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avt_jax.benchmark import cli, configs, measure, modes, peak, synthetic_data
from avt_jax.models import build
from conftest import tiny_config


@pytest.mark.parametrize('name,tokens,width', [('tiny', (197, 105), 192), ('small', (801, 201), 384),
                                               ('base', (3137, 401), 768)])
def test_benchmark_configs_have_the_documented_sizes(name, tokens, width):
  config = configs.benchmark_config(configs.BENCHMARKS[name])
  assert configs.token_counts(config) == {'video': tokens[0], 'audio': tokens[1]}
  assert build.encoder_size(config.model)['hidden_size'] == width
  assert config.model.n_bottlenecks == 4 and config.model.fusion == 'bottleneck'
  assert build.objectives(config) == ('classification',)
  everything = configs.benchmark_config(configs.BENCHMARKS[name], objectives='all')
  assert len(build.objectives(everything)) == 6


def test_model_flops_match_a_hand_count_of_the_tiny_step():
  """Model FLOPs = 3 x the forward's matrix products (forward + both backward products; the patch
  embeddings need no input gradient: 2 x), counted by hand."""
  bench = configs.BENCHMARKS['tiny']
  config = configs.benchmark_config(bench)
  width, mlp, layers, fusion_layer = 192, 768, 6, 3
  per_clip = 0.0  # training FLOPs of one clip
  for tokens, patch_values in ((197, 2 * 16 * 16 * 3), (105, 16 * 16)):
    per_clip += 2 * 2 * (tokens - 1) * patch_values * width  # tubelet / patch embedding
    for layer in range(layers):
      n = tokens + (4 if layer >= fusion_layer else 0)  # 4 bottleneck tokens in fused layers
      per_clip += 3 * n * (2 * (4 * width * width + 2 * width * mlp) + 4 * n * width)
  lowered, *_ = measure.lower_train_step(config)
  ratio = lowered.cost_analysis()['flops'] / (bench.batch_size * per_clip)
  assert 1.0 <= ratio <= 1.05  # the rest: softmax, norms, GELU, AdamW


def test_controls_reach_the_model_and_plain_drops_them():
  controls = configs.Controls('bfloat16', 'chunked', 64, 'dots', True)
  model = build.build_model(configs.benchmark_config(configs.BENCHMARKS['tiny'], controls))
  options = model.options
  assert (options.dtype, options.attention_implementation, options.attention_chunk_size,
          options.remat_policy, options.scan_layers) == (build.DTYPES['bfloat16'], 'chunked', 64,
                                                         'dots', True)
  assert controls.plain() == configs.Controls('bfloat16')
  assert controls.describe() == 'bfloat16, attention=chunked/64, remat=dots, scan'


def test_bad_arguments_are_rejected():
  with pytest.raises(SystemExit):
    cli.parse_args(['--configs=tiny,huge'])
  with pytest.raises(ValueError, match='objectives'):
    configs.benchmark_config(configs.BENCHMARKS['tiny'], objectives='some')


def test_memory_stats_count_arguments_outputs_and_donation():
  x = jax.ShapeDtypeStruct((1000,), np.float32)
  compiled = jax.jit(lambda a, b: (a * 2, a + b), donate_argnums=(0,)).lower(x, x).compile()
  stats = measure.memory_stats(compiled)
  assert stats['arguments'] == 8000 and stats['outputs'] >= 8000  # (+ the output tuple)
  assert stats['aliased'] == 4000  # the donated argument holds the first output
  assert stats['peak'] >= stats['arguments'] + stats['outputs'] - stats['aliased']


def test_fusion_costs_order_concat_above_bottleneck_above_late():
  """Compiled FLOPs of the train step: concat attends over all 33 x 17 video-audio token
  pairs, bottleneck fusion adds 2 x 2 bottleneck tokens to the same linear layers, late fusion none."""
  costs = {}
  for fusion in ('bottleneck', 'concat', 'late'):
    config = tiny_config(**{'model.fusion': fusion, 'model.fusion_layer': 0, 'input.image_size': 64,
                            'input.audio_frames': 128, 'loss.weights': {'classification': 1.0}})
    assert configs.token_counts(config) == {'video': 33, 'audio': 17}
    costs[fusion] = measure.compile_train_step(config)
  assert costs['concat'].flops > costs['bottleneck'].flops > costs['late'].flops


def _result(point, fusion, flops, memory, seconds=None):
  r = {'point': point, 'fusion': fusion, 'tokens': {'video': 100, 'audio': 50},
       'model_flops': flops, 'plain_memory': {'peak': memory}}
  if seconds is not None:
    r['step_seconds'] = {'median': seconds}
  return r


def test_fusion_ratios_are_relative_to_bottleneck():
  results = [_result('small', 'bottleneck', 10.0, 4.0, 2.0), _result('small', 'concat', 25.0, 8.0, 5.0),
             _result('small', 'late', 9.0, 3.0, 1.5), _result('paper', 'bottleneck', 100.0, 10.0),
             _result('paper', 'concat', 300.0, 40.0)]
  ratios = modes.fusion_ratios(results)
  assert ratios['small:100 concat/bottleneck'] == {'flops': 2.5, 'peak_memory': 2.0, 'step_time': 2.5}
  assert ratios['small:100 late/bottleneck'] == {'flops': 0.9, 'peak_memory': 0.75, 'step_time': 0.75}
  assert ratios['paper concat/bottleneck'] == {'flops': 3.0, 'peak_memory': 4.0}


def test_mfu_uses_the_highest_peak_of_the_run():
  results = [{'rounds': [{'achieved_flops': 30.0}, {'achieved_flops': 50.0}]}, {'name': 'untimed'}]
  measure.add_mfu(results, peak=100.0, float32_peak=200.0)
  assert results[0]['mfu'] == {'median': 0.4, 'min': 0.3, 'max': 0.5}
  assert results[0]['mfu_vs_float32_peak'] == {'median': 0.2, 'min': 0.15, 'max': 0.25}
  assert 'mfu' not in results[1]


def test_peak_probe_keeps_the_best_sustained_throughput():
  probe = peak.PeakProbe('float32', sizes=(64, 128), repeats=1, block_seconds=0.01)
  assert set(probe.by_product) == {'64', '128'} and probe.product in ('64', '128')
  assert probe.samples == [probe.by_product[probe.product]] == [max(probe.by_product.values())]
  for _ in range(3):
    assert probe.sample() > 0
  assert probe.peak == max(probe.samples) and len(probe.samples) == 4


def test_bfloat16_peak_also_measures_float32_accumulation():
  probe = peak.PeakProbe('bfloat16', sizes=(64,), repeats=1, block_seconds=0.01)
  assert set(probe.by_product) == {'64', '64->float32'}
  assert probe.peak == max(probe.by_product.values())
  product, _ = peak._matmul(64, 'bfloat16', 'float32')
  out = product()
  a = jax.random.normal(jax.random.key(0), (64, 64), jnp.bfloat16).astype(jnp.float32)
  b = jax.random.normal(jax.random.key(1), (64, 64), jnp.bfloat16).astype(jnp.float32)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, jnp.matmul(a, b, precision='highest'), rtol=1e-5, atol=1e-4)


def test_train_mode_end_to_end_writes_json_markdown_and_plot(tmp_path, monkeypatch):
  """A real run of the command on a micro benchmark (2 layers of width 32, 2 x 32^2 video, 32 x 128
  audio)."""
  monkeypatch.setitem(build.SIZES, 'micro', dict(hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64))
  monkeypatch.setitem(configs.BENCHMARKS, 'micro', configs.Benchmark('micro', 1, 2, 32, 32, 2))
  monkeypatch.setattr(peak, 'PEAK_SIZES', {'cpu': (128,), 'gpu': (512,), 'tpu': (512,)})
  report = cli.main(['--configs=micro', '--steps=1', '--repeats=3', '--attention=chunked',
                     '--attention_chunk_size=2', f'--output_dir={tmp_path}'])
  (result,) = report['results']
  assert result['tokens'] == {'video': 5, 'audio': 17}
  assert result['model_flops'] > 0 and len(result['rounds']) == 3
  assert all(len(r['step_seconds']) == 1 for r in result['rounds'])
  assert 0 < result['mfu']['min'] <= result['mfu']['median'] <= result['mfu']['max']
  # MFU is model FLOPs / step time / the run's highest matmul throughput.
  expected = result['model_flops'] / result['step_seconds']['median'] / report['peak']['flops']
  assert result['mfu']['median'] == pytest.approx(expected, rel=1e-6)
  with open(tmp_path / 'train.json') as f:
    assert json.load(f)['results'][0]['name'] == 'micro'
  table = (tmp_path / 'train.md').read_text()
  assert '| micro | float32, attention=chunked/2 | 2 | 5+17 |' in table
  assert os.path.getsize(tmp_path / 'train.png') > 1000


def test_synthetic_records_feed_the_training_pipeline(tmp_path):
  """`--synthetic_clips` data has the record format and scale the input pipeline expects."""
  pytest.importorskip('tensorflow')  # absent on accelerator images that run scripts/gpu_check.sh
  from avt_jax import input as input_lib
  config = tiny_config(**{'input.batch_size': 2, 'input.shuffle_buffer': 4})
  folder = synthetic_data.write_synthetic_records(config, str(tmp_path / 'records'), clips=3)
  batch = next(input_lib.make_train_iterator(config, folder, seed=0))
  inp = config.input
  assert batch['video'].shape == (2, inp.num_frames, inp.image_size, inp.image_size, 3)
  assert batch['audio'].shape == (2, inp.audio_frames, inp.n_mels)
  assert batch['labels/class'].shape == (2, 5) and np.all(batch['labels/class'].sum(-1) == 1)


def test_input_mode_end_to_end_compares_pipeline_and_step(tmp_path):
  """A real `--mode=input` run on synthetic records of the tiny test config, classification only
  (the step is timed, not checked: its objectives do not matter, and one compiles fastest)."""
  pytest.importorskip('tensorflow')
  config_file = tmp_path / 'tiny_config.py'
  config_file.write_text('from conftest import tiny_config\n\n\ndef get_config():\n'
                         "  return tiny_config(**{'input.batch_size': 4, 'input.shuffle_buffer': 4,\n"
                         "                        'loss.weights': {'classification': 1.0}})\n")
  report = cli.main(['--mode=input', f'--config_file={config_file}', '--synthetic_clips=4',
                     '--input_batches=2', '--steps=2', '--step_batch_size=2',
                     f'--output_dir={tmp_path}'])
  (r,) = report['results']
  assert r['batch_size'] == 4 and r['step_batch_size'] == 2 and len(r['step_seconds']) == 2
  np.testing.assert_allclose(r['input_examples_per_second'], 4 / r['input_seconds_per_batch'])
  step_rate = 2 / np.median(r['step_seconds'])
  np.testing.assert_allclose(r['step_examples_per_second'], step_rate)
  np.testing.assert_allclose(r['ratio'], r['input_examples_per_second'] / step_rate)
  assert f'| {config_file} | 4 |' in (tmp_path / 'input.md').read_text()
  assert json.loads((tmp_path / 'input.json').read_text())['results'][0]['ratio'] == r['ratio']


@pytest.mark.parametrize('flag, mode', [('--config=configs/demo.py', 'train'),
                                        ('--config.input.batch_size=4', 'fusion'),
                                        ('--paper_scale', 'input'), ('--configs=tiny', 'fusion')])
def test_a_flag_the_mode_would_ignore_is_an_error(flag, mode, capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.parse_args([f'--mode={mode}', flag])
  assert exit_info.value.code == 2
  error = capsys.readouterr().err.strip()
  assert f'--mode={mode} would ignore it' in error and flag.split('=')[0] in error, error
