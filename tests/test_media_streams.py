"""Tests for avt_jax.prep.media's choice of streams and its timeline of joined files, on files written
with PyAV (no ffmpeg binary needed)."""

from fractions import Fraction

import av
import numpy as np
import pytest

from avt_jax.prep import media
from media_files import BLUE, RED, colours, joined, peak_hz, write, write_song

_DEFAULT = av.stream.Disposition.default


@pytest.mark.parametrize('fmt, vcodec, acodec, shift_s', [
    ('mpegts', 'libx264', 'aac', 0.0),      # the timeline restarts: `cat a.ts b.ts`
    ('mpegts', 'libx264', 'aac', 100.0),    # it leaps 98 s forward
    ('mpegts', 'libx264', 'aac', -1.0),     # the second part starts 1 s before the first (back 3 s)
    ('mpeg', 'mpeg2video', 'mp2', 0.0),     # MPEG program streams joined the same way
])
def test_joined_parts_follow_one_another(tmp_path, fmt, vcodec, acodec, shift_s):
  path = joined(tmp_path, fmt, vcodec, acodec, shift_s)
  whole = media.decode_clip(path, None, None, fps=5, short_side=32)
  # What ffmpeg decodes: 4 s, red + 440 Hz then blue + 1000 Hz.
  assert whole.end == pytest.approx(4.0, abs=0.15)
  seen = colours(whole.jpeg_frames)
  assert seen[:10] == 'R' * 10 and seen[11:] == 'B' * (len(seen) - 11), seen
  assert peak_hz(whole.waveform[3200:28800]) == pytest.approx(440, abs=5)
  assert peak_hz(whole.waveform[35200:60800]) == pytest.approx(1000, abs=5)
  assert len(whole.notes) == 1 and whole.notes[0].startswith('timestamps jump 1 time(s)'), whole.notes
  assert not whole.degraded
  # A window inside part B: its picture and its sound, nothing of part A.
  window = media.decode_clip(path, 2.4, 3.6, fps=5, short_side=32)
  assert colours(window.jpeg_frames) == 'BBBBBB'
  assert peak_hz(window.waveform) == pytest.approx(1000, abs=5)
  assert np.abs(window.waveform).max() == pytest.approx(0.4, abs=0.05)


def test_file_without_jumps_has_no_notes(tmp_path):
  path = str(tmp_path / 'plain.ts')
  write(path, 'mpegts', RED, [440.0])
  clip = media.decode_clip(path, 0.5, 1.5, fps=5, short_side=32)
  assert clip.notes == [] and colours(clip.jpeg_frames) == 'RRRRR'


def _packets(*rows):
  """`_PacketTimes` of (stream, dts in ms, duration in ms) rows, time base 1/1000."""
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
  # The second stream may be the first to show the restart; the first one then follows on.
  follower = media._JumpFollower(forward=True)
  offsets = [round(follower(p) * 1000) for p in _packets((0, 0, 40), (1, 0, 20), (0, 40, 40), (1, 20, 20),
                                                         (1, -500, 20), (0, -460, 40))]
  assert offsets == [0, 0, 0, 0, 540, 540]


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
  write(path, 'matroska', RED, [300.0, 2000.0], dispositions=dispositions, titles=['commentary', 'main'])
  clip = media.decode_clip(path, None, None, fps=5, short_side=32)
  assert peak_hz(clip.waveform[4000:28000]) == pytest.approx(hz, abs=5)
  chosen = 1 if hz == 300.0 else 2
  assert chosen == _best_audio(path)  # libavformat's own choice
  assert any(note.startswith(f'audio stream #{chosen} ') for note in clip.notes), clip.notes


def test_single_picture_track_is_not_the_video(tmp_path):
  path = str(tmp_path / 'cover_first.mkv')
  write(path, 'matroska', BLUE, [440.0], cover_track=True)
  clip = media.decode_clip(path, None, None, fps=5, short_side=32)
  assert clip.end == pytest.approx(2.0, abs=0.05)
  assert colours(clip.jpeg_frames) == 'B' * 10 and (clip.height, clip.width) == (32, 42)
  assert clip.notes == ['video stream #1 (h264) used of 2 (not #0 (mjpeg))']
  assert peak_hz(clip.waveform) == pytest.approx(440, abs=5)


@pytest.mark.parametrize('fmt, ext, codec', [('mp3', 'mp3', 'libmp3lame'), ('mp4', 'm4a', 'aac'),
                                              ('matroska', 'mka', 'aac')])
def test_audio_with_a_cover_image_is_not_a_video(tmp_path, fmt, ext, codec):
  path = str(tmp_path / f'song.{ext}')
  write_song(path, fmt, codec)
  with av.open(path) as container:  # the file holds what the test means: a cover as a video stream
    assert [s.type for s in container.streams] == ['audio', 'video']
    assert container.streams.video[0].disposition & av.stream.Disposition.attached_pic
  with pytest.raises(media.MediaError) as error:
    media.decode_clip(path, None, None, fps=5, short_side=32)
  assert error.value.reason == media.COVER_ONLY
