"""Learning benchmark on real media: linear-probe floors and AVT runs on VoiceDigits.

    apt-get install hedgewars-data          # the recorded voices (once)
    pip install -e '.[test]'                # scikit-learn for the linear probes
    python -m avt_jax.learning_benchmark --variants=clean,complementary --runs=av,video,audio

Builds (and caches) the VoiceDigits dataset (`avt_jax/prep/voice_digits.py`), fits the linear floors
(scikit-learn logistic regression on simple features, the regularisation picked by 5-fold
cross-validation on the training clips) and trains `configs/manifest.py` audio + video, video only
and audio only with `python -m avt_jax.main`, one process per run. Prints a markdown table and writes
`learning_benchmark.json` into `--workdir`.

Features of the floors (our design): video, the mean over a clip's stored frames, grey, 16x16; audio,
the normalised log-mel averaged into 20 time x 16 mel cells; both, the two concatenated.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Sequence

import numpy as np

from avt_jax import data_format

FLOOR_C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0)
VIDEO_FEATURE_SIZE = 16
AUDIO_FEATURE_CELLS = (20, 16)
RUNS = {'av': '', 'video': ':video', 'audio': ':audio'}
SELF_SUPERVISED = {'classification': 0.0, 'contrastive': 1.0, 'matching': 1.0, 'masked_video': 1.0,
                   'masked_audio': 1.0, 'masked_audio_segment': 1.0}
PRETRAIN_OVERRIDES = ['--config.model.fusion=bottleneck', '--config.train.epochs=60'] + [
    f'--config.loss.weights.{k}={v}' for k, v in SELF_SUPERVISED.items()]


def clip_features(data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(video [N, 256], audio [N, 320], labels [N]) features of every clip of `split`."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from avt_jax import records  # pylint: disable=g-import-not-at-top
  from avt_jax.input import pipeline  # pylint: disable=g-import-not-at-top

  stats = pipeline.load_stats(data_dir)

  def features(serialized):
    clip = records.parse_clip(serialized)
    frames = tf.cast(tf.map_fn(lambda j: tf.io.decode_jpeg(j, channels=1), clip['jpeg'],
                               fn_output_signature=tf.uint8), tf.float32)  # [T, H, W, 1]
    mean = tf.image.resize(tf.reduce_mean(frames, 0), [VIDEO_FEATURE_SIZE] * 2, method='area')
    return tf.reshape(mean, [-1]) / 255.0, clip['logmel'], clip[data_format.label_key('class')][0]

  dataset = tf.data.TFRecordDataset(pipeline.list_split_files(data_dir, split)).map(
      features, num_parallel_calls=tf.data.AUTOTUNE)
  video, audio, labels = [], [], []
  for v, logmel, label in dataset.as_numpy_iterator():
    video.append(v)
    audio.append(_cell_means((logmel - stats['logmel_mean']) / stats['logmel_std'],
                             AUDIO_FEATURE_CELLS))
    labels.append(int(label))
  return np.stack(video), np.stack(audio), np.asarray(labels)


def _cell_means(x: np.ndarray, cells: Sequence[int]) -> np.ndarray:
  """Means of `x` [rows, cols] over a cells[0] x cells[1] grid of near-equal blocks, flattened."""
  rows = np.array_split(np.arange(x.shape[0]), cells[0])
  cols = np.array_split(np.arange(x.shape[1]), cells[1])
  return np.array([[x[np.ix_(r, c)].mean() for c in cols] for r in rows]).ravel()


def linear_floors(data_dir: str, train_split: str = 'train', test_split: str = 'test'
                  ) -> dict[str, float]:
  """Test top-1 of logistic regression on video, audio and both feature sets."""
  from sklearn import linear_model, model_selection, pipeline as skpipe, preprocessing  # pylint: disable=g-import-not-at-top

  train = clip_features(data_dir, train_split)
  test = clip_features(data_dir, test_split)
  sets = {'video': [0], 'audio': [1], 'av': [0, 1]}
  floors = {}
  for name, parts in sets.items():
    x_train = np.concatenate([train[i] for i in parts], axis=1)
    x_test = np.concatenate([test[i] for i in parts], axis=1)
    probe = model_selection.GridSearchCV(
        skpipe.make_pipeline(preprocessing.StandardScaler(),
                             linear_model.LogisticRegression(max_iter=2000)),
        {'logisticregression__C': FLOOR_C_GRID}, cv=5)
    probe.fit(x_train, train[2])
    floors[name] = float(probe.score(x_test, test[2]))
  return floors


def encoder_features(config, params, data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """([N, modalities * D] final pooled features, [N] labels) of every clip of `split` (centre view).

  `params` may lack the classifier (a self-supervised run): a zero one is added, it does not change
  the features.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from avt_jax import input as input_lib  # pylint: disable=g-import-not-at-top
  from avt_jax.models import build_model  # pylint: disable=g-import-not-at-top
  from avt_jax.models.build import encoder_size  # pylint: disable=g-import-not-at-top

  model = build_model(config)
  if 'classifier' not in params:
    width, classes = encoder_size(config.model)['hidden_size'], config.data.num_classes['class']
    params = dict(params, classifier={'output_projection': {
        'kernel': np.zeros((width, classes), np.float32),
        'bias': np.zeros((classes,), np.float32)}})
  modalities = tuple(config.model.modalities)
  apply = jax.jit(lambda p, b: model.apply({'params': p}, b, objectives=('classification',))[
      'features']['final'])
  features, labels = [], []
  for batch in input_lib.make_eval_iterator(config, data_dir, split):
    final = apply(params, {k: batch[k] for k in (*modalities, 'mask')})
    keep = batch['mask'] > 0
    features.append(np.concatenate([np.asarray(final[m]) for m in modalities], -1)[keep])
    labels.append(batch[data_format.label_key('class')].argmax(-1)[keep])
  return np.concatenate(features), np.concatenate(labels)


