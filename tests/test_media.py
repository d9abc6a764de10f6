"""Tests for avt_jax.prep.media on small real files written with PyAV."""

import io
from fractions import Fraction

import av
import numpy as np
import pytest
from PIL import Image

from avt_jax.prep import media
from avt_jax.prep.demo_data import write_mp4

BRIGHTNESS_STEP = 5  # source frame i is a flat grey image of brightness i * BRIGHTNESS_STEP


def _numbered_frames(count: int, height: int = 32, width: int = 48) -> np.ndarray:
  return np.stack([np.full((height, width, 3), i * BRIGHTNESS_STEP, np.uint8) for i in range(count)])


def _frame_numbers(jpeg_frames) -> list[int]:
  return [round(np.asarray(Image.open(io.BytesIO(f))).mean() / BRIGHTNESS_STEP) for f in jpeg_frames]


def _tone(hz: float, seconds: float, rate: int, amplitude: float = 0.4) -> np.ndarray:
  return (amplitude * np.sin(2 * np.pi * hz * np.arange(round(seconds * rate)) / rate)).astype(np.float32)


def _amplitude_at(waveform: np.ndarray, hz: float, rate: int = 16000) -> float:
  """Amplitude of the sinusoid at `hz` in `waveform` (windowed DFT, one bin)."""
  window = np.hanning(len(waveform))
  t = np.arange(len(waveform)) / rate
  return 2 * abs(np.sum(waveform * window * np.exp(-2j * np.pi * hz * t))) / window.sum()


@pytest.fixture(scope='module')
def stereo_file(tmp_path_factory):
  """2 s, 25 fps, 48x32 H.264 + stereo 44.1 kHz AAC: 440 Hz on the left, 1000 Hz on the right."""
  path = str(tmp_path_factory.mktemp('media') / 'stereo.mp4')
  waveform = np.stack([_tone(440.0, 2.0, 44100), _tone(1000.0, 2.0, 44100)])
  write_mp4(path, _numbered_frames(50), waveform, fps=25, sample_rate=44100)
  return path


def test_stereo_file_is_h264_and_aac_at_44k(stereo_file):
  with av.open(stereo_file) as container:
    video, audio = container.streams.video[0], container.streams.audio[0]
    assert (video.codec_context.name, audio.codec_context.name) == ('h264', 'aac')
    assert (audio.rate, audio.codec_context.layout.nb_channels) == (44100, 2)


def test_fps_resampling_picks_the_nearest_frames(stereo_file):
  clip = media.decode_clip(stereo_file, None, None, fps=7, short_side=16)
  assert len(clip.jpeg_frames) == 14  # 2 s at 7 fps
  expected = [round(k / 7 * 25) for k in range(14)]  # nearest 25 fps source frame; no ties at 7 fps
  assert _frame_numbers(clip.jpeg_frames) == expected
  assert (clip.start, clip.end, clip.degraded) == (0.0, pytest.approx(2.0), [])


def test_window_inside_the_video(stereo_file):
  clip = media.decode_clip(stereo_file, 0.53, 1.33, fps=10, short_side=16)
  assert _frame_numbers(clip.jpeg_frames) == [round((0.53 + k / 10) * 25) for k in range(8)]  # no ties
  assert clip.waveform.shape == (round(0.8 * 16000),)


def test_short_side_resize_keeps_aspect(stereo_file):
  clip = media.decode_clip(stereo_file, 0, 0.5, fps=4, short_side=24)
  assert (clip.height, clip.width) == (24, 36)  # 48x32 source
  image = np.asarray(Image.open(io.BytesIO(clip.jpeg_frames[0])))
  assert image.shape == (24, 36, 3)


@pytest.mark.parametrize('size, short_side, expected', [((60, 100), 30, (30, 50)), ((64, 90), 32, (32, 44)),
                                                        ((96, 48), 20, (40, 20))])
def test_resize_gives_even_sizes(tmp_path, size, short_side, expected):
  path = str(tmp_path / 'v.mp4')
  write_mp4(path, _numbered_frames(4, *size), None, fps=8)
  clip = media.decode_clip(path, None, None, fps=8, short_side=short_side)
  assert (clip.height, clip.width) == expected
  assert clip.height % 2 == 0 and clip.width % 2 == 0


