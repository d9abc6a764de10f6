"""Tests for avt_jax.records: encode/parse round trip of the clip schema."""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np
import pytest
import tensorflow as tf

from avt_jax import records


def _jpeg(value: int) -> bytes:
  return tf.io.encode_jpeg(tf.fill([8, 6, 3], tf.constant(value, tf.uint8))).numpy()


def _clip(**overrides) -> records.Clip:
  fields = dict(
      clip_id='vid_000010_000020', source='abseiling/vid.mp4', start=10.0, end=12.0,
      labels={'class': [3]}, jpeg_frames=[_jpeg(10), _jpeg(200), _jpeg(90)], fps=1.5, height=8, width=6,
      logmel=np.random.default_rng(0).normal(-5, 3, (200, 16)).astype(np.float32), audio_fps=100.0)
  fields.update(overrides)
  return records.Clip(**fields)


def test_round_trip_preserves_every_field():
  clip = _clip()
  parsed = records.parse_clip(tf.constant(records.encode_clip(clip)))
  assert parsed['id'].numpy().decode() == clip.clip_id
  assert [f for f in parsed['jpeg'].numpy()] == list(clip.jpeg_frames)
  assert parsed['fps'].numpy() == pytest.approx(1.5)
  assert parsed['audio_fps'].numpy() == pytest.approx(100.0)
  assert parsed['audio_missing'].numpy() == 0
  assert parsed['labels/class'].numpy().tolist() == [3]
  # The spectrogram is stored as float16: exactly the float16 rounding of the input comes back.
  np.testing.assert_array_equal(parsed['logmel'].numpy(), clip.logmel.astype(np.float16).astype(np.float32))
  assert parsed['logmel'].dtype == tf.float32
  decoded = tf.io.decode_jpeg(parsed['jpeg'][1]).numpy()
  assert decoded.shape == (8, 6, 3) and abs(int(decoded.mean()) - 200) <= 2


def test_context_fields_are_stored():
  clip = _clip(audio_missing=True)
  example = tf.train.SequenceExample.FromString(records.encode_clip(clip))
  context = example.context.feature
  assert context['clip/source'].bytes_list.value == [b'abseiling/vid.mp4']
  assert context['clip/start'].float_list.value == [10.0]
  assert context['clip/end'].float_list.value == [12.0]
  assert context['video/num_frames'].int64_list.value == [3]
  assert context['video/height'].int64_list.value == [8]
  assert context['video/width'].int64_list.value == [6]
  assert context['audio/num_frames'].int64_list.value == [200]
  assert context['audio/n_mels'].int64_list.value == [16]
  assert context['audio/missing'].int64_list.value == [1]
  assert len(example.feature_lists.feature_list['video/jpeg'].feature) == 3


def test_multi_head_multi_label_and_unlabelled():
  clip = _clip(labels={'verb': [2], 'noun': [7, 1], 'class': []})
  parsed = records.parse_clip(tf.constant(records.encode_clip(clip)), label_heads=('verb', 'noun', 'class'))
  assert parsed['labels/verb'].numpy().tolist() == [2]
  assert parsed['labels/noun'].numpy().tolist() == [7, 1]
  assert parsed['labels/class'].numpy().tolist() == []


def test_parse_inside_tf_data_pipeline():
  serialized = [records.encode_clip(_clip(clip_id=f'c{i}', labels={'class': [i]})) for i in range(3)]
  dataset = tf.data.Dataset.from_tensor_slices(serialized).map(records.parse_clip)
  ids_labels = [(x['id'].numpy().decode(), int(x['labels/class'][0])) for x in dataset]
  assert ids_labels == [('c0', 0), ('c1', 1), ('c2', 2)]


@pytest.mark.parametrize('logmel', [np.zeros(200, np.float32), np.zeros((2, 200, 16), np.float32)])
def test_bad_logmel_shape_is_rejected(logmel):
  with pytest.raises(ValueError, match='vid_000010_000020.*logmel'):
    records.encode_clip(_clip(logmel=logmel))


def test_clip_without_frames_is_rejected():
  with pytest.raises(ValueError, match='vid_000010_000020.*no video frames'):
    records.encode_clip(_clip(jpeg_frames=[]))
