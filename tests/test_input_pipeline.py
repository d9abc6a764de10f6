"""Tests for avt_jax.input.pipeline on small record files written with `records.encode_clip`.

Synthetic clips encode where they come from: clip `c`'s stored frame `k` is a uniform gray image of
level `10 + 20 k`, and its log-mel row `t` holds `100 c + t` in every mel bin. Video is stored at
10 fps and audio at 20 frames/s, so video frame `k` starts at audio row `2 k`.
"""

import json
import math
import os
import shutil

import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from avt_jax import record_files
from avt_jax import records
from avt_jax.input import pipeline

FPS, AUDIO_FPS, N_MELS = 10.0, 20.0, 4
HEIGHT, WIDTH = 24, 32
MEAN, STD = 3.0, 2.0
NUM_CLASSES = 3
# Per file, (stored video frames, stored audio rows) of each clip; clip ids count up across files.
TRAIN_FILES = [[(12, 24), (9, 18), (7, 14), (5, 10)], [(12, 18), (10, 20), (8, 16)],
               [(11, 22), (6, 12), (12, 24)]]
NUM_CLIPS = sum(len(f) for f in TRAIN_FILES)
SPAN = 7  # num_frames 4, frame_stride 2


def _gray_jpeg(level: int) -> bytes:
  image = tf.fill([HEIGHT, WIDTH, 3], tf.constant(level, tf.uint8))
  return tf.io.encode_jpeg(image, quality=95).numpy()


def _clip(index: int, num_frames: int, num_audio: int, *, labels=None,
          n_mels: int = N_MELS) -> bytes:
  rows = 100 * index + np.arange(num_audio, dtype=np.float32)
  logmel = np.repeat(rows[:, None], n_mels, axis=1)
  return records.encode_clip(records.Clip(
      clip_id=f'clip{index}', source=f'video{index}.mp4', start=0.0, end=num_frames / FPS,
      labels=labels if labels is not None else {'class': [index % NUM_CLASSES]},
      jpeg_frames=[_gray_jpeg(10 + 20 * k) for k in range(num_frames)], fps=FPS, height=HEIGHT,
      width=WIDTH, logmel=logmel, audio_fps=AUDIO_FPS))


def _write_split(data_dir: str, split: str, files: list[list[bytes]]) -> None:
  for i, serialized in enumerate(files):
    path = os.path.join(data_dir, f'{split}-{i:05d}-of-{len(files):05d}.tfrecord')
    with tf.io.TFRecordWriter(path) as f:
      for record in serialized:
        f.write(record)


def _write_stats(data_dir: str, **overrides) -> None:
  stats = dict(logmel_mean=MEAN, logmel_std=STD, num_clips={'train': NUM_CLIPS},
               num_classes={'class': NUM_CLASSES}, fps=FPS, n_mels=N_MELS,
               audio_frames_per_second=AUDIO_FPS)
  stats.update(overrides)
  with open(os.path.join(data_dir, 'stats.json'), 'w') as f:
    json.dump(stats, f)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory) -> str:
  path = str(tmp_path_factory.mktemp('records'))
  files, index = [], 0
  for clips in TRAIN_FILES:
    files.append([])
    for num_frames, num_audio in clips:
      files[-1].append(_clip(index, num_frames, num_audio))
      index += 1
  _write_split(path, 'train', files)
  _write_stats(path)
  return path


def _config(**input_overrides) -> ml_collections.ConfigDict:
  """A tiny config with every augmentation off."""
  config = ml_collections.ConfigDict()
  config.data = ml_collections.ConfigDict(dict(
      train_split='train', label_heads=('class',), num_classes={'class': NUM_CLASSES},
      multi_label=False))
  config.input = ml_collections.ConfigDict(dict(
      batch_size=4, eval_batch_size=4, num_frames=4, frame_stride=2, image_size=8, audio_frames=12,
      n_mels=N_MELS, shuffle_buffer=6, min_resize=12, crop_area_range=(1.0, 1.0), flip=False,
      color_jitter=0.0,
      spec_augment=ml_collections.ConfigDict(dict(freq_masks=0, freq_width=0, time_masks=0,
                                                  time_width=0)),
      spec_stretch=ml_collections.ConfigDict(dict(time=0.0, freq=0.0)), mixup_alpha=0.0, eval_clips=1, eval_crops=1))
  config.input.update(input_overrides)
  return config


