"""Log-mel spectrograms (librosa) aligned with the video timeline.

Defaults follow docs/method.md: 16 kHz mono, 128 mel bins, 25 ms Hann window, 10 ms hop
(`data_format.AUDIO_FRAMES_PER_SECOND` = 100 frames per second, the convention of AST). Frame `i` is
centred at `i * hop_s` seconds (librosa's `center=True` with zero padding), so the frame at time t is
`round(t / hop_s)`, as `avt_jax.records` specifies; a waveform of duration d seconds gives exactly
`round(d / hop_s)` frames. Values are `log(mel_power + LOG_OFFSET)` with the power spectrum of the
waveform in [-1, 1] (Slaney mel scale and area normalisation, librosa's defaults).
"""

import functools

import librosa
import numpy as np

from avt_jax import data_format

LOG_OFFSET = 1e-6  # log(LOG_OFFSET) ~= -13.8 is the value of digital silence.


@functools.lru_cache(maxsize=8)
def _mel_basis_transposed(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
  basis = librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels)  # [n_mels, 1 + n_fft // 2]
  return np.ascontiguousarray(basis.T)  # [1 + n_fft // 2, n_mels]


def log_mel(waveform: np.ndarray, sample_rate: int = 16000, n_mels: int = 128, window_s: float = 0.025,
            hop_s: float = 1.0 / data_format.AUDIO_FRAMES_PER_SECOND) -> np.ndarray:
  """Computes the log-mel spectrogram of a mono waveform.

  Args:
    waveform: [samples] mono audio in [-1, 1].
    sample_rate: sampling rate of `waveform` in Hz.
    n_mels: number of mel bins (0 Hz to sample_rate / 2).
    window_s: analysis window length in seconds (FFT size: the next power of two).
    hop_s: hop between frames in seconds.

  Returns:
    [round(duration / hop_s), n_mels] float32 log-mel spectrogram.
  """
  waveform = np.asarray(waveform, np.float32)
  if waveform.ndim != 1:
    raise ValueError(f'waveform must be mono [samples], got shape {waveform.shape}.')
  win_length = round(window_s * sample_rate)
  hop_length = round(hop_s * sample_rate)
  n_fft = 1 << (win_length - 1).bit_length()
  num_frames = round(len(waveform) / sample_rate / hop_s)
  spectrum = librosa.stft(waveform, n_fft=n_fft, hop_length=hop_length, win_length=win_length,
                          window='hann', center=True, pad_mode='constant')  # [1 + n_fft // 2, frames]
  power = np.ascontiguousarray(np.abs(spectrum[:, :num_frames].T) ** 2)  # [frames, 1 + n_fft // 2]
  # Both operands C-contiguous: much faster in OpenBLAS than the Fortran-ordered STFT layout.
  mel = power @ _mel_basis_transposed(sample_rate, n_fft, n_mels)  # [frames, n_mels]
  return np.log(mel + LOG_OFFSET).astype(np.float32)
