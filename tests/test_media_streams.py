"""Tests for avt_jax.prep.media's choice of streams and its timeline of joined files, on files written
with PyAV (no ffmpeg binary needed)."""

import io

import av
import numpy as np
import pytest
from PIL import Image

from avt_jax.prep import media

RED, BLUE = (220, 20, 20), (20, 20, 220)
_DEFAULT = av.stream.Disposition.default


def _tone(hz: float, samples: int, rate: int, start: int = 0) -> np.ndarray:
  return (0.4 * np.sin(2 * np.pi * hz * np.arange(start, start + samples) / rate)).astype(np.float32)


def _peak_hz(waveform: np.ndarray, rate: int = 16000) -> float:
  spectrum = np.abs(np.fft.rfft(waveform * np.hanning(len(waveform))))
  return float(np.fft.rfftfreq(len(waveform), 1 / rate)[spectrum.argmax()])


def _colours(jpeg_frames) -> str:
  """'R' or 'B' per frame, by the larger of the mean red and blue."""
  means = [np.asarray(Image.open(io.BytesIO(f)).convert('RGB')).reshape(-1, 3).mean(0) for f in jpeg_frames]
  return ''.join('R' if r > b else 'B' for r, _, b in means)


def _jpeg(colour) -> bytes:
  buffer = io.BytesIO()
  Image.new('RGB', (64, 64), colour).save(buffer, format='JPEG')
  return buffer.getvalue()


def _add_audio(container, codec: str, rate: int, **attributes):
  stream = container.add_stream(codec, rate=rate)
  stream.layout = 'mono'
  for key, value in attributes.items():
    setattr(stream, key, value)
  return stream


def _write(path: str, fmt: str, colour, tones: list[float], vcodec: str = 'libx264',
           acodec: str = 'aac', seconds: float = 2.0, fps: int = 25, rate: int = 48000,
           shift_s: float = 0.0, dispositions=None, titles=None, cover_track: bool = False) -> None:
  """A file of one flat-colour video and one audio stream per tone, muxed interleaved.

  `shift_s` moves every timestamp; `dispositions`/`titles` apply to the audio streams; `cover_track`
  puts a red one-packet MJPEG track first (a cover kept as an ordinary track)."""
  with av.open(path, 'w', format=fmt, options={'default_mode': 'passthrough'} if fmt == 'matroska' else {}
               ) as container:
    if cover_track:
      cover = container.add_stream('mjpeg', rate=1)
      cover.width, cover.height, cover.pix_fmt = 64, 64, 'yuvj444p'
    video = container.add_stream(vcodec, rate=fps)
    video.width, video.height, video.pix_fmt = 64, 48, 'yuv420p'
    audios = [_add_audio(container, acodec, rate) for _ in tones]
    for i, stream in enumerate(audios):
      if dispositions is not None:
        stream.disposition = dispositions[i]
      if titles is not None:
        stream.metadata['title'] = titles[i]
    if cover_track:
      packet = av.Packet(_jpeg(RED))
      packet.stream, packet.pts, packet.dts = cover, 0, 0
      container.mux(packet)
    image = np.zeros((48, 64, 3), np.uint8) + np.array(colour, np.uint8)
    num_frames, chunk = round(seconds * fps), 1152
    written = 0
    for i in range(num_frames):
      frame = av.VideoFrame.from_ndarray(image, format='rgb24')
      frame.pts = i + round(shift_s * fps)
      container.mux(video.encode(frame))
      while written < round((i + 1) / fps * rate):
        for stream, hz in zip(audios, tones):
          samples = _tone(hz, chunk, rate, written)[None]
          audio_frame = av.AudioFrame.from_ndarray(samples, format='fltp', layout='mono')
          audio_frame.sample_rate, audio_frame.pts = rate, written + round(shift_s * rate)
          container.mux(stream.encode(audio_frame))
        written += chunk
    container.mux(video.encode())
    for stream in audios:
      container.mux(stream.encode())