def _augmented_config(**input_overrides) -> ml_collections.ConfigDict:
  config = _config(crop_area_range=(0.3, 1.0), flip=True, color_jitter=0.4, mixup_alpha=0.4,
                   spec_augment=ml_collections.ConfigDict(dict(freq_masks=1, freq_width=2,
                                                               time_masks=1, time_width=3)),
                   spec_stretch=ml_collections.ConfigDict(dict(time=0.2, freq=0.1)))
  config.input.update(input_overrides)
  return config


def _take(iterator, n: int) -> list[dict[str, np.ndarray]]:
  return [next(iterator) for _ in range(n)]


def _frame_numbers(video: np.ndarray) -> np.ndarray:
  """[..., T, S, S, 3] in [-1, 1] -> [..., T] stored frame numbers from the gray level."""
  levels = ((video + 1.0) * 127.5).mean(axis=(-3, -2, -1))
  return np.round((levels - 10) / 20).astype(int)


def _raw_audio(audio: np.ndarray) -> np.ndarray:
  """[..., A, M] normalised -> [..., A] raw log-mel values (`100 clip + row`)."""
  raw = audio * STD + MEAN
  np.testing.assert_allclose(raw - raw[..., :1], 0.0, atol=1e-3)  # all mel bins are equal
  return np.round(raw[..., 0]).astype(int)


def _clip_lengths() -> dict[int, tuple[int, int]]:
  return dict(enumerate(clip for clips in TRAIN_FILES for clip in clips))


