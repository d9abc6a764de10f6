"""Random training clips at a config's scale, in the prepared-record format (`--synthetic_clips`)."""

import os

import ml_collections
import numpy as np

from avt_jax import data_format

VIDEO_FPS = 25.0  # frames per second of the written clips (our design)
AUDIO_FPS = data_format.AUDIO_FRAMES_PER_SECOND


def record_layout(folder: str, clips: int, n_mels: int,
                  num_classes: dict[str, int]) -> tuple[list[str], dict]:
  """The shard paths and the `stats.json` content of `clips` synthetic training clips.

  At most 8 shards (`data_format.shard_name`); the statistics are the identity
  normalisation (the log-mels are standard normal) and the clip counts.
  """
  shards = max(1, min(8, clips))
  paths = [os.path.join(folder, data_format.shard_name('train', i, shards)) for i in range(shards)]
  stats = {'logmel_mean': 0.0, 'logmel_std': 1.0, 'n_mels': int(n_mels),
           'num_classes': num_classes, 'num_clips': {'train': clips}}
  return paths, stats


def write_synthetic_records(config: ml_collections.ConfigDict, folder: str, clips: int,
                            seed: int = 0) -> str:
  """Writes `clips` random training clips at the config's scale in the prepared-record format.

  Frames are stored with short side `input.min_resize` (4:3), 25 fps, as JPEGs of smooth random
  images with noise (typical JPEG sizes, unlike pure noise); log-mels are random. Each clip is long
  enough for a training window (`num_frames` x `frame_stride` frames, `audio_frames` spectrogram
  frames). Returns `folder`, which then holds `train-*.tfrecord` and `stats.json`.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from avt_jax import records  # pylint: disable=g-import-not-at-top
  inp = config.input
  seconds = data_format.view_seconds(inp.num_frames, inp.frame_stride, VIDEO_FPS,
                                     inp.audio_frames) + 0.5
  height, width = int(inp.min_resize), int(round(inp.min_resize * 4 / 3))
  rng = np.random.default_rng(seed)
  heads = {h: int(config.data.num_classes[h]) for h in config.data.label_heads}
  os.makedirs(folder, exist_ok=True)
  paths, stats = record_layout(folder, clips, inp.n_mels, heads)
  writers = [tf.io.TFRecordWriter(path) for path in paths]
  for index in range(clips):
    coarse = rng.uniform(0, 255, (4, 6, 3)).astype(np.float32)
    base = tf.image.resize(coarse[None], (height, width), method='bicubic')[0].numpy()
    frames = []
    for _ in range(int(seconds * VIDEO_FPS)):
      image = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
      frames.append(tf.io.encode_jpeg(image, quality=90).numpy())
    clip = records.Clip(
        clip_id=f'synthetic_{index:06d}', source=f'synthetic_{index:06d}.mp4', start=0.0,
        end=seconds, labels={h: [int(rng.integers(n))] for h, n in heads.items()},
        jpeg_frames=frames, fps=VIDEO_FPS, height=height, width=width,
        logmel=rng.normal(size=(int(seconds * AUDIO_FPS), inp.n_mels)).astype(np.float32),
        audio_fps=AUDIO_FPS)
    writers[index % len(writers)].write(records.encode_clip(clip))
  for writer in writers:
    writer.close()
  data_format.write_stats(folder, stats)
  return folder