def _joined(tmp_path, fmt: str, vcodec: str, acodec: str, shift_s: float) -> str:
  """Part A (2 s red, 440 Hz) then part B (2 s blue, 1000 Hz, timestamps moved by `shift_s`), the
  bytes of one file after the other (`cat a b`)."""
  parts = []
  for name, colour, hz, shift in (('a', RED, 440.0, 0.0), ('b', BLUE, 1000.0, shift_s)):
    part = str(tmp_path / f'{name}.{fmt}')
    _write(part, fmt, colour, [hz], vcodec=vcodec, acodec=acodec, shift_s=shift)
    with open(part, 'rb') as f:
      parts.append(f.read())
  joined = str(tmp_path / f'joined.{fmt}')
  with open(joined, 'wb') as f:
    f.write(b''.join(parts))
  return joined


@pytest.mark.parametrize('fmt, vcodec, acodec, shift_s', [
    ('mpegts', 'libx264', 'aac', 0.0),      # the timeline restarts: `cat a.ts b.ts`
    ('mpegts', 'libx264', 'aac', 100.0),    # it leaps 98 s forward
    ('mpegts', 'libx264', 'aac', -1.0),     # the second part starts 1 s before the first (back 3 s)
    ('mpeg', 'mpeg2video', 'mp2', 0.0),     # MPEG program streams joined the same way
])
def test_joined_parts_follow_one_another(tmp_path, fmt, vcodec, acodec, shift_s):
  joined = _joined(tmp_path, fmt, vcodec, acodec, shift_s)
  whole = media.decode_clip(joined, None, None, fps=5, short_side=32)
  # What ffmpeg decodes: 4 s, red + 440 Hz then blue + 1000 Hz.
  assert whole.end == pytest.approx(4.0, abs=0.15)
  colours = _colours(whole.jpeg_frames)
  assert colours[:10] == 'R' * 10 and colours[11:] == 'B' * (len(colours) - 11), colours
  assert _peak_hz(whole.waveform[3200:28800]) == pytest.approx(440, abs=5)
  assert _peak_hz(whole.waveform[35200:60800]) == pytest.approx(1000, abs=5)
  assert len(whole.notes) == 1 and whole.notes[0].startswith('timestamps jump 1 time(s)'), whole.notes
  assert not whole.degraded
  # A window inside part B: its picture and its sound, nothing of part A.
  window = media.decode_clip(joined, 2.4, 3.6, fps=5, short_side=32)
  assert _colours(window.jpeg_frames) == 'BBBBBB'
  assert _peak_hz(window.waveform) == pytest.approx(1000, abs=5)
  assert np.abs(window.waveform).max() == pytest.approx(0.4, abs=0.05)


def test_file_without_jumps_has_no_notes(tmp_path):
  path = str(tmp_path / 'plain.ts')
  _write(path, 'mpegts', RED, [440.0])
  clip = media.decode_clip(path, 0.5, 1.5, fps=5, short_side=32)
  assert clip.notes == [] and _colours(clip.jpeg_frames) == 'RRRRR'


def _packets(*rows):
  """`_PacketTimes` of (stream, dts in ms, duration in ms) rows, time base 1/1000."""
  from fractions import Fraction
  return [media._PacketTimes(stream, dts, dts, duration, Fraction(1, 1000)) for stream, dts, duration in rows]


def test_jump_follower_rules():
  """0.1 s back or (formats with discontinuities) 10 s forward starts a new part; one offset for all
  streams; small reorderings and ordinary gaps are left alone."""
  rows = [(0, 0, 40), (1, 0, 20), (0, 40, 40), (1, 20, 20),
          (0, 30, 40),            # 50 ms back: jitter, not a jump
          (0, 1000, 40),          # 0.9 s forward: an ordinary gap
          (0, 200, 40),           # 840 ms back: the timeline restarts
          (1, 40, 20),            # the other stream is moved by the same offset
          (0, 30240, 40)]         # 30 s forward
  for forward, expected in ((True, [0, 0, 0, 0, 0, 0, 840, 840, 840 - 30000]),
                            (False, [0, 0, 0, 0, 0, 0, 840, 840, 840])):
    follower = media._JumpFollower(forward=forward)
    offsets = [round(follower(p) * 1000) for p in _packets(*rows)]
    assert offsets == expected


