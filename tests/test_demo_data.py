"""Tests for avt_jax.prep.demo_data: real media files, labels and synchronised events."""

import collections
import csv
import glob
import json
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import av
import librosa
import numpy as np
import pytest
import tensorflow as tf

from avt_jax import records
from avt_jax.prep import cache as cache_lib
from avt_jax.prep import demo_data
from avt_jax.prep import media


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
  cache = str(tmp_path_factory.mktemp('cache'))
  prepared = demo_data.ensure_demo_data(cache, train_per_class=1, test_per_class=1, num_workers=0,
                                        progress=False)
  folder = os.path.dirname(prepared)
  with open(os.path.join(folder, 'scenes.json')) as f:
    scenes = json.load(f)
  return cache, folder, prepared, scenes


def _records(prepared):
  return [records.parse_clip(x) for path in sorted(glob.glob(os.path.join(prepared, '*.tfrecord')))
          for x in tf.data.TFRecordDataset(path)]


def _square_colour_and_centres(frames: np.ndarray) -> tuple[str, np.ndarray]:
  """Colour name of the square and its centre in each frame ([frames, 2]) from [frames, h, w, 3]."""
  frames = frames.astype(np.float32)
  background = np.median(frames.reshape(len(frames), -1, 3), axis=1)[:, None, None]  # [frames, 1, 1, 3]
  mask = np.abs(frames - background).max(axis=-1) > 50  # [frames, h, w]
  colour = frames[mask].mean(axis=0)
  centres = np.array([np.argwhere(m).mean(axis=0) for m in mask])
  return list(demo_data.COLOURS)[int(np.argmax(colour))], centres


def _jump_times(centres: np.ndarray, fps: float) -> list[float]:
  step = np.linalg.norm(np.diff(centres, axis=0), axis=1)
  return [(i + 1) / fps for i in np.flatnonzero(step > 10)]  # drift is < 3 px per frame


def _onset_times(energy: np.ndarray, rate: float, threshold: float) -> list[float]:
  """Times where `energy` rises above `threshold`, ignoring ripples within 0.2 s of the previous onset."""
  loud = energy > threshold
  onsets = []
  for i in np.flatnonzero(loud[1:] & ~loud[:-1]) + 1:
    if not onsets or i / rate - onsets[-1] > 0.2:
      onsets.append(i / rate)
  return onsets


def test_videos_are_real_h264_and_aac(demo):
  _, folder, _, scenes = demo
  assert len(scenes) == 18
  for relative in list(scenes)[:3]:
    with av.open(os.path.join(folder, relative)) as container:
      video, audio = container.streams.video[0], container.streams.audio[0]
      assert (video.codec_context.name, audio.codec_context.name) == ('h264', 'aac')
      assert (video.width, video.height, video.average_rate) == (96, 96, 16)
      assert (audio.rate, audio.codec_context.layout.nb_channels) == (16000, 1)
      assert container.duration / av.time_base == pytest.approx(2.0, abs=0.1)
      assert sum(1 for _ in container.decode(video)) == 32


def test_manifest_is_balanced_and_factorial(demo):
  _, folder, prepared, _ = demo
  with open(os.path.join(folder, 'manifest.csv')) as f:
    rows = list(csv.DictReader(f))
  counts = collections.Counter((row['split'], row['label']) for row in rows)
  assert counts == {(split, name): 1 for split in ('train', 'test') for name in demo_data.CLASS_NAMES}
  with open(os.path.join(prepared, 'stats.json')) as f:
    stats = json.load(f)
  assert stats['num_clips'] == {'train': 9, 'test': 9}
  assert stats['label_names'] == {'class': demo_data.CLASS_NAMES}
  assert (stats['fps'], stats['short_side'], stats['n_mels']) == (8.0, 72, 64)
  assert stats['num_skipped'] == {'train': 0, 'test': 0} and stats['num_degraded'] == {'train': 0, 'test': 0}


def test_labels_match_square_colour_and_beep_pitch(demo):
  _, _, prepared, _ = demo
  clips = _records(prepared)
  assert len(clips) == 18
  mel_hz = librosa.mel_frequencies(n_mels=demo_data.PREPARED_N_MELS + 2, fmax=8000)[1:-1]
  for clip in clips:
    frames = np.stack([tf.io.decode_jpeg(f).numpy() for f in clip['jpeg']])
    assert frames.shape == (16, 72, 72, 3)
    colour, _ = _square_colour_and_centres(frames)
    logmel = clip['logmel'].numpy()  # [200, 64]
    loud = logmel.max(axis=1) > np.percentile(logmel.max(axis=1), 80)
    peak_hz = mel_hz[int(np.argmax(logmel[loud].mean(axis=0)))]
    pitch = min(demo_data.PITCHES, key=lambda name: abs(np.log(demo_data.PITCHES[name] / peak_hz)))
    label = demo_data.CLASS_NAMES[int(clip['labels/class'][0])]
    assert f'{colour}_{pitch}' == label, clip['id']


