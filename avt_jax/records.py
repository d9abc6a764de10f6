"""The on-disk record schema shared by the preparation writer and the tf.data reader.

One clip is one serialized `tf.train.SequenceExample`:

context features
  `clip/id`           bytes    unique clip id (e.g. `youtubeid_000010_000020`, EPIC narration id)
  `clip/source`       bytes    source video path relative to the video folder
  `clip/start`        float    start of the clip in the source video, seconds
  `clip/end`          float    end of the clip in the source video, seconds
  `labels/<head>`     int64[]  class indices for each label head: `class` (single- or multi-label),
                               or `verb` and `noun` for EPIC-Kitchens-100; empty list = unlabelled
  `video/fps`         float    frame rate of the stored frames
  `video/num_frames`  int64
  `video/height`      int64    size of the stored (resized) frames
  `video/width`       int64
  `audio/logmel`      bytes    log-mel spectrogram, float16 little-endian, C order [num_frames, n_mels]
  `audio/num_frames`  int64    spectrogram frames (`data_format.AUDIO_FRAMES_PER_SECOND` per second)
  `audio/n_mels`      int64
  `audio/frames_per_second` float
  `audio/missing`     int64    1 when the source had no audio stream and silence was substituted
feature lists
  `video/jpeg`        bytes    one JPEG-encoded RGB frame per step

The spectrogram frame at time t seconds is `round(t * audio/frames_per_second)` and the video frame is
`round(t * video/fps)`, both measured from `clip/start` (`data_format.frame_count`), so readers can cut
synchronised windows. File names, stats.json and the label key prefix: `avt_jax.data_format`.
"""

import dataclasses
from typing import Mapping, Sequence

import numpy as np
import tensorflow as tf

from avt_jax import data_format


@dataclasses.dataclass
class Clip:
  """A decoded clip ready to be written.

  Attributes:
    clip_id: unique id.
    source: source path relative to the video folder.
    start: start time in the source, seconds.
    end: end time in the source, seconds.
    labels: label head name -> class indices (e.g. {'class': [3]} or {'verb': [2], 'noun': [7]}).
    jpeg_frames: JPEG bytes, one per frame.
    fps: frame rate of `jpeg_frames`.
    height: frame height in pixels.
    width: frame width in pixels.
    logmel: [num_frames, n_mels] log-mel spectrogram.
    audio_fps: spectrogram frames per second.
    audio_missing: the source had no audio; `logmel` is silence.
  """
  clip_id: str
  source: str
  start: float
  end: float
  labels: Mapping[str, Sequence[int]]
  jpeg_frames: Sequence[bytes]
  fps: float
  height: int
  width: int
  logmel: np.ndarray
  audio_fps: float
  audio_missing: bool = False


def _bytes(values: Sequence[bytes]) -> tf.train.Feature:
  return tf.train.Feature(bytes_list=tf.train.BytesList(value=list(values)))


def _floats(values: Sequence[float]) -> tf.train.Feature:
  return tf.train.Feature(float_list=tf.train.FloatList(value=list(values)))


def _ints(values: Sequence[int]) -> tf.train.Feature:
  return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))


def encode_clip(clip: Clip) -> bytes:
  """Serializes `clip` as a `tf.train.SequenceExample`."""
  logmel = np.asarray(clip.logmel)
  if logmel.ndim != 2:
    raise ValueError(f'Clip {clip.clip_id}: logmel must be [frames, n_mels], got {logmel.shape}.')
  if not clip.jpeg_frames:
    raise ValueError(f'Clip {clip.clip_id}: no video frames.')
  context = {
      'clip/id': _bytes([clip.clip_id.encode()]),
      'clip/source': _bytes([clip.source.encode()]),
      'clip/start': _floats([clip.start]),
      'clip/end': _floats([clip.end]),
      'video/fps': _floats([clip.fps]),
      'video/num_frames': _ints([len(clip.jpeg_frames)]),
      'video/height': _ints([clip.height]),
      'video/width': _ints([clip.width]),
      'audio/logmel': _bytes([logmel.astype('<f2').tobytes()]),
      'audio/num_frames': _ints([logmel.shape[0]]),
      'audio/n_mels': _ints([logmel.shape[1]]),
      'audio/frames_per_second': _floats([clip.audio_fps]),
      'audio/missing': _ints([int(clip.audio_missing)]),
  }
  for head, indices in clip.labels.items():
    context[data_format.label_key(head)] = _ints(indices)
  frames = tf.train.FeatureList(feature=[_bytes([f]) for f in clip.jpeg_frames])
  example = tf.train.SequenceExample(
      context=tf.train.Features(feature=context),
      feature_lists=tf.train.FeatureLists(feature_list={'video/jpeg': frames}))
  return example.SerializeToString()


def parse_clip(serialized: tf.Tensor, label_heads: Sequence[str] = ('class',)) -> dict[str, tf.Tensor]:
  """Parses one serialized clip inside a tf.data pipeline.

  Args:
    serialized: scalar string tensor.
    label_heads: label heads to read (each becomes a ragged-free int64 vector `labels/<head>`).

  Returns:
    Dict with `id` (string), `jpeg` [num_frames] string, `fps` float32, `logmel` [frames, n_mels]
    float32, `audio_fps` float32, `audio_missing` int64, and `labels/<head>` int64 vectors.
  """
  context_spec = {
      'clip/id': tf.io.FixedLenFeature([], tf.string),
      'video/fps': tf.io.FixedLenFeature([], tf.float32),
      'audio/logmel': tf.io.FixedLenFeature([], tf.string),
      'audio/num_frames': tf.io.FixedLenFeature([], tf.int64),
      'audio/n_mels': tf.io.FixedLenFeature([], tf.int64),
      'audio/frames_per_second': tf.io.FixedLenFeature([], tf.float32),
      'audio/missing': tf.io.FixedLenFeature([], tf.int64, default_value=0),
  }
  for head in label_heads:
    context_spec[data_format.label_key(head)] = tf.io.VarLenFeature(tf.int64)
  context, sequence = tf.io.parse_single_sequence_example(
      serialized, context_features=context_spec,
      sequence_features={'video/jpeg': tf.io.FixedLenSequenceFeature([], tf.string)})
  logmel = tf.io.decode_raw(context['audio/logmel'], tf.float16, little_endian=True)
  logmel = tf.reshape(logmel, [context['audio/num_frames'], context['audio/n_mels']])
  out = {
      'id': context['clip/id'],
      'jpeg': sequence['video/jpeg'],
      'fps': context['video/fps'],
      'logmel': tf.cast(logmel, tf.float32),
      'audio_fps': context['audio/frames_per_second'],
      'audio_missing': context['audio/missing'],
  }
  for head in label_heads:
    out[data_format.label_key(head)] = tf.sparse.to_dense(context[data_format.label_key(head)])
  return out