def linear_probe(config, params, train_dir: str, test_dir: str) -> float:
  """Test top-1 of logistic regression on frozen `encoder_features` (C by 5-fold CV on train)."""
  from sklearn import linear_model, model_selection, pipeline as skpipe, preprocessing  # pylint: disable=g-import-not-at-top

  x_train, y_train = encoder_features(config, params, train_dir, config.data.train_split)
  x_test, y_test = encoder_features(config, params, test_dir, config.data.eval_split)
  probe = model_selection.GridSearchCV(
      skpipe.make_pipeline(preprocessing.StandardScaler(),
                           linear_model.LogisticRegression(max_iter=2000)),
      {'logisticregression__C': FLOOR_C_GRID}, cv=min(5, int(np.bincount(y_train).min())))
  probe.fit(x_train, y_train)
  return float(probe.score(x_test, y_test))


def train_run(config: str, data_dir: str, workdir: str, overrides: Sequence[str] = ()) -> dict:
  """Runs `python -m avt_jax.main` and returns its results.json (plus `wall_seconds`)."""
  results = os.path.join(workdir, 'results.json')
  if not os.path.exists(results):  # a finished run is kept; an unfinished one resumes
    command = [sys.executable, '-m', 'avt_jax.main', f'--config={config}', f'--workdir={workdir}',
               f'--config.data.data_dir={data_dir}', *overrides]
    begin = time.time()
    subprocess.run(command, check=True)
    with open(results) as f:
      summary = json.load(f)
    summary['wall_seconds'] = time.time() - begin
    with open(results, 'w') as f:
      json.dump(summary, f, indent=2)
  with open(results) as f:
    return json.load(f)