def test_all_channels_are_averaged_and_resampled_to_16k(stereo_file):
  clip = media.decode_clip(stereo_file, 0.0, 2.0, fps=5, short_side=16)
  assert clip.sample_rate == 16000
  assert clip.waveform.dtype == np.float32 and clip.waveform.shape == (32000,)
  middle = clip.waveform[4000:28000]  # away from the codec's edges
  # Mean of the channels: each tone keeps half of its 0.4 amplitude (not 0.4 for a sum, not 0 for
  # channel 0 only); the tones sit at their true frequencies, so the rate conversion is right.
  assert _amplitude_at(middle, 440.0) == pytest.approx(0.2, rel=0.1)
  assert _amplitude_at(middle, 1000.0) == pytest.approx(0.2, rel=0.1)
  assert _amplitude_at(middle, 700.0) < 0.01


@pytest.mark.parametrize('start', [0.0, 0.2, 0.7, 1.3])
def test_audio_is_complete_from_the_window_start(stereo_file, start):
  """No decoder warm-up silence at the window start, whether it needs a seek or not."""
  clip = media.decode_clip(stereo_file, start, start + 0.5, fps=4, short_side=16)
  rms = np.sqrt(np.mean(np.square(clip.waveform[16:320])))  # 1-20 ms into the window
  assert rms == pytest.approx(0.2, rel=0.15)  # mean of two 0.4-amplitude sines: RMS 0.2


def test_audio_and_video_are_aligned_with_the_window(tmp_path):
  """A flash at 1.0 s with a click at 1.0 s appear at 1.0 s - start in both outputs."""
  frames = np.zeros((40, 32, 32, 3), np.uint8)
  frames[20] = 250  # 20 fps: frame 20 is at 1.0 s
  waveform = np.zeros(32000, np.float32)
  waveform[16000:16000 + 160] = _tone(2000.0, 0.01, 16000)
  path = str(tmp_path / 'flash.mp4')
  write_mp4(path, frames, waveform, fps=20, sample_rate=16000)
  clip = media.decode_clip(path, 0.5, 1.5, fps=20, short_side=16)
  brightness = [np.asarray(Image.open(io.BytesIO(f))).mean() for f in clip.jpeg_frames]
  assert int(np.argmax(brightness)) == 10  # 0.5 s into the window
  onset = int(np.argmax(np.abs(clip.waveform) > 0.05))
  assert abs(onset - 8000) < 16  # within 1 ms of 0.5 s into the window


def test_variable_frame_rate_uses_timestamps(tmp_path):
  times = [0.0, 0.05, 0.3, 0.33, 0.9, 1.2, 1.26]
  path = str(tmp_path / 'vfr.mkv')
  with av.open(path, 'w') as container:
    stream = container.add_stream('mpeg4', rate=1000)
    stream.width, stream.height, stream.pix_fmt = 32, 32, 'yuv420p'
    stream.codec_context.time_base = Fraction(1, 1000)
    for i, t in enumerate(times):
      frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), i * 30, np.uint8), format='rgb24')
      frame.pts, frame.time_base = round(t * 1000), Fraction(1, 1000)
      container.mux(stream.encode(frame))
    container.mux(stream.encode())
  clip = media.decode_clip(path, 0.0, 1.3, fps=10, short_side=16)
  picked = [round(np.asarray(Image.open(io.BytesIO(f))).mean() / 30) for f in clip.jpeg_frames]
  expected = [int(np.argmin([abs(t - k / 10) for t in times])) for k in range(13)]
  assert picked == expected


def test_rotation_metadata_is_applied(tmp_path):
  frames = np.zeros((4, 32, 48, 3), np.uint8)
  frames[:, :8, :8] = (255, 0, 0)  # red block at the top-left of the coded frame
  path = str(tmp_path / 'rotated.mp4')
  with av.open(path, 'w') as container:
    stream = container.add_stream('libx264', rate=8)
    stream.width, stream.height, stream.pix_fmt = 48, 32, 'yuv420p'
    stream.set_display_rotation(90)  # displayed rotated 90 degrees counterclockwise
    for i, image in enumerate(frames):
      frame = av.VideoFrame.from_ndarray(image, format='rgb24')
      frame.pts = i
      container.mux(stream.encode(frame))
    container.mux(stream.encode())
  clip = media.decode_clip(path, None, None, fps=8, short_side=16)
  assert (clip.height, clip.width) == (24, 16)  # portrait after rotation
  image = np.asarray(Image.open(io.BytesIO(clip.jpeg_frames[0]))).astype(int)
  assert image[-2, 1, 0] > 200 and image[1, 1, 0] < 60  # the top-left corner turned to the bottom-left


