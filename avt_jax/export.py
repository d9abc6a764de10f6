"""Exports a trained workdir as a TensorFlow SavedModel that serves raw frames and audio.

    python -m avt_jax.export --workdir=/tmp/avt_demo --output=/tmp/avt_demo_savedmodel
    python -m avt_jax.export --workdir=DIR --output=OUT --checkpoint=best --platforms=cpu,cuda

The SavedModel needs only TensorFlow (no JAX, no avt_jax):

    model = tf.saved_model.load(OUT)
    probabilities = model.signatures['serving_default'](frames=frames, waveform=waveform)
    names = model.signatures['labels']()  # label head -> [C] class names

Signature `serving_default` (our design):
  `frames`    uint8 [T, H, W, 3] RGB frames of one video at the training data's frame rate
              (`stats.json` `fps`, e.g. 25), any size (crops are relative to the short side).
  `waveform`  float32 [samples] mono audio in [-1, 1] at 16 kHz, covering the same time as `frames`.
              To feed what training saw, decode a file's streams as `prepare` does
              (`avt_jax.prep.media.decode_clip`: the default-flagged audio track, never a cover image
              as the video; timestamps that restart mid-file followed).
  errors      at least one frame (and one audio sample when the model uses audio) is needed: empty
              inputs fail with InvalidArgumentError `assertion failed: [frames: expected ...]`.
  returns     label head -> float32 [C] class probabilities (softmax of the view-averaged logits;
              sigmoid for multi-label data), as `python -m avt_jax.predict` computes them.
Inside, the log-mel spectrogram is computed with TensorFlow ops (`tf_log_mel`: the STFT, Hann window
and mel filterbank of `avt_jax.prep.logmel`, the window and filterbank taken from librosa), the
evaluation views of the run's config are cut with the input pipeline's own TensorFlow code
(`ClipDecoder.views`) and the model runs as StableHLO lowered by `jax2tf` (native serialization) for
`--platforms`. Parameters are stored as variables. Measured against the JAX model fed librosa's
log-mel (tests/test_use_workdir.py): log-mel within 1e-3 of librosa's (float32 FFTs; at most 2.3e-4
on a pure tone, 1.4e-5 on recorded-like audio), probabilities within 1e-6. Records hold float16
log-mel and JPEG frames, so the records path differs from raw frames by that rounding.
"""

import json
import os
import sys
from typing import Any, Sequence

from avt_jax import command_line  # before TensorFlow and JAX load

command_line.quiet_native_logs()

import jax  # noqa: E402
import librosa  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import flags  # noqa: E402
from jax.experimental import jax2tf  # noqa: E402

from avt_jax import data_format, dataset_stats, evaluate, workdir as workdir_lib  # noqa: E402
from avt_jax.input import pipeline  # noqa: E402
from avt_jax.models import build_model  # noqa: E402
from avt_jax.predict import restore  # noqa: E402
from avt_jax.prep import logmel, media  # noqa: E402

PLATFORMS = ('cpu', 'cuda', 'tpu')