def load_config(config_path: str, data_dir: str, overrides: Sequence[str] = ()):
  """The config of a run as `python -m avt_jax.main` builds it: the file (`path[:arg]`) and the
  `--config.a.b=value` overrides parsed by `config_flags` as main's flags are, then stats.json
  applied."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from avt_jax import dataset_stats  # pylint: disable=g-import-not-at-top

  argv = ['learning_benchmark', f'--config={config_path}', *overrides]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', flag_values=flag_values, sys_argv=argv)
  flag_values(argv)
  config = flag_values.config
  config.data.data_dir = data_dir
  dataset_stats.apply_stats(config, data_dir)
  return config


def label_efficiency(data_dir: str, fraction: float, workdir: str, config_path: str
                     ) -> dict[str, float]:
  """Self-supervised pretraining on every training clip vs supervised training, with `fraction` of
  the labels: test top-1 of fine-tuning, supervised-only training, and linear probes on frozen
  features of the pretrained and of a randomly initialised encoder."""
  from avt_jax import train  # pylint: disable=g-import-not-at-top
  from avt_jax.prep import voice_digits  # pylint: disable=g-import-not-at-top

  labelled = voice_digits.labelled_subset(data_dir, fraction)
  pretrain_dir = os.path.join(workdir, 'pretrain')
  train_run(config_path, data_dir, pretrain_dir, PRETRAIN_OVERRIDES)
  init = [f'--config.init.checkpoint={pretrain_dir}', '--config.init.format=avt',
          "--config.init.exclude=('^classifier/',)"]
  out = {
      'fine-tuned': train_run(config_path, labelled, os.path.join(workdir, 'finetune'), init),
      'supervised only': train_run(config_path, labelled, os.path.join(workdir, 'supervised')),
  }
  out = {k: float(v['eval']['top1']) for k, v in out.items()}
  config = load_config(config_path, data_dir, PRETRAIN_OVERRIDES)
  pretrained = train.restore_params(config, pretrain_dir)
  import jax  # pylint: disable=g-import-not-at-top
  *_, init_fn = train.setup(config)
  random = jax.device_get(jax.jit(init_fn)(jax.random.PRNGKey(config.seed)).params)
  out['linear probe, pretrained'] = linear_probe(config, pretrained, labelled, labelled)
  out['linear probe, random init'] = linear_probe(config, random, labelled, labelled)
  return out


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--variants', default='clean,complementary', help='VoiceDigits variants.')
  parser.add_argument('--runs', default='av,video,audio', help=f'subset of {sorted(RUNS)}.')
  parser.add_argument('--workdir', default='/tmp/avt_learning_benchmark')
  parser.add_argument('--cache_dir', default=None, help='dataset cache (default ~/.cache/avt_jax).')
  parser.add_argument('--config', default='configs/manifest.py')
  parser.add_argument('--override', action='append', default=[],
                      help='extra --config.x=y flags for every run (repeatable).')
  parser.add_argument('--label_fraction', type=float, default=0.0,
                      help='> 0: also the self-supervised label-efficiency study on the clean variant.')
  args = parser.parse_args(argv)
  from avt_jax.prep import voice_digits  # pylint: disable=g-import-not-at-top

  table, rows = {}, ['| variant | run | AVT top-1 | linear floor | train s |', '|---|---|---|---|---|']
  for variant in args.variants.split(','):
    data_dir = voice_digits.ensure_voice_digits(variant, args.cache_dir)
    floors = linear_floors(data_dir)
    table[variant] = {'floors': floors, 'runs': {}}
    for run in args.runs.split(','):
      summary = train_run(args.config + RUNS[run], data_dir,
                          os.path.join(args.workdir, f'{variant}_{run}'), args.override)
      top1 = float(summary['eval']['top1'])
      table[variant]['runs'][run] = {'top1': top1, 'train_seconds': summary['train_seconds']}
      rows.append(f'| {variant} | {run} | {top1:.3f} | {floors[run]:.3f} | '
                  f'{summary["train_seconds"]:.0f} |')
  if args.label_fraction:
    data_dir = voice_digits.ensure_voice_digits('clean', args.cache_dir)
    table['label_efficiency'] = label_efficiency(
        data_dir, args.label_fraction, os.path.join(args.workdir, 'labels'), args.config)
    rows += [f'| clean, {args.label_fraction:.0%} labels | {k} | {v:.3f} | | |'
             for k, v in table['label_efficiency'].items()]
  os.makedirs(args.workdir, exist_ok=True)
  with open(os.path.join(args.workdir, 'learning_benchmark.json'), 'w') as f:
    json.dump(table, f, indent=2)
  print('\n'.join(rows))
  return 0


if __name__ == '__main__':
  sys.exit(main())
