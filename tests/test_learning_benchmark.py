"""A reduced VoiceDigits benchmark: configs/manifest.py learns real recorded media beyond a linear floor.

Real speech from the Debian package `hedgewars-data` (installed by `.ci/run`; the test is skipped,
saying so, where it is absent) and scikit-learn's handwritten digits. Four classes, 96 training and
24 test clips (unseen voices and digit scans); the audio-only recipe of `configs/manifest.py` is
trained through `python -m avt_jax.main` and must beat logistic regression on log-mel features.
"""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from avt_jax import data_format, learning_benchmark
from avt_jax.prep import clips, suite, voice_digits
from avt_jax.prep.suite import icons, sets, soundfonts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def missing_sources(check) -> str | None:
  """The FileNotFoundError message of `check()` (a source package is not installed), or None."""
  try:
    check()
  except FileNotFoundError as e:
    return str(e)
  return None


VOICES = missing_sources(voice_digits.voices_dir)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  if VOICES:
    pytest.skip(VOICES)
  return voice_digits.ensure_voice_digits('clean', str(tmp_path_factory.mktemp('cache')),
                                          num_classes=4, train_repeats=2, test_repeats=2,
                                          progress=False)


def test_reduced_benchmark_holds_unseen_voices_and_real_media(data_dir):
  assert voice_digits.speakers(data_dir, 'test') == sorted(voice_digits.TEST_PACKS)
  assert not set(voice_digits.speakers(data_dir, 'train')) & set(voice_digits.TEST_PACKS)
  with open(os.path.join(data_dir, 'stats.json')) as f:
    stats = json.load(f)
  # 2 of the 12 training voices (16 clips) held out as `val` for fusion calibration
  assert stats['num_clips'] == {'train': 80, 'val': 16, 'test': 24}
  assert not set(voice_digits.speakers(data_dir, 'val')) & set(voice_digits.speakers(data_dir, 'train'))
  assert stats['label_names']['class'] == ['0_hello', '1_byebye', '2_incoming', '3_victory']