def tf_log_mel(waveform: tf.Tensor, n_mels: int, sample_rate: int = media.AUDIO_SAMPLE_RATE,
               window_s: float = 0.025, hop_s: float = 1.0 / data_format.AUDIO_FRAMES_PER_SECOND
               ) -> tf.Tensor:
  """`avt_jax.prep.logmel.log_mel` in TensorFlow ops (the same frames, window and filterbank).

  Args:
    waveform: float32 [samples] mono audio in [-1, 1].
    n_mels: mel bins.
    sample_rate: Hz.
    window_s: analysis window in seconds (FFT size: the next power of two).
    hop_s: hop in seconds.

  Returns:
    float32 [round(samples / sample_rate / hop_s), n_mels] log(mel power + `logmel.LOG_OFFSET`).
  """
  win_length = round(window_s * sample_rate)
  hop_length = round(hop_s * sample_rate)
  n_fft = 1 << (win_length - 1).bit_length()
  window = librosa.util.pad_center(librosa.filters.get_window('hann', win_length, fftbins=True),
                                   size=n_fft)  # librosa.stft's window
  basis = librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels)  # [n_mels, 1 + n_fft // 2]
  num_frames = tf.cast(tf.round(tf.cast(tf.size(waveform), tf.float64) / hop_length), tf.int32)
  padded = tf.pad(waveform, [[n_fft // 2, n_fft // 2]])  # librosa's center=True, zero padding
  frames = tf.signal.frame(padded, n_fft, hop_length)[:num_frames]  # [frames, n_fft]
  spectrum = tf.signal.rfft(frames * tf.constant(window, tf.float32))  # [frames, 1 + n_fft // 2]
  power = tf.math.real(spectrum) ** 2 + tf.math.imag(spectrum) ** 2
  mel = tf.matmul(power, tf.constant(basis.T, tf.float32))  # [frames, n_mels]
  return tf.math.log(mel + logmel.LOG_OFFSET)


class ServingModule(tf.Module):
  """The SavedModel's content: parameters as variables, the serving and label functions."""

  def __init__(self, workdir: str, checkpoint: str = 'latest', platforms: Sequence[str] = PLATFORMS):
    super().__init__()
    config, stats = workdir_lib.load_run(workdir)
    config.model.attention_implementation = 'xla'  # lowers for every platform; same parameters
    model = build_model(config)
    params = jax.device_get(restore(config, workdir, checkpoint))
    self.params = tf.nest.map_structure(tf.Variable, params)
    self._multi_label = bool(config.data.multi_label)
    self._modalities = tuple(config.model.modalities)
    self._decoder = pipeline.ClipDecoder(config, stats, data_format.stats_path(workdir))
    self._fps = float(stats['fps'])
    self._n_mels = int(stats['n_mels'])
    self._logits = jax2tf.convert(evaluate.make_eval_step(model, self._modalities), with_gradient=False,
                                  native_serialization_platforms=tuple(platforms))
    self._label_names = dataset_stats.class_names(config, stats)

  @tf.function(autograph=False,  # the jax2tf call inside is not Python control flow to convert
               input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name='frames'),
                                tf.TensorSpec([None], tf.float32, name='waveform')])
  def serve(self, frames: tf.Tensor, waveform: tf.Tensor) -> dict[str, tf.Tensor]:
    """uint8 [T, H, W, 3] frames and float32 [samples] 16 kHz audio -> head -> [C] probabilities.

    Raises (when called) InvalidArgumentError `frames: expected ...` for empty frames (T, H or W 0),
    and `waveform: expected ...` for an empty waveform when the model uses audio.
    """
    checks = [tf.debugging.Assert(
        tf.reduce_all(tf.shape(frames)[:3] > 0),
        ['frames: expected uint8 [T, H, W, 3] with at least one frame of at least one pixel, got shape',
         tf.shape(frames)])]
    if 'audio' in self._modalities:
      checks.append(tf.debugging.Assert(
          tf.size(waveform) > 0, ['waveform: expected float32 [samples] 16 kHz audio with at least one '
                                  'sample, got 0 (pass zeros of the video\'s duration for silence)']))
    with tf.control_dependencies(checks):
      frames, waveform = tf.identity(frames), tf.identity(waveform)
    clip = {'logmel': tf_log_mel(waveform, self._n_mels), 'fps': self._fps,
            'audio_fps': data_format.AUDIO_FRAMES_PER_SECOND}
    views = self._decoder.views(lambda ids: tf.gather(frames, ids), tf.shape(frames)[0],
                                tf.shape(frames)[1:3], clip)
    views['mask'] = tf.ones([self._decoder.views_per_video], tf.float32)
    logits = self._logits(self.params, {k: views[k] for k in (*self._modalities, 'mask')})
    mean = {head: tf.reduce_mean(value, axis=0) for head, value in logits.items()}
    activation = tf.sigmoid if self._multi_label else tf.nn.softmax
    return {head: activation(value) for head, value in mean.items()}

  @tf.function(input_signature=[])
  def labels(self) -> dict[str, tf.Tensor]:
    """Label head -> [C] class names."""
    return {head: tf.constant(names) for head, names in self._label_names.items()}


def export(workdir: str, output: str, checkpoint: str = 'latest',
           platforms: Sequence[str] = PLATFORMS) -> dict[str, Any]:
  """Writes the SavedModel of `workdir` to `output` (see the module docstring); returns its
  signatures' input and output specs.

  Raises:
    FileNotFoundError: a missing workdir file or checkpoint, named.
    ValueError: a bad `checkpoint` or platform.
  """
  unknown = sorted(set(platforms) - set(PLATFORMS))
  if unknown or not platforms:
    raise ValueError(f'--platforms: expected a non-empty subset of {PLATFORMS}, got {list(platforms)}.')
  module = ServingModule(workdir, checkpoint, platforms)
  serve = module.serve.get_concrete_function()
  tf.saved_model.save(module, output, signatures={
      'serving_default': serve, 'labels': module.labels.get_concrete_function()})
  return {'inputs': {spec.name: str(spec) for spec in serve.structured_input_signature[0]},
          'outputs': {k: str(v) for k, v in serve.structured_outputs.items()}}


PROG = 'python -m avt_jax.export'
USAGE = ('Write a TensorFlow SavedModel of a trained workdir: uint8 frames and a 16 kHz waveform in, '
         'class probabilities out (log-mel and evaluation views computed inside).')


def define_flags(fv: flags.FlagValues) -> None:
  """The command's flags (`avt_jax.command_line`)."""
  flags.DEFINE_string('workdir', None, 'Training workdir.', flag_values=fv)
  flags.DEFINE_string('output', None, 'SavedModel folder to write.', flag_values=fv)
  flags.DEFINE_string('checkpoint', 'latest', "'latest', 'best' (kept with train.eval_every > 0) "
                      'or a step.', flag_values=fv)
  flags.DEFINE_list('platforms', list(PLATFORMS), 'Platforms the model is lowered for, '
                    'comma-separated.', flag_values=fv)
  flags.mark_flags_as_required(['workdir', 'output'], flag_values=fv)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the command line (default: sys.argv[1:]); returns the exit status (2 for a bad workdir or
  argument)."""
  args, _ = command_line.parse(PROG, USAGE, define_flags, sys.argv[1:] if argv is None else argv)
  try:
    signature = export(args.workdir, args.output, args.checkpoint, args.platforms)
  except (ValueError, FileNotFoundError) as e:
    sys.stderr.write(f'export: error: {e}\n')
    return 2
  print(f'Wrote {args.output}: serving_default {json.dumps(signature)}', flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
