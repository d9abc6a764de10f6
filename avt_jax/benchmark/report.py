"""A mode's report as `<mode>.json`, `<mode>.md` (markdown tables) and `<mode>.png` (figure)."""

import json
import os

import numpy as np

from avt_jax.benchmark.configs import FUSION_STUDY_AUDIO_FRAMES
from avt_jax.benchmark.measure import GIB
from avt_jax.models.fusion import FUSIONS


def _fmt_range(spread: dict, scale: float = 1.0, digits: int = 2, suffix: str = '') -> str:
  return (f'{spread["median"] * scale:.{digits}f}{suffix} '
          f'[{spread["min"] * scale:.{digits}f}-{spread["max"] * scale:.{digits}f}]')


def _tokens(r: dict) -> str:
  return f'{r["tokens"].get("video", 0)}+{r["tokens"].get("audio", 0)}'


def _train_row(r: dict) -> str:
  timed = 'mfu' in r
  dash = '-'
  cells = [r['name'], r['controls_text'], str(r['batch_size']), _tokens(r),
           _fmt_range(r['step_seconds'], digits=3) if timed else dash,
           f'{r["model_flops"] / 1e9:.1f}',
           _fmt_range(r['achieved_flops'], 1e-9, 1) if timed else dash,
           _fmt_range(r['mfu'], 100, 1, '%') if timed else dash,
           _fmt_range(r['mfu_vs_float32_peak'], 100, 1, '%') if timed else dash,
           f'{r["cores_used"]["median"]:.2f}' if timed else dash,
           f'{r["memory"]["peak"] / GIB:.2f} ({r["plain_memory"]["peak"] / GIB:.2f})',
           f'{r["compile_seconds"]:.1f} ({r["plain_compile_seconds"]:.1f})']
  return '| ' + ' | '.join(cells) + ' |'


def _train_lines(report: dict) -> list[str]:
  lines = [f'{report["dtype"]} matmul peak (best sustained block of the run): '
           f'{report["peak"]["flops"] / 1e9:.1f} GFLOP/s; float32: '
           f'{report["float32_peak"]["flops"] / 1e9:.1f} GFLOP/s. Values are the median '
           f'[min-max] over rounds; cores = process CPU time / wall time during the steps.']
  if report.get('nominal_peak'):
    nominal = [f'{r["name"]} {_fmt_range(r["mfu_vs_nominal_peak"], 100, 1, "%")}'
               for r in report['results'] if 'mfu_vs_nominal_peak' in r]
    lines.append(f'MFU against the vendor bfloat16 peak ({report["nominal_peak"] / 1e12:.0f} '
                 f'TFLOP/s): {", ".join(nominal)}.')
  lines += ['', '| config | controls | batch | tokens (video+audio) | step time s | model GFLOP/step '
            '| achieved GFLOP/s | MFU | MFU vs f32 peak | cores | peak memory GiB (plain) '
            '| compile s (plain) |', '|' + '---|' * 12]
  return lines + [_train_row(r) for r in report['results']]


def _fusion_lines(report: dict) -> list[str]:
  lines = ['| point | video frames x size | tokens (video+audio) | fusion | model GFLOP/step '
           '| peak memory GiB | step time s |', '|' + '---|' * 7]
  for r in report['results']:
    b = r['benchmark']
    lines.append(
        f'| {r["point"]} | {b["num_frames"]} x {b["image_size"]} | {_tokens(r)} | {r["fusion"]} | '
        f'{r["model_flops"] / 1e9:.1f} | {r["plain_memory"]["peak"] / GIB:.2f} | '
        f'{_fmt_range(r["step_seconds"], digits=3) if "step_seconds" in r else "-"} |')
  lines += ['', '| ratio | FLOPs | peak memory | step time |', '|---|---|---|---|']
  for key, ratio in report['ratios'].items():
    step = f'{ratio["step_time"]:.2f}' if 'step_time' in ratio else '-'
    lines.append(f'| {key} | {ratio["flops"]:.2f} | {ratio["peak_memory"]:.2f} | {step} |')
  return lines


def _input_lines(report: dict) -> list[str]:
  lines = ['| config | input batch | input examples/s | train step (batch, controls) '
           '| train step examples/s | input / step |', '|---|---|---|---|---|---|']
  for r in report['results']:
    name = r['config_file'] + (f':{r["config_arg"]}' if r.get('config_arg') else '')
    timed = 'ratio' in r
    step = f'{r["step_examples_per_second"]:.3f}' if timed else '-'
    ratio = f'{r["ratio"]:.1f}' if timed else '-'
    lines.append(f'| {name} | {r["batch_size"]} | {r["input_examples_per_second"]:.2f} | '
                 f'{r["step_batch_size"]}, {r["step_controls"]} | {step} | {ratio} |')
  return lines