def _check_window(video: np.ndarray, audio: np.ndarray) -> tuple[int, int]:
  """Checks one view against the synthetic encoding; returns (clip, video start frame)."""
  raw = _raw_audio(audio)
  clip = int(raw[0] // 100)
  num_frames, num_audio = _clip_lengths()[clip]
  frames = _frame_numbers(video)
  first = int(frames[0])
  assert 0 <= first <= max(num_frames - SPAN, 0)
  # Video: frames `frame_stride` apart, the last stored frame repeated past the end.
  np.testing.assert_array_equal(frames, np.minimum(first + 2 * np.arange(4), num_frames - 1))
  # Audio (12 rows) is centred on the video window (4 frames x stride 2 = 16 rows from row 2 * first),
  # shifted to stay inside the clip where it can, and padded with the clip minimum (100 * clip).
  audio_first = min(2 * first + (16 - 12) // 2, max(num_audio - 12, 0))
  rows = audio_first + np.arange(12)
  np.testing.assert_array_equal(raw, np.where(rows < num_audio, 100 * clip + rows, 100 * clip))
  return clip, first


def test_train_batches_have_the_documented_shapes_and_ranges(data_dir):
  batch = next(pipeline.make_train_iterator(_augmented_config(), data_dir, seed=0))
  assert sorted(batch) == ['audio', 'labels/class', 'mask', 'video']
  assert batch['video'].shape == (4, 4, 8, 8, 3) and batch['video'].dtype == np.float32
  assert batch['audio'].shape == (4, 12, N_MELS) and batch['audio'].dtype == np.float32
  assert batch['labels/class'].shape == (4, NUM_CLASSES)
  assert batch['labels/class'].dtype == np.float32
  np.testing.assert_array_equal(batch['mask'], np.ones(4, np.float32))
  assert batch['video'].min() >= -1.0 and batch['video'].max() <= 1.0
  # Mixed one-hot labels still sum to one.
  np.testing.assert_allclose(batch['labels/class'].sum(axis=1), 1.0, rtol=1e-6)


def test_train_audio_window_is_centred_on_the_video_window(data_dir):
  # 3 batches of 4 cross the first epoch boundary (10 clips).
  batches = _take(pipeline.make_train_iterator(_config(), data_dir, seed=3), 3)
  clips, starts = [], []
  for batch in batches:
    for video, audio, labels in zip(batch['video'], batch['audio'], batch['labels/class']):
      clip, start = _check_window(video, audio)
      np.testing.assert_array_equal(labels, np.eye(NUM_CLASSES)[clip % NUM_CLASSES])
      clips.append(clip)
      starts.append(start)
  assert sorted(clips[:NUM_CLIPS]) == list(range(NUM_CLIPS))  # the first epoch has every clip once
  assert clips[:NUM_CLIPS] != list(range(NUM_CLIPS))  # ... shuffled
  assert len(set(starts)) > 2  # random temporal starts


def test_train_is_deterministic_and_resumes_exactly(data_dir):
  # 10 clips per epoch, 4 per batch: step 2 straddles epochs 0 and 1, step 5 begins epoch 2.
  config = _augmented_config()
  uninterrupted = _take(pipeline.make_train_iterator(config, data_dir, seed=5), 7)
  tf.random.set_seed(1234)  # TF's global seed must not matter
  try:
    for start_step in (0, 2, 5):
      resumed = _take(pipeline.make_train_iterator(config, data_dir, seed=5,
                                                   start_example=start_step * 4), 2)
      for expected, actual in zip(uninterrupted[start_step:], resumed):
        assert sorted(expected) == sorted(actual)
        for key in expected:
          assert np.array_equal(expected[key], actual[key]), (start_step, key)
  finally:
    tf.random.set_seed(None)
  other_seed = next(pipeline.make_train_iterator(config, data_dir, seed=6))
  assert not np.array_equal(uninterrupted[0]['video'], other_seed['video'])


@pytest.mark.parametrize('before, after', [(4, 8), (8, 4), (4, 6)])
def test_resume_after_a_batch_size_change_continues_with_the_next_example(data_dir, before, after):
  """Two steps at batch `before` consumed examples 0 .. 2 * before - 1 (the checkpoint's
  `examples_seen`); the resumed run at batch `after` starts with example 2 * before, none skipped or
  repeated, whatever the batch sizes (the stream is a function of the example counter)."""
  config = _augmented_config(mixup_alpha=0.0)
  config.input.batch_size = 2
  batches = _take(pipeline.make_train_iterator(config, data_dir, seed=5), 16)
  reference = {key: np.concatenate([b[key] for b in batches]) for key in ('video', 'audio')}  # 0..31
  config.input.batch_size = after
  resumed = next(pipeline.make_train_iterator(config, data_dir, seed=5, start_example=2 * before))
  for key in ('video', 'audio'):
    np.testing.assert_array_equal(resumed[key], reference[key][2 * before:2 * before + after])
  # Resuming at the step (2) under the new batch size would start at example 2 * after instead.
  assert not np.array_equal(resumed['video'][:2], reference['video'][2 * after:2 * after + 2])


def test_start_example_must_split_over_the_processes(data_dir):
  with pytest.raises(ValueError, match='start_example must be a non-negative multiple of the process '
                                       'count 2, got 3'):
    pipeline.make_train_iterator(_config(batch_size=2), data_dir, seed=0, start_example=3,
                                 process_index=0, process_count=2)


def test_stream_identity_refuses_changes_that_reorder_examples(data_dir):
  identity = lambda config, seed=5, count=1: pipeline.stream_identity(config, data_dir, seed=seed,
                                                                      process_count=count)
  saved = json.loads(json.dumps(identity(_config())))  # as stored in a checkpoint's meta
  pipeline.check_same_stream(saved, identity(_config(batch_size=8)))  # the batch size may change
  pipeline.check_same_stream(None, identity(_config(shuffle_buffer=3)))  # older checkpoints
  cases = [(identity(_config(shuffle_buffer=3)), "config.input.shuffle_buffer is 6 in the checkpoint "
            "and 3 now"),
           (identity(_config(), seed=6), 'config.seed is 5 in the checkpoint and 6 now'),
           (identity(_config(), count=2), 'the number of processes reading their own training '
            r'files \(jax.process_count\(\) when sharding by files, 1 by examples: '
            r'config.input.shard_by\) is 1 in the checkpoint and 2 now'),
           (dict(identity(_config()), train_files=['train-00000-of-00001.tfrecord']),
            'the training record files in config.data.data_dir is .3 files')]
  for current, message in cases:
    with pytest.raises(ValueError, match=message):
      pipeline.check_same_stream(saved, current)
  # Checkpoints from before config.input.shard_by stored the process count (all read by files).
  older = {**{key: value for key, value in saved.items() if key != 'readers'}, 'process_count': 1}
  with pytest.raises(ValueError, match='reading their own training files .* is 1 in the checkpoint '
                                       'and 2 now'):
    pipeline.check_same_stream(older, identity(_config(), count=2))


def test_filter_augment_adds_a_per_clip_gain_curve_of_at_most_max_db(data_dir):
  plain = next(pipeline.make_train_iterator(_config(), data_dir, seed=4))
  filtered = next(pipeline.make_train_iterator(
      _config(filter_augment=ml_collections.ConfigDict(dict(max_db=6.0, bands=(3, 6)))),
      data_dir, seed=4))
  np.testing.assert_array_equal(filtered['video'], plain['video'])  # other streams untouched
  gain = (filtered['audio'] - plain['audio']) * STD  # [B, A, M] in log-power units
  np.testing.assert_allclose(gain - gain[:, :1], 0.0, atol=1e-4)  # one curve for all frames
  max_gain = 6.0 * np.log(10) / 10  # 6 dB of power in natural-log units
  assert np.abs(gain).max() <= max_gain + 1e-4
  assert np.abs(gain).max() > max_gain / 2
  assert not np.allclose(gain[0, 0], gain[1, 0])  # each clip its own filter


def test_mixup_uses_one_lambda_for_video_audio_and_labels(data_dir):
  plain = next(pipeline.make_train_iterator(_config(crop_area_range=(0.3, 1.0), flip=True),
                                            data_dir, seed=4))
  mixed = next(pipeline.make_train_iterator(_config(crop_area_range=(0.3, 1.0), flip=True,
                                                    mixup_alpha=0.5), data_dir, seed=4))
  # Solve mixed = lam * x + (1 - lam) * roll(x) for lam from the video, then check the others.
  x, partner = plain['video'].ravel(), np.roll(plain['video'], 1, axis=0).ravel()
  lam = float(np.dot(mixed['video'].ravel() - partner, x - partner) /
              np.dot(x - partner, x - partner))
  assert 0.0 < lam < 1.0
  for key in ('video', 'audio', 'labels/class'):
    expected = lam * plain[key] + (1 - lam) * np.roll(plain[key], 1, axis=0)
    np.testing.assert_allclose(mixed[key], expected, atol=1e-4)


def _eval_views(config, data_dir, **kwargs) -> tuple[list[dict[str, np.ndarray]], dict]:
  batches = list(pipeline.make_eval_iterator(config, data_dir, 'train', **kwargs))
  rows = {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}
  return batches, rows


def test_eval_yields_every_video_once_with_all_views(data_dir):
  config = _config(eval_clips=3, eval_crops=3, eval_batch_size=4)
  batches, rows = _eval_views(config, data_dir)
  views = 9
  assert len(batches) == math.ceil(NUM_CLIPS * views / 4)
  for batch in batches:
    assert batch['video'].shape == (4, 4, 8, 8, 3) and batch['index'].dtype == np.int32
  real = rows['mask'] == 1
  # Padding only at the end: mask 0, index -1, zeros.
  assert real.sum() == NUM_CLIPS * views and real[:NUM_CLIPS * views].all()
  np.testing.assert_array_equal(rows['index'][~real], -1)
  assert not rows['video'][~real].any() and not rows['labels/class'][~real].any()
  # Views of one video are consecutive; indices count videos in order.
  index = rows['index'][real]
  np.testing.assert_array_equal(index, np.repeat(np.arange(NUM_CLIPS), views))
  seen = set()
  for video_index in range(NUM_CLIPS):
    sel = np.flatnonzero(index == video_index)
    clip_starts = [_check_window(rows['video'][i], rows['audio'][i]) for i in sel]
    clip = clip_starts[0][0]
    assert {c for c, _ in clip_starts} == {clip}
    np.testing.assert_array_equal(rows['labels/class'][sel],
                                  np.eye(NUM_CLASSES)[[clip % NUM_CLASSES] * views])
    # Clip-major: three crops per temporal clip; starts evenly spaced over [0, max_start].
    max_start = max(_clip_lengths()[clip][0] - SPAN, 0)
    expected = [0, math.floor(max_start / 2 + 0.5), max_start]
    assert [s for _, s in clip_starts] == [s for s in expected for _ in range(3)]
    seen.add(clip)
  assert seen == set(range(NUM_CLIPS))


def test_eval_single_clip_is_centred(data_dir):
  _, rows = _eval_views(_config(eval_batch_size=4), data_dir)
  for i in np.flatnonzero(rows['mask'] == 1):
    clip, start = _check_window(rows['video'][i], rows['audio'][i])
    assert start == max(_clip_lengths()[clip][0] - SPAN, 0) // 2


def test_eval_crops_are_left_centre_right(tmp_path):
  # Brightness 4 * column + 2 * row; crops of 16 stored pixels at x = 0, 8, 16 and y = 4.
  rows_, cols = np.meshgrid(np.arange(HEIGHT), np.arange(WIDTH), indexing='ij')
  image = np.repeat((4 * cols + 2 * rows_)[..., None], 3, axis=-1).astype(np.uint8)
  jpeg = tf.io.encode_jpeg(image, quality=100).numpy()
  data_dir = str(tmp_path)
  _write_split(data_dir, 'train', [[records.encode_clip(records.Clip(
      clip_id='ramp', source='ramp.mp4', start=0.0, end=1.0, labels={'class': [0]},
      jpeg_frames=[jpeg] * 8, fps=FPS, height=HEIGHT, width=WIDTH,
      logmel=np.zeros([16, N_MELS], np.float32), audio_fps=AUDIO_FPS))]])
  _write_stats(data_dir)
  _, rows = _eval_views(_config(eval_crops=3, eval_batch_size=3), data_dir)
  means = ((rows['video'] + 1.0) * 127.5).mean(axis=(1, 2, 3, 4))
  expected = [4 * (x + 7.5) + 2 * (4 + 7.5) for x in (0, 8, 16)]
  np.testing.assert_allclose(means, expected, atol=2.0)


def _clips_in(rows: dict) -> list[int]:
  real = rows['mask'] == 1
  return [int(raw[0] // 100) for raw in _raw_audio(rows['audio'][real])]


def test_hosts_read_disjoint_files_covering_the_split(data_dir):
  config = _config(eval_batch_size=4)
  host_clips, host_batches = [], []
  for host in range(2):
    batches, rows = _eval_views(config, data_dir, process_index=host, process_count=2)
    host_clips.append(_clips_in(rows))
    host_batches.append(len(batches))
    assert all(b['video'].shape[0] == 2 for b in batches)  # per-host batch = 4 // 2
    real = rows['mask'] == 1  # index: position in the host's stream x 2 + host, unique
    np.testing.assert_array_equal(rows['index'][real], np.arange(real.sum()) * 2 + host)
  # Host 0 reads files 0 and 2, host 1 reads file 1.
  assert sorted(host_clips[0]) == [0, 1, 2, 3, 7, 8, 9]
  assert sorted(host_clips[1]) == [4, 5, 6]
  # Every host yields the same number of batches (host 1 gets empty ones: mask 0).
  assert host_batches == [4, 4]

  # Training: each host's first epoch is exactly its own files' clips.
  for host, expected in [(0, [0, 1, 2, 3, 7, 8, 9]), (1, [4, 5, 6])]:
    iterator = pipeline.make_train_iterator(_config(batch_size=2), data_dir, seed=0,
                                            process_index=host, process_count=2)
    clips = []
    while len(clips) < len(expected):
      clips.extend(int(r[0] // 100) for r in _raw_audio(next(iterator)['audio']))
    assert sorted(clips[:len(expected)]) == expected


def _global_batches(config, data_dir, process_count: int, steps: int, **kwargs) -> dict:
  """The first `steps` global batches: the hosts' batches concatenated in process order."""
  hosts = [_take(pipeline.make_train_iterator(config, data_dir, seed=3, process_index=host,
                                              process_count=process_count, **kwargs), steps)
           for host in range(process_count)]
  return {key: np.stack([np.concatenate([h[step][key] for h in hosts]) for step in range(steps)])
          for key in ('video', 'audio', 'labels/class')}


def test_sharding_by_examples_gives_the_single_process_batches(data_dir):
  # 3 files and 4 processes: 'auto' falls back to sharding by examples (2 processes: asked for).
  # Augmentations on (mixup, which mixes neighbours within a host's batch, aside): the global
  # batches, also after resuming mid-epoch on another number of processes, are those of one process
  # reading all files.
  config = _augmented_config(batch_size=4, mixup_alpha=0.0)
  single = _global_batches(config, data_dir, 1, 6)  # 24 examples: 2+ epochs of 10 clips
  for count, start, shard_by in [(4, 0, 'auto'), (2, 8, 'examples'), (4, 12, 'auto')]:
    config.input.shard_by = shard_by
    shards = _global_batches(config, data_dir, count, 6 - start // 4, start_example=start)
    for key, value in shards.items():
      np.testing.assert_array_equal(value, single[key][start // 4:], err_msg=f'{count} {key}')
  # The stream identity does not depend on the process count then: resuming across counts is allowed.
  by_examples = _config(shard_by='examples')
  saved = pipeline.stream_identity(by_examples, data_dir, seed=3, process_count=2)
  pipeline.check_same_stream(saved, pipeline.stream_identity(_config(), data_dir, seed=3,
                                                             process_count=1))
  pipeline.check_same_stream(saved, pipeline.stream_identity(_config(), data_dir, seed=3,
                                                             process_count=4))


def test_eval_by_examples_covers_every_video_once(data_dir):
  config = _config(eval_crops=3, eval_batch_size=4, shard_by='examples')
  _, single = _eval_views(config, data_dir)
  host_rows, host_batches = [], []
  for host in range(2):
    batches, rows = _eval_views(config, data_dir, process_index=host, process_count=2)
    host_rows.append({key: value[rows['mask'] == 1] for key, value in rows.items()})
    host_batches.append(len(batches))
  assert host_batches[0] == host_batches[1] == math.ceil(5 * 3 / 2)  # host 0 has 5 videos of 10
  rows = {key: np.concatenate([r[key] for r in host_rows]) for key in single}
  order = np.argsort(rows['index'], kind='stable')  # views of a video stay in order
  for key in single:
    np.testing.assert_array_equal(rows[key][order], single[key][single['mask'] == 1], err_msg=key)
  assert sorted(set(host_rows[0]['index'])) == [0, 2, 4, 6, 8]


def test_multi_label_and_two_heads(tmp_path):
  data_dir = str(tmp_path)
  _write_split(data_dir, 'train', [[
      _clip(0, 8, 16, labels={'verb': [1, 2], 'noun': [0]}),
      _clip(1, 8, 16, labels={'verb': [0], 'noun': []}),
  ]])
  _write_stats(data_dir, num_classes={'verb': 3, 'noun': 2})
  config = _config(batch_size=2, eval_batch_size=2)
  config.data.label_heads = ('verb', 'noun')
  config.data.num_classes = {'verb': 3, 'noun': 2}
  config.data.multi_label = True
  _, rows = _eval_views(config, data_dir)
  np.testing.assert_array_equal(rows['labels/verb'], [[0, 1, 1], [1, 0, 0]])
  np.testing.assert_array_equal(rows['labels/noun'], [[1, 0], [0, 0]])
  # Single-label configs reject records with several labels, naming the clip.
  config.data.multi_label = False
  with pytest.raises(ValueError, match='clip0'):
    list(pipeline.make_eval_iterator(config, data_dir, 'train'))


def test_num_eval_videos_reads_stats(data_dir):
  assert pipeline.num_eval_videos(data_dir, 'train') == NUM_CLIPS
  with pytest.raises(ValueError, match="'test'"):
    pipeline.num_eval_videos(data_dir, 'test')


def test_errors_on_bad_input(data_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    pipeline.make_train_iterator(_config(), str(tmp_path / 'missing'), seed=0)
  with pytest.raises(FileNotFoundError, match=r'valid-\*-of-\*\.tfrecord'):
    pipeline.make_eval_iterator(_config(), data_dir, 'valid')
  with pytest.raises(ValueError, match='batch_size=4 must be a positive multiple of the process '
                                       'count 3'):
    pipeline.make_train_iterator(_config(), data_dir, seed=0, process_index=0, process_count=3)
  with pytest.raises(ValueError, match="3 files match .* but there are 4 processes; "
                                       "config.input.shard_by='files' needs at least one file"):
    pipeline.make_eval_iterator(_config(eval_batch_size=8, shard_by='files'), data_dir, 'train',
                                process_index=0, process_count=4)
  with pytest.raises(ValueError, match=r"config.input.shard_by: expected one of \('auto', "
                                       r"'files', 'examples'\), got 'clips'"):
    pipeline.make_train_iterator(_config(shard_by='clips'), data_dir, seed=0)
  with pytest.raises(ValueError, match='n_mels=8'):
    pipeline.make_train_iterator(_config(n_mels=8), data_dir, seed=0)
  with pytest.raises(ValueError, match='frame_stride must be >= 1'):
    pipeline.make_train_iterator(_config(frame_stride=0), data_dir, seed=0)

  bad_stats = tmp_path / 'bad_stats'
  bad_stats.mkdir()
  _write_split(str(bad_stats), 'train', [[_clip(0, 8, 16)]])
  with pytest.raises(FileNotFoundError, match='stats.json'):
    pipeline.make_train_iterator(_config(), str(bad_stats), seed=0)
  with open(bad_stats / 'stats.json', 'w') as f:
    json.dump({'logmel_mean': 0.0, 'n_mels': N_MELS}, f)
  with pytest.raises(ValueError, match=r"lacks keys \['logmel_std', 'num_classes'\]"):
    pipeline.make_train_iterator(_config(), str(bad_stats), seed=0)


def test_record_with_wrong_n_mels_names_the_clip(tmp_path):
  data_dir = str(tmp_path)
  clips = [_clip(0, 8, 16), _clip(1, 8, 16, n_mels=N_MELS + 1), _clip(2, 8, 16)]
  _write_split(data_dir, 'train', [clips])
  _write_stats(data_dir)
  with pytest.raises(ValueError, match=r'wrong number of mel bins[\s\S]*clip1'):
    list(pipeline.make_eval_iterator(_config(), data_dir, 'train'))


def _damaged_copy(data_dir, tmp_path, name, keep, record_size):
  """A copy of `data_dir` with file `name` cut to `keep` of its bytes; with `record_size`, a
  shard_stats entry recording its whole size (as `prepare` writes)."""
  copy = str(tmp_path / 'copy')
  shutil.copytree(data_dir, copy)
  path = os.path.join(copy, name)
  size = os.path.getsize(path)
  if record_size:
    os.makedirs(os.path.join(copy, 'shard_stats'), exist_ok=True)
    with open(record_files.shard_stats_path(copy, name), 'w') as f:
      json.dump({'num_bytes': size, 'num_clips': 1}, f)
  os.truncate(path, int(size * keep))
  return copy, path


@pytest.mark.parametrize('recorded', [True, False])
def test_a_damaged_record_file_is_named_before_the_first_batch(data_dir, tmp_path, recorded):
  name = sorted(os.listdir(data_dir))[1]  # a train file after the first
  assert name.startswith('train-')
  copy, path = _damaged_copy(data_dir, tmp_path, name, 0.6, record_size=recorded)
  with pytest.raises(record_files.RecordFileError) as error:
    _take(pipeline.make_train_iterator(_config(), copy, seed=0), 3)
  message = str(error.value)
  assert path in message and 'avt_jax.prepare' in message and '\n' not in message
  assert ('when written' if recorded else 'cut short') in message
