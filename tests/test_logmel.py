"""Tests for avt_jax.prep.logmel."""

import librosa
import numpy as np
import pytest

from avt_jax.prep import logmel

SR = 16000


def _tone(hz: float, seconds: float = 1.0, amplitude: float = 0.5) -> np.ndarray:
  return (amplitude * np.sin(2 * np.pi * hz * np.arange(round(seconds * SR)) / SR)).astype(np.float32)


@pytest.mark.parametrize('seconds', [0.5, 1.0, 1.234, 2.0, 10.0])
def test_frame_count_is_100_per_second(seconds):
  spectrogram = logmel.log_mel(np.zeros(round(seconds * SR), np.float32))
  assert spectrogram.shape == (round(seconds * 100), 128)
  assert spectrogram.dtype == np.float32


def test_frame_count_follows_hop_and_n_mels():
  spectrogram = logmel.log_mel(np.zeros(SR * 2, np.float32), n_mels=64, hop_s=0.02)
  assert spectrogram.shape == (100, 64)


def test_silence_is_log_of_the_offset():
  spectrogram = logmel.log_mel(np.zeros(SR, np.float32), n_mels=32)
  np.testing.assert_allclose(spectrogram, np.log(1e-6), rtol=1e-6)
  assert logmel.LOG_OFFSET == 1e-6


@pytest.mark.parametrize('hz, n_mels', [(300.0, 64), (1000.0, 128), (2000.0, 64), (5000.0, 128)])
def test_tone_energy_lands_in_its_mel_bin(hz, n_mels):
  spectrogram = logmel.log_mel(_tone(hz), n_mels=n_mels)
  # Independent reference: the centre frequencies of the mel filters (n_mels + 2 edges, 0..8 kHz).
  centres = librosa.mel_frequencies(n_mels=n_mels + 2, fmin=0.0, fmax=SR / 2)[1:-1]
  loudest = int(np.argmax(spectrogram[10:-10].mean(axis=0)))
  assert abs(loudest - int(np.argmin(np.abs(centres - hz)))) <= 1
  assert abs(centres[loudest] - hz) / hz < 0.1


def test_louder_tone_gives_higher_log_energy_by_the_power_ratio():
  quiet = logmel.log_mel(_tone(1000.0, amplitude=0.1), n_mels=64)[10:-10].max(axis=1).mean()
  loud = logmel.log_mel(_tone(1000.0, amplitude=0.4), n_mels=64)[10:-10].max(axis=1).mean()
  assert loud - quiet == pytest.approx(np.log(16.0), abs=0.05)  # power ratio (0.4 / 0.1) ** 2


def test_frames_are_centred_on_multiples_of_the_hop():
  waveform = np.zeros(SR * 2, np.float32)
  burst = round(0.73 * SR)
  waveform[burst:burst + 80] = _tone(3000.0, seconds=80 / SR)  # 5 ms burst at 0.73 s
  energy = logmel.log_mel(waveform, n_mels=64).max(axis=1)
  assert abs(int(np.argmax(energy)) - 73) <= 1  # frame of time t = round(t * 100)


def test_rejects_multichannel_input():
  with pytest.raises(ValueError, match='mono'):
    logmel.log_mel(np.zeros((2, SR), np.float32))