def markdown(report: dict) -> str:
  """The report as markdown: machine line, then the mode's tables."""
  m = report['machine']
  lines = [f'Machine: {m.get("cpu", "")} ({m["cpu_count"]} cores), backend {m["backend"]} '
           f'({m["device_kind"]}), jax {m["jax"]}.', '']
  mode_lines = {'train': _train_lines, 'fusion': _fusion_lines, 'input': _input_lines}
  return '\n'.join(lines + mode_lines[report['mode']](report)) + '\n'


def _bars(ax, x, results: list[dict], key, ylabel: str, title: str) -> None:
  """Plain and with-controls bars of `key(result, prefix)` side by side."""
  width = 0.4
  ax.bar(x - width / 2, [key(r, 'plain_') for r in results], width, label='plain')
  ax.bar(x + width / 2, [key(r, '') for r in results], width, label='with controls')
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.legend()


def _plot_train(plt, report: dict):
  results = report['results']
  fig, axes = plt.subplots(1, 3, figsize=(14, 4))
  x = np.arange(len(results))
  mfu = [r['mfu'] if 'step_seconds' in r else {'median': 0, 'min': 0, 'max': 0} for r in results]
  axes[0].bar(x, [100 * m['median'] for m in mfu], capsize=4,
              yerr=[[100 * (m['median'] - m['min']) for m in mfu],
                    [100 * (m['max'] - m['median']) for m in mfu]])
  axes[0].set_ylabel('MFU (%)')
  axes[0].set_title('train-step MFU (vs measured matmul peak)')
  _bars(axes[1], x, results, lambda r, p: r[f'{p}memory']['peak'] / GIB, 'peak memory (GiB)',
        'compiled peak memory')
  _bars(axes[2], x, results, lambda r, p: r[f'{p}compile_seconds'], 'compile time (s)',
        'compile time')
  for ax in axes:
    ax.set_xticks(x, [r['name'] for r in results])
  fig.suptitle(f'{report["machine"]["device_kind"]}, {results[0]["controls_text"] if results else ""}')
  return fig


def _plot_fusion(plt, report: dict):
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  study = [r for r in report['results'] if r['point'] != 'paper']
  for fusion in FUSIONS:
    rows = [r for r in study if r['fusion'] == fusion]
    tokens = [r['tokens']['video'] for r in rows]
    axes[0].plot(tokens, [r['model_flops'] / 1e9 for r in rows], 'o-', label=fusion)
    axes[1].plot(tokens, [r['plain_memory']['peak'] / GIB for r in rows], 'o-', label=fusion)
    timed = [r for r in rows if 'step_seconds' in r]
    axes[2].plot([r['tokens']['video'] for r in timed],
                 [r['step_seconds']['median'] for r in timed], 'o-', label=fusion)
  for ax, title in zip(axes, ('GFLOP per train step', 'peak memory (GiB)', 'step time (s)')):
    ax.set(xlabel='video tokens per clip', title=title, xscale='log', yscale='log')
    ax.legend()
  size = study[0]['benchmark']['size'] if study else ''
  fig.suptitle(f'fusion scaling, {size} encoders, audio {FUSION_STUDY_AUDIO_FRAMES} frames, '
               f'{report["machine"]["device_kind"]}')
  return fig


def _plot_input(plt, report: dict):
  results = report['results']
  fig, ax = plt.subplots(figsize=(6, 4))
  x = np.arange(len(results))
  ax.bar(x - 0.2, [r['input_examples_per_second'] for r in results], 0.4, label='input pipeline')
  ax.bar(x + 0.2, [r.get('step_examples_per_second', 0) for r in results], 0.4, label='train step')
  ax.set_yscale('log')
  ax.set_xticks(x, [os.path.basename(r['config_file']) for r in results])
  ax.set_ylabel('examples / s')
  ax.legend()
  return fig


def plot(report: dict, path: str) -> None:
  """Writes the report's figure (needs matplotlib: `pip install -e .[bench]`)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  mode_plot = {'train': _plot_train, 'fusion': _plot_fusion, 'input': _plot_input}
  fig = mode_plot[report['mode']](plt, report)
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