def test_file_without_audio_returns_none(tmp_path):
  path = str(tmp_path / 'silent.mp4')
  write_mp4(path, _numbered_frames(16), None, fps=8)
  clip = media.decode_clip(path, None, None, fps=8, short_side=16)
  assert clip.waveform is None
  assert len(clip.jpeg_frames) == 16


def test_short_source_is_padded_and_reported(stereo_file):
  clip = media.decode_clip(stereo_file, 1.0, 3.0, fps=5, short_side=16)
  assert len(clip.jpeg_frames) == 10
  assert _frame_numbers(clip.jpeg_frames)[5:] == [49] * 5  # last source frame repeated
  assert clip.waveform.shape == (32000,)
  assert np.abs(clip.waveform[17000:]).max() == 0.0  # zero padding after the source ends
  assert len(clip.degraded) == 2
  assert 'repeating the last frame' in clip.degraded[0] and 'silence' in clip.degraded[1]


def test_missing_file(tmp_path):
  path = str(tmp_path / 'nope.mp4')
  with pytest.raises(media.MediaError, match='nope.mp4: file not found') as error:
    media.decode_clip(path, None, None, fps=8, short_side=16)
  assert error.value.path == path


def test_truncated_and_garbage_files(tmp_path, stereo_file):
  with open(stereo_file, 'rb') as f:
    content = f.read()
  truncated = tmp_path / 'truncated.mp4'
  truncated.write_bytes(content[:len(content) // 2])
  garbage = tmp_path / 'garbage.mp4'
  garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
  for path in (truncated, garbage):
    with pytest.raises(media.MediaError, match=f'{path.name}: cannot decode'):
      media.decode_clip(str(path), None, None, fps=8, short_side=16)


def test_audio_only_file_has_no_video_stream(tmp_path):
  path = str(tmp_path / 'audio.m4a')
  with av.open(path, 'w', format='mp4') as container:
    stream = container.add_stream('aac', rate=16000)
    frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format='fltp', layout='mono')
    frame.sample_rate, frame.pts = 16000, 0
    container.mux(stream.encode(frame))
    container.mux(stream.encode())
  with pytest.raises(media.MediaError, match='audio.m4a: no video stream'):
    media.decode_clip(path, None, None, fps=8, short_side=16)


def test_window_after_the_end_is_an_error(stereo_file):
  with pytest.raises(media.MediaError, match='before the window start'):
    media.decode_clip(stereo_file, 5.0, 6.0, fps=8, short_side=16)


def test_bad_arguments(stereo_file):
  with pytest.raises(ValueError, match='short_side'):
    media.decode_clip(stereo_file, None, None, fps=8, short_side=15)
  with pytest.raises(ValueError, match='invalid window'):
    media.decode_clip(stereo_file, 2.0, 1.0, fps=8, short_side=16)


def test_media_error_survives_pickling():
  import pickle  # pylint: disable=g-import-not-at-top
  error = pickle.loads(pickle.dumps(media.MediaError('a.mp4', 'broken')))
  assert (error.path, error.reason, str(error)) == ('a.mp4', 'broken', 'a.mp4: broken')


def test_mono_conversion_follows_every_change_of_sample_format_layout_and_rate():
  """Frames whose format changes from one to the next (packed int16 stereo, planar float 7.1 at
  another rate, packed float64 mono): each is the plain mean of its own channels. Planar frames of 8
  channels are the case PyAV's own `to_ndarray` crashes on."""
  def frame(values, fmt, layout, rate):  # values [samples, channels] in [-1, 1]
    packed = {'s16': 's16', 'fltp': 'flt', 'dbl': 'dbl'}[fmt]
    scaled = (values * 32768).astype(np.int16) if packed == 's16' else values.astype(
        np.float32 if packed == 'flt' else np.float64)
    result = av.AudioFrame.from_ndarray(scaled.reshape(1, -1), format=packed, layout=layout)
    result.sample_rate = rate
    if fmt == 'fltp':  # planar: made by PyAV's own conversion
      result = av.AudioResampler(format='fltp').resample(result)[0]
    return result

  rng = np.random.default_rng(0)
  convert = media._MonoConverter()  # pylint: disable=protected-access
  for fmt, layout, channels, rate in (('s16', 'stereo', 2, 44100), ('fltp', '7.1', 8, 48000),
                                      ('dbl', 'mono', 1, 16000), ('s16', 'stereo', 2, 44100)):
    values = rng.uniform(-0.5, 0.5, (256, channels))
    source = frame(values, fmt, layout, rate)
    assert (source.format.name, source.layout.nb_channels) == (fmt, channels)
    np.testing.assert_allclose(convert(source), values.mean(axis=1), atol=1e-4)
