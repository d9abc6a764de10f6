"""Stand-ins for the clip decoder of `avt_jax.prep.shards` that crash their process on some clips.

Used by tests/test_shards.py; they live in their own small module so that the 'spawn' worker processes
that import them do not import TensorFlow.
"""

import os
import signal

import numpy as np

from avt_jax.prep import media
from avt_jax.prep import shards


def stand_in_or_crash(task):
  """Dies with SIGSEGV, as a segfault in FFmpeg would, on clips whose id starts with 'crash'; returns a
  small valid result at once for the others (one black frame, a silent spectrogram, and the id of the
  process that made it in `issues`)."""
  if task.spec.clip_id.startswith('crash'):
    os.kill(os.getpid(), signal.SIGSEGV)
  return shards._Result(  # pylint: disable=protected-access
      task.spec, issues=[f'process {os.getpid()}'], end=1.0, height=16, width=16,
      jpeg_frames=[media.encode_jpeg(np.zeros((16, 16, 3), np.uint8))],
      logmel=np.zeros((100, task.settings.n_mels), np.float32))