def test_audio_recipe_beats_the_linear_floor(data_dir, tmp_path):
  floor = learning_benchmark.linear_floors(data_dir)['audio']
  workdir = tmp_path / 'audio'
  # One CPU device and no persistent compilation cache, as a user's run on this machine: with the
  # suite's 8 simulated devices and shared cache the run's train step aborted (SIGABRT) now and then.
  env = {k: v for k, v in os.environ.items() if k not in ('JAX_COMPILATION_CACHE_DIR', 'XLA_FLAGS')}
  subprocess.run([sys.executable, '-m', 'avt_jax.main', '--config=configs/manifest.py:audio',
                  f'--workdir={workdir}', f'--config.data.data_dir={data_dir}',
                  '--config.train.epochs=100', '--config.train.log_every=100'],
                 cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
  with open(workdir / 'results.json') as f:
    top1 = json.load(f)['eval']['top1']
  assert top1 > floor, (top1, floor)


def test_pretrain_study_fine_tunes_from_the_pretraining_run_on_the_labelled_subset(data_dir, tmp_path,
                                                                               monkeypatch):
  """`--pretrain_study` end to end (`label_efficiency`), tiny model, a few steps: contrastive
  pretraining on every training clip without labels, then fine-tuning from it and supervised training
  on half of each class's clips; the fine-tuning run takes every pretrained parameter but the
  classifier, and a second call reuses the finished runs."""
  for name in ('JAX_COMPILATION_CACHE_DIR', 'XLA_FLAGS'):  # the runs: one CPU device, as above
    monkeypatch.delenv(name, raising=False)
  tiny = [o for o in learning_benchmark.REDUCED_OVERRIDES if 'epochs' not in o] + [
      '--config.train.epochs=1', '--config.seed=0']
  pretrain = ['--config.loss.weights.classification=0', '--config.loss.weights.contrastive=1']
  study = lambda: learning_benchmark.label_efficiency(data_dir, 0.5, str(tmp_path),
                                                       'configs/manifest.py', tiny, pretrain)
  out = study()
  assert set(out) == {'fine-tuned', 'supervised only', 'linear probe, pretrained',
                      'linear probe, initial encoder'}
  assert all(0.0 <= v <= 1.0 for v in out.values()), out
  with open(tmp_path / 'finetune' / 'init_report.json') as f:
    report = json.load(f)
  assert {tuple(v.items()) for v in report['sources'].values()} == {
      (('checkpoint', str(tmp_path / 'pretrain')), ('format', 'avt'))}
  assert report['excluded'] and all(n.startswith('classifier/') for n in report['excluded'])
  # Left at init: what a run without labels has not got, the final encoder norms and the fusion
  # weights of the classification branch (`with_classification_branch`).
  assert report['init'] == ['encoder/encoder_norm_audio/bias', 'encoder/encoder_norm_audio/scale',
                            'encoder/encoder_norm_video/bias', 'encoder/encoder_norm_video/scale',
                            'logit_fusion/modality_weights']
  assert any(n.startswith('encoder/') for n in report['loaded'])
  labelled = json.loads((tmp_path / 'finetune' / 'results.json').read_text())
  pretrained = json.loads((tmp_path / 'pretrain' / 'results.json').read_text())
  assert 'top1' not in pretrained['eval']  # no classifier trained without labels
  # Half of each class's 24 training clips (4 classes; the manifest interleaves its test clips) for
  # both runs with labels: 48, of which preparation holds some voices out as `val` again.
  stats = data_format.read_stats(os.path.join(os.path.dirname(data_dir), 'prepared_labels50'))
  assert stats['num_clips']['train'] + stats['num_clips']['val'] == 48, stats['num_clips']
  assert labelled['eval']['num_videos'] == 24
  stamps = {p: os.path.getmtime(p) for p in tmp_path.glob('*/results.json')}
  assert study() == out
  assert stamps == {p: os.path.getmtime(p) for p in tmp_path.glob('*/results.json')}


@pytest.mark.parametrize('num_classes', [4, 10])
def test_complementary_classes_need_both_modalities(num_classes):
  content = [voice_digits.class_content('complementary', num_classes, k) for k in range(num_classes)]
  assert len(set(content)) == num_classes  # (digit, phrase) names the class
  digits, phrases = zip(*content)
  # Every digit and every phrase is shared by at least two classes: neither names the class alone.
  assert min(digits.count(d) for d in digits) >= 2
  assert min(phrases.count(p) for p in phrases) >= 2
  assert voice_digits.class_names('complementary', 4) == ['0_oops', '1_oops', '0_nooo', '1_nooo']
  assert voice_digits.class_names('clean', 2) == ['0_hello', '1_byebye']


# The benchmark suite (avt_jax/prep/suite): SoundFont instruments x icon themes.

SUITE_SOURCES = missing_sources(
    lambda: sets.check_sources(sets.SETS[learning_benchmark.REDUCED_SET['name']]))


@pytest.fixture(scope='module')
def reduced_dir(tmp_path_factory):
  if SUITE_SOURCES:
    pytest.skip(SUITE_SOURCES)
  options = dict(learning_benchmark.REDUCED_SET)
  return suite.ensure(options.pop('name'), str(tmp_path_factory.mktemp('suite_cache')),
                      progress=False, **options)


def test_suite_sets_test_on_unseen_banks_and_themes(reduced_dir):
  train, test = clips.sources(reduced_dir, 'train'), clips.sources(reduced_dir, 'test')
  assert train == ['MuseScore-Adwaita', 'MuseScore-Tango', 'MuseScore-oxygen']
  assert test == ['TimGM6mb-elementary-xfce']
  with open(os.path.join(reduced_dir, 'stats.json')) as f:
    stats = json.load(f)
  assert stats['num_clips'] == {'train': 81, 'val': 15, 'test': 32}  # >= 15% of 96 held out
  assert stats['label_names']['class'] == [
      'organ+folder', 'trumpet+user-trash', 'xylophone+printer', 'guitar+computer']


def test_labelled_subset_keeps_a_balanced_fraction_and_the_whole_test_split(reduced_dir):
  subset = clips.labelled_subset(reduced_dir, 0.25, progress=False)
  with open(os.path.join(subset, 'stats.json')) as f:
    stats = json.load(f)
  assert stats['num_clips'] == {'train': 24, 'test': 32}  # 6 of each class's 24 training clips
  with open(os.path.join(os.path.dirname(subset), 'manifest.csv')) as f:
    rows = list(csv.DictReader(f))
  with open(os.path.join(subset, 'manifest.csv')) as f:
    kept = [r for r in csv.DictReader(f) if r['split'] == 'train']
  labels = sorted({r['label'] for r in rows})
  # The first 6 training clips of each class, in manifest order.
  assert kept == [r for r in rows if r['split'] == 'train' and
                  [x for x in rows if x['split'] == 'train' and x['label'] == r['label']].index(r) < 6]
  assert sorted({r['label'] for r in kept}) == labels


def test_floors_of_a_labelled_subset_are_its_own_and_need_two_clips_a_class(reduced_dir):
  """`--label_fraction`: the floors are fitted on the subset's clips (k-fold down to 3 clips a
  class) and kept beside the set's own, not over them."""
  subset = clips.labelled_subset(reduced_dir, 0.125, progress=False)  # 3 of 24 clips a class
  floors = learning_benchmark.load_floors(subset)
  parent = os.path.dirname(subset)
  with open(os.path.join(parent, 'floors-prepared_labels12.json')) as f:
    assert json.load(f) == floors
  assert not os.path.exists(os.path.join(parent, 'floors-prepared.json'))
  assert set(floors) == {'video', 'audio', 'av', 'floor_seconds'}
  single = clips.labelled_subset(reduced_dir, 0.01, progress=False)  # 1 clip a class
  with pytest.raises(ValueError, match="labels1 'train': logistic regression needs at least 2"):
    learning_benchmark.linear_floors(single)


def test_suite_sets_classes_and_reliable_modalities():
  assert len(suite.SUITE) >= 4
  assert {'audio', 'video', 'neither alone'} <= set(suite.RELIABLE[n] for n in suite.SUITE)
  for name in suite.SUITE:
    spec = sets.SETS[name]
    assert 8 <= len(spec.classes) <= 20 and len(set(spec.classes)) == len(spec.classes)
    train, test = (n * len(spec.classes) for n in spec.per_class)
    assert 300 <= train <= 500 and 60 <= test <= 120, (name, train, test)
  cross = sets.SETS['instrument_x_icon'].classes
  instruments, pictures = zip(*cross)
  # Every instrument and every icon is shared by 4 classes: each modality alone is at most 25% right.
  assert {instruments.count(i) for i in instruments} == {pictures.count(p) for p in pictures} == {4}


def test_midi_file_matches_the_smf_layout():
  data = soundfonts.midi_file([(19, 60, 100), (56, 62, 90)])
  assert data[:14] == b'MThd\x00\x00\x00\x06\x00\x00\x00\x01\x01\xe0'  # format 0, 1 track, 480 tpq
  # Hand-assembled track: program change and note on at tick 0, note off after 1 s (960 ticks, the
  # variable-length bytes 0x87 0x40); the second note starts 2 s in (one slot); the track ends 2 s
  # after the second note's start.
  assert data[14:22] == b'MTrk' + (30).to_bytes(4, 'big')
  assert data[22:] == bytes([0, 0xC0, 19, 0, 0x90, 60, 100, 0x87, 0x40, 0x80, 60, 0,
                             0x87, 0x40, 0xC0, 56, 0, 0x90, 62, 90, 0x87, 0x40, 0x80, 62, 0,
                             0x87, 0x40, 0xFF, 0x2F, 0x00])


def test_shared_renderer_is_deterministic_and_looks_degrade_the_picture():
  icon = np.zeros((8, 8, 4), np.float32)
  icon[2:6, 2:6] = (1.0, 0.0, 0.0, 1.0)  # a red square
  seeded = lambda: np.random.default_rng([0, 1, 2])
  frames = clips.render_video(icon, seeded())
  np.testing.assert_array_equal(frames, clips.render_video(icon, seeded()))
  assert frames.shape == (round(clips.DURATION_S * clips.VIDEO_FPS), clips.FRAME_SIZE,
                          clips.FRAME_SIZE, 3)
  redness = lambda f: (f[..., 0].astype(float) - f[..., 1]).max(axis=(1, 2)).mean()
  faint = clips.render_video(icon, seeded(), sets.SETS['instruments_faint_icons'].video_look)
  assert redness(frames) > 150 and redness(faint) < redness(frames)
  sound = np.ones(8000, np.float32)
  quiet = clips.render_audio(sound, seeded(), sets.SETS['icons_noisy_instruments'].audio_look)
  loud = clips.render_audio(sound, seeded())
  assert quiet.shape == loud.shape == (round(clips.DURATION_S * clips.AUDIO_RATE),)
  assert np.abs(quiet).max() < 0.5 < np.abs(loud).max()


def test_summarise_gives_mean_and_sample_std_over_seeds():
  runs = {0: {'eval': {'top1': 0.5, 'modality_top1/audio': 0.25}, 'train_seconds': 10.0,
              'train_eval': {'top1': 1.0}},
          1: {'eval': {'top1': 0.7, 'modality_top1/audio': 0.75}, 'train_seconds': 20.0,
              'train_eval': {'top1': 0.8}}}
  out = learning_benchmark.summarise(runs)
  assert out['seeds'] == [0, 1]
  assert out['top1']['mean'] == pytest.approx(0.6)
  assert out['top1']['std'] == pytest.approx(np.sqrt(0.02))  # (0.1^2 + 0.1^2) / (2 - 1)
  assert out['audio_branch_top1']['mean'] == pytest.approx(0.5)
  assert out['train_top1']['values'] == [1.0, 0.8]
  assert 'video_branch_top1' not in out  # not reported by these runs
  assert learning_benchmark.mean_std([0.3]) == (0.3, 0.0)


def test_missing_package_gives_one_line_and_the_other_sets_go_on(monkeypatch, tmp_path, capsys):
  if SUITE_SOURCES:
    pytest.skip(SUITE_SOURCES)
  icons._index.cache_clear()
  monkeypatch.setattr(icons, 'ICONS_DIR', str(tmp_path / 'no_icons'))
  try:
    table = learning_benchmark.run_suite(['instruments_icons', 'instrument_x_icon'], [0], ['av'],
                                         str(tmp_path / 'work'), 'configs/manifest.py', [],
                                         str(tmp_path / 'cache'))
  finally:
    icons._index.cache_clear()
  lines = capsys.readouterr().out.strip().split('\n')
  assert len(lines) == 2 and lines[0].startswith('instruments_icons: not run: Icon theme')
  assert all(line.endswith('`apt-get install adwaita-icon-theme`.') for line in lines)
  assert set(table) == {'instruments_icons', 'instrument_x_icon'}
  assert '| instruments_icons | not run: ' in learning_benchmark.markdown(table)
  assert not (tmp_path / 'cache').exists()  # sources are checked before anything is written


def test_markdown_reports_mean_std_and_floors():
  runs = {0: {'eval': {'top1': 0.5}, 'train_seconds': 10.0},
          1: {'eval': {'top1': 0.7}, 'train_seconds': 20.0}}
  table = {'s': {'floors': {'av': 0.4, 'video': 0.3, 'audio': 0.2},
                 'runs': {'av': learning_benchmark.summarise(runs)}}}
  row = learning_benchmark.markdown(table).split('\n')[2]
  assert row == ('| s | av | 2 | 0.600 ± 0.141 | n/a | n/a | n/a | 0.400 | 0.400 / 0.300 / 0.200 '
                 '| 15 |')


def test_reduced_suite_fusion_keeps_the_reliable_modality_and_beats_the_floors(reduced_dir, tmp_path):
  """Item 6 of issue 20: where audio is the reliable modality, audio + video is not below audio only
  or video only and beats every linear floor (the recipe of configs/manifest.py, a tiny model).

  Fusion must not lose to the better single-modality run by more than one of the 32 test clips
  (measured: audio + video 0.656 on 2026-12-07 and 0.719 on 2026-12-06, audio only 0.625, video only
  0.188; what calibrated late fusion is for: the faint video must not drag the prediction down). The floor target
  is open (issue 20 item 2: floors 0.750 both, 0.719 audio, 0.500 video), so that last check is an
  expected failure until the recipe passes."""
  floors = learning_benchmark.linear_floors(reduced_dir)
  env = {k: v for k, v in os.environ.items() if k not in ('JAX_COMPILATION_CACHE_DIR', 'XLA_FLAGS')}
  top1 = {}
  for run, suffix in learning_benchmark.RUNS.items():
    summary = learning_benchmark.train_run(
        os.path.join(ROOT, 'configs/manifest.py') + suffix, reduced_dir, str(tmp_path / run),
        learning_benchmark.REDUCED_OVERRIDES, log=str(tmp_path / f'{run}.log'), env=env)
    top1[run] = summary['eval']['top1']
  # Training-set accuracy: results.json's `train_eval`, or the benchmark's own evaluation, kept there.
  train_top1 = learning_benchmark.train_accuracy(
      os.path.join(ROOT, 'configs/manifest.py'), reduced_dir, str(tmp_path / 'av'),
      learning_benchmark.REDUCED_OVERRIDES)['top1']
  with open(tmp_path / 'av' / 'results.json') as f:
    assert json.load(f)['train_eval']['top1'] == train_top1
  print(f'reduced suite: test top-1 {top1}, floors {floors}, av training top-1 {train_top1}')
  assert top1['audio'] > floors['video'], (top1, floors)  # audio is the reliable modality here
  assert top1['av'] >= max(top1['video'], top1['audio']) - 1 / 32, (top1, floors)
  if top1['av'] <= max(floors.values()):
    pytest.xfail(f'issue 20 item 2, open: audio + video {top1["av"]:.3f} is not above the best '
                 f'linear floor {max(floors.values()):.3f} ({top1}, floors {floors}).')


@pytest.mark.parametrize('flag, named', [('--sets=instruments_icons,nope', '--sets'),
                                         ('--runs=av,both', '--runs'), ('--seeds=0,x', '--seeds'),
                                         ('--jobs=0', 'jobs'), ('--nosuch=1', 'nosuch'),
                                         ('--label_fraction=1.5', '--label_fraction'),
                                         ('--pretrain_study', '--pretrain_study'),
                                         ('--pretrain_override=--config.seed=1',
                                          '--pretrain_override'),
                                         ('--reduced --label_fraction=0.1', '--label_fraction')])
def test_bad_flags_are_one_line_naming_the_flag(flag, named, capsys):
  with pytest.raises(SystemExit) as stop:
    learning_benchmark.main(flag.split())
  assert stop.value.code == 2
  err = capsys.readouterr().err.strip().split('\n')
  assert len(err) == 1 and err[0].startswith('python -m avt_jax.learning_benchmark: error:')
  assert named in err[0]


def test_a_failed_run_in_a_fresh_workdir_names_its_log(tmp_path):
  """A run's folder and log are created on first use; a run that fails is one error naming the log."""
  log = tmp_path / 'fresh' / 'set' / 'av_seed0.log'
  with pytest.raises(RuntimeError, match='av_seed0.log'):
    learning_benchmark.train_run(str(tmp_path / 'no_such_config.py'), str(tmp_path),
                                 str(tmp_path / 'fresh' / 'set' / 'av_seed0'), log=str(log))
  assert 'no_such_config.py' in log.read_text()


def test_a_run_without_a_classifier_is_reported_not_fatal(tmp_path, capsys):
  """A self-supervised run (e.g. contrastive only: retrieval, no top-1) goes through the run loop."""
  run_dir = tmp_path / 'toy' / 'av_seed0'
  run_dir.mkdir(parents=True)
  kept = {'eval': {'retrieval/v2a_R@1': 0.25, 'num_videos': 8}, 'train_seconds': 3.0,
          'train_eval': {}}
  (run_dir / 'results.json').write_text(json.dumps(kept))
  done = learning_benchmark._train_all([('toy', str(tmp_path), 'av', 0)], str(tmp_path),
                                       'configs/manifest.py', [], train_eval=False, jobs=1)
  assert done[('toy', 'av', 0)]['eval'] == kept['eval']
  assert 'toy av seed 0: test top-1 nan' in capsys.readouterr().out
  assert 'top1' not in learning_benchmark.summarise({0: done[('toy', 'av', 0)]})


def test_a_self_supervised_checkpoint_is_probed_on_its_layer_normalised_encoder_output():
  """A contrastive-only run has no classifier and no final encoder norms; the probe's features are
  then the CLS tokens under plain layer normalisation (hand-computed here), the run's leaves kept."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  from conftest import random_params, tiny_config  # pylint: disable=g-import-not-at-top
  from avt_jax.models import build_model  # pylint: disable=g-import-not-at-top
  from avt_jax.models.build import example_inputs  # pylint: disable=g-import-not-at-top

  config = tiny_config(**{'model.fusion': 'late', 'model.classifier': 'token'})
  model = build_model(config)
  inputs = example_inputs(config, batch=3)
  inputs['video'] = np.random.default_rng(0).normal(size=inputs['video'].shape).astype(np.float32)
  inputs['audio'] = np.random.default_rng(1).normal(size=inputs['audio'].shape).astype(np.float32)
  init = lambda objectives: jax.eval_shape(lambda: model.init(
      {'params': jax.random.PRNGKey(0), 'masking': jax.random.PRNGKey(0)}, inputs, train=False,
      objectives=objectives))['params']
  params = random_params(init(('contrastive',)))
  assert not any('encoder_norm' in '/'.join(k) or k[0] == 'classifier'
                 for k in traverse_util.flatten_dict(params))

  filled = learning_benchmark.with_classification_branch(config, model, params)

  assert set(traverse_util.flatten_dict(filled)) == set(
      traverse_util.flatten_dict(nn.meta.unbox(init(('classification', 'contrastive')))))
  for key, value in traverse_util.flatten_dict(params).items():
    np.testing.assert_array_equal(traverse_util.flatten_dict(filled)[key], value)
  features = model.apply({'params': filled}, inputs, objectives=('classification',))['features']
  for m in ('video', 'audio'):
    cls = np.asarray(features['pre_fusion_token'][m], np.float64)
    normalised = (cls - cls.mean(-1, keepdims=True)) / np.sqrt(cls.var(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(features['final'][m], normalised, rtol=1e-4, atol=1e-4)
