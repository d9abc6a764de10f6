"""Input benchmark: training-pipeline clips/s per CPU core vs. what the train step consumes.

    python -m avt_jax.input.throughput --config=configs/kinetics_sounds.py
    python -m avt_jax.input.throughput --config=configs/demo.py --data_dir=~/.cache/avt_jax/demo-v1-40x10-seed0/prepared

Without --data_dir it writes synthetic records shaped like the config's prepared data (10 s clips at
25 fps, 256-px short side, 128-bin log-mel; smooth random images so JPEG sizes are realistic) into a
temporary folder. It then measures, in one run: the training pipeline's clips/s (after warm-up), the
jitted train step's clips/s at `--step_batch` (after compile), and their ratio. A ratio >= 2 means the
input keeps the accelerator fed with headroom.
"""

import os
import statistics
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/kinetics_sounds.py.')
flags.DEFINE_string('data_dir', None, 'Prepared records; default: synthetic records in a temp dir.')
flags.DEFINE_integer('clips', 16, 'Synthetic clips to write.')
flags.DEFINE_float('clip_seconds', 10.0, 'Duration of synthetic clips.')
flags.DEFINE_integer('fps', 25, 'Stored frame rate of synthetic clips.')
flags.DEFINE_integer('short_side', 256, 'Stored short side of synthetic clips.')
flags.DEFINE_integer('batches', 8, 'Pipeline batches to time (after 2 warm-up batches).')
flags.DEFINE_integer('step_batch', 0, 'Train-step batch to time; 0 = input.batch_size.')
flags.DEFINE_integer('steps', 3, 'Train steps to time (after compile); 0 skips the train step.')
flags.mark_flag_as_required('config')


def write_synthetic_records(config, folder: str, clips: int, seconds: float, fps: int,
                            short_side: int) -> None:
  """Writes `clips` train records with the config's label space plus a stats.json."""
  import json  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from avt_jax import records  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  height, width = short_side, int(round(short_side * 4 / 3 / 2)) * 2
  heads = dict(config.data.num_classes)
  frames = int(seconds * fps)
  with tf.io.TFRecordWriter(os.path.join(folder, 'train-00000-of-00001.tfrecord')) as writer:
    for i in range(clips):
      coarse = rng.uniform(0, 255, (frames, height // 32, width // 32, 3)).astype(np.float32)
      images = tf.cast(tf.image.resize(coarse, (height, width)), tf.uint8).numpy()
      jpegs = [tf.io.encode_jpeg(im, quality=90).numpy() for im in images]
      logmel = rng.normal(-8.0, 1.5, (int(seconds * 100), config.input.n_mels)).astype(np.float32)
      writer.write(records.encode_clip(records.Clip(
          clip_id=f'clip{i}', source=f'clip{i}.mp4', start=0.0, end=seconds,
          labels={h: [i % c] for h, c in heads.items()}, jpeg_frames=jpegs, fps=float(fps),
          height=height, width=width, logmel=logmel, audio_fps=100.0)))
  stats = {'logmel_mean': -8.0, 'logmel_std': 1.5, 'num_clips': {'train': clips},
           'num_classes': heads, 'fps': fps, 'n_mels': config.input.n_mels,
           'audio_frames_per_second': 100.0}
  with open(os.path.join(folder, 'stats.json'), 'w') as f:
    json.dump(stats, f)


def pipeline_clips_per_second(config, data_dir: str, batches: int) -> float:
  from avt_jax import input as input_lib  # pylint: disable=g-import-not-at-top
  it = input_lib.make_train_iterator(config, data_dir, seed=0)
  for _ in range(2):
    next(it)
  start = time.perf_counter()
  for _ in range(batches):
    next(it)
  return batches * config.input.batch_size / (time.perf_counter() - start)


def step_clips_per_second(config, batch: int, steps: int) -> tuple[float, float]:
  """(clips/s of the jitted train step at `batch`, compile seconds)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from avt_jax import train  # pylint: disable=g-import-not-at-top
  from avt_jax.models.build import example_inputs  # pylint: disable=g-import-not-at-top

  config.input.batch_size = batch
  model, tx, schedule, init = train.setup(config)
  state = jax.jit(init)(jax.random.PRNGKey(0))
  data = example_inputs(config, batch)
  for head, classes in dict(config.data.num_classes).items():
    data[f'labels/{head}'] = np.eye(classes, dtype=np.float32)[np.arange(batch) % classes]
  step = jax.jit(train.make_train_step(config, model, tx, schedule), donate_argnums=(0,))
  start = time.perf_counter()
  compiled = step.lower(state, data).compile()
  compile_seconds = time.perf_counter() - start
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = compiled(state, data)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return batch / statistics.median(times), compile_seconds


def main(argv):
  del argv
  config = FLAGS.config
  cores = len(os.sched_getaffinity(0))
  with tempfile.TemporaryDirectory() as tmp:
    data_dir = FLAGS.data_dir
    if not data_dir:
      print(f'Writing {FLAGS.clips} synthetic {FLAGS.clip_seconds:.0f} s clips to {tmp} ...', flush=True)
      write_synthetic_records(config, tmp, FLAGS.clips, FLAGS.clip_seconds, FLAGS.fps,
                              FLAGS.short_side)
      data_dir = tmp
    pipeline = pipeline_clips_per_second(config, os.path.expanduser(data_dir), FLAGS.batches)
  print(f'| quantity | value |\n|---|---|\n| CPU cores | {cores} |\n'
        f'| input pipeline | {pipeline:.2f} clips/s ({pipeline / cores:.2f} clips/s per core) |',
        flush=True)
  if FLAGS.steps:
    step_batch = FLAGS.step_batch or config.input.batch_size
    consumed, compile_seconds = step_clips_per_second(config, step_batch, FLAGS.steps)
    print(f'| train step (batch {step_batch}, compile {compile_seconds:.0f} s) | {consumed:.3f} clips/s |\n'
          f'| ratio input / step | {pipeline / consumed:.1f} |', flush=True)

if __name__ == '__main__':
  app.run(main)