def _best_audio(path: str) -> int:
  with av.open(path) as container:
    return container.streams.best('audio').index


@pytest.mark.parametrize('dispositions, hz', [
    ((0, _DEFAULT), 2000.0),                                          # default flag on the second track
    ((_DEFAULT, 0), 300.0),
    ((_DEFAULT | av.stream.Disposition.hearing_impaired, _DEFAULT), 2000.0),
])
def test_audio_stream_is_chosen_as_av_find_best_stream_does(tmp_path, dispositions, hz):
  path = str(tmp_path / 'two_audio.mkv')
  _write(path, 'matroska', RED, [300.0, 2000.0], dispositions=dispositions, titles=['commentary', 'main'])
  clip = media.decode_clip(path, None, None, fps=5, short_side=32)
  assert _peak_hz(clip.waveform[4000:28000]) == pytest.approx(hz, abs=5)
  chosen = 1 if hz == 300.0 else 2
  assert chosen == _best_audio(path)  # libavformat's own choice
  assert any(note.startswith(f'audio stream #{chosen} ') for note in clip.notes), clip.notes


def test_single_picture_track_is_not_the_video(tmp_path):
  path = str(tmp_path / 'cover_first.mkv')
  _write(path, 'matroska', BLUE, [440.0], cover_track=True)
  clip = media.decode_clip(path, None, None, fps=5, short_side=32)
  assert clip.end == pytest.approx(2.0, abs=0.05)
  assert _colours(clip.jpeg_frames) == 'B' * 10 and (clip.height, clip.width) == (32, 42)
  assert clip.notes == ['video stream #1 (h264) used of 2 (not #0 (mjpeg))']
  assert _peak_hz(clip.waveform) == pytest.approx(440, abs=5)


@pytest.mark.parametrize('fmt, ext, codec', [('mp3', 'mp3', 'libmp3lame'), ('mp4', 'm4a', 'aac'),
                                              ('matroska', 'mka', 'aac')])
def test_audio_with_a_cover_image_is_not_a_video(tmp_path, fmt, ext, codec):
  path = str(tmp_path / f'song.{ext}')
  with av.open(path, 'w', format=fmt) as container:
    audio = _add_audio(container, codec, 44100)
    if fmt == 'matroska':
      container.add_attachment('cover.jpg', 'image/jpeg', _jpeg(RED))
    else:
      cover = container.add_stream('mjpeg')
      cover.width, cover.height, cover.pix_fmt = 64, 64, 'yuvj444p'
      cover.disposition = av.stream.Disposition.attached_pic
      packet = av.Packet(_jpeg(RED))
      packet.stream, packet.pts, packet.dts = cover, 0, 0
      container.mux(packet)
    for start in range(0, 44100, 1152):
      frame = av.AudioFrame.from_ndarray(_tone(440.0, 1152, 44100, start)[None], format='fltp',
                                         layout='mono')
      frame.sample_rate, frame.pts = 44100, start
      container.mux(audio.encode(frame))
    container.mux(audio.encode())
  with av.open(path) as container:  # the file holds what the test means: a cover as a video stream
    assert [s.type for s in container.streams] == ['audio', 'video']
    assert container.streams.video[0].disposition & av.stream.Disposition.attached_pic
  with pytest.raises(media.MediaError) as error:
    media.decode_clip(path, None, None, fps=5, short_side=32)
  assert error.value.reason == media.COVER_ONLY