def test_square_jumps_and_beeps_happen_at_the_same_times(demo):
  _, folder, _, scenes = demo
  for relative, scene in scenes.items():
    decoded = media.decode_clip(os.path.join(folder, relative), 0.0, 2.0, fps=16, short_side=96)
    frames = np.stack([tf.io.decode_jpeg(f).numpy() for f in decoded.jpeg_frames])
    _, centres = _square_colour_and_centres(frames)
    jumps = _jump_times(centres, fps=16)
    energy = np.convolve(decoded.waveform ** 2, np.ones(32) / 32, mode='valid')[::16]  # 1 ms steps
    beeps = _onset_times(energy, rate=1000, threshold=0.002)
    assert jumps == pytest.approx(scene['event_times'], abs=1e-9), relative
    assert beeps == pytest.approx(scene['event_times'], abs=0.006), relative


def test_prepared_clips_keep_the_synchronisation(demo):
  _, _, prepared, scenes = demo
  by_path = {clip['id'].numpy().decode(): clip for clip in _records(prepared)}  # id: the manifest path
  for relative, scene in scenes.items():
    clip = by_path[relative]
    frames = np.stack([tf.io.decode_jpeg(f).numpy() for f in clip['jpeg']])
    _, centres = _square_colour_and_centres(frames)
    jumps = _jump_times(centres, fps=8)
    loudness = clip['logmel'].numpy().max(axis=1)  # [frames] at 100 per second
    onsets = _onset_times(loudness, rate=100, threshold=np.median(loudness) + 4)
    assert jumps == pytest.approx(scene['event_times'], abs=1e-9), relative
    assert onsets == pytest.approx(scene['event_times'], abs=0.021), relative


def test_events_differ_between_clips(demo):
  _, _, _, scenes = demo
  event_sets = {tuple(scene['event_times']) for scene in scenes.values()}
  assert len(event_sets) >= 12  # mismatched audio/video pairs rarely share their event times
  assert all(2 <= len(scene['event_times']) <= 4 for scene in scenes.values())


def test_cache_is_reused_and_rebuilt_when_incomplete(demo, monkeypatch):
  cache, folder, prepared, _ = demo
  marker = os.path.join(folder, cache_lib.MARKER_FILE)
  os.utime(marker, ns=(1_000_000_000, 1_000_000_000))
  monkeypatch.setattr(demo_data, 'write_demo_videos', lambda *args: pytest.fail('regenerated'))
  assert demo_data.ensure_demo_data(cache, train_per_class=1, test_per_class=1, num_workers=0) == prepared
  assert os.stat(marker).st_mtime_ns == 1_000_000_000
  monkeypatch.undo()

  small = demo_data.ensure_demo_data(cache, train_per_class=1, test_per_class=0, num_workers=0,
                                     progress=False)
  small_folder = os.path.dirname(small)
  assert os.path.basename(small_folder) == f'demo-{demo_data.DEMO_VERSION}-1x0-seed0'
  os.remove(os.path.join(small_folder, cache_lib.MARKER_FILE))  # as if interrupted
  os.remove(os.path.join(small, 'stats.json'))
  assert demo_data.ensure_demo_data(cache, train_per_class=1, test_per_class=0, num_workers=0,
                                    progress=False) == small
  assert os.path.exists(os.path.join(small, 'stats.json'))
  assert os.path.exists(os.path.join(small_folder, cache_lib.MARKER_FILE))
  assert sorted(os.listdir(cache)) == sorted([os.path.basename(folder), os.path.basename(small_folder)])


def test_scenes_are_deterministic_given_the_seed(tmp_path):
  first = demo_data.write_demo_videos(str(tmp_path / 'a'), {'train': 1}, seed=3, num_workers=0)
  second = demo_data.write_demo_videos(str(tmp_path / 'b'), {'train': 1}, seed=3, num_workers=0)
  other = demo_data.write_demo_videos(str(tmp_path / 'c'), {'train': 1}, seed=4, num_workers=0)
  read = lambda manifest: open(os.path.join(os.path.dirname(manifest), 'scenes.json')).read()
  assert read(first) == read(second) != read(other)


def test_default_cache_dir(monkeypatch):
  monkeypatch.setenv('AVT_JAX_CACHE', '/somewhere/cache')
  assert cache_lib.default_cache_dir() == '/somewhere/cache'
  monkeypatch.delenv('AVT_JAX_CACHE')
  assert cache_lib.default_cache_dir() == os.path.expanduser('~/.cache/avt_jax')
