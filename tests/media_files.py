"""Small media files for the tests, written with PyAV (no ffmpeg binary needed): flat-colour video with
sine tones, several audio tracks with dispositions, cover images, files joined with `cat`."""

import io

import av
import numpy as np
from PIL import Image

RED, BLUE = (220, 20, 20), (20, 20, 220)


def tone(hz: float, samples: int, rate: int, start: int = 0) -> np.ndarray:
  return (0.4 * np.sin(2 * np.pi * hz * np.arange(start, start + samples) / rate)).astype(np.float32)


def peak_hz(waveform: np.ndarray, rate: int = 16000) -> float:
  spectrum = np.abs(np.fft.rfft(waveform * np.hanning(len(waveform))))
  return float(np.fft.rfftfreq(len(waveform), 1 / rate)[spectrum.argmax()])


def colours(jpeg_frames) -> str:
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


def write(path: str, fmt: str, colour, tones: list[float], vcodec: str = 'libx264',
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
          samples = tone(hz, chunk, rate, written)[None]
          audio_frame = av.AudioFrame.from_ndarray(samples, format='fltp', layout='mono')
          audio_frame.sample_rate, audio_frame.pts = rate, written + round(shift_s * rate)
          container.mux(stream.encode(audio_frame))
        written += chunk
    container.mux(video.encode())
    for stream in audios:
      container.mux(stream.encode())


def joined(tmp_path, fmt: str, vcodec: str, acodec: str, shift_s: float) -> str:
  """Part A (2 s red, 440 Hz) then part B (2 s blue, 1000 Hz, timestamps moved by `shift_s`), the
  bytes of one file after the other (`cat a b`)."""
  parts = []
  for name, colour, hz, shift in (('a', RED, 440.0, 0.0), ('b', BLUE, 1000.0, shift_s)):
    part = str(tmp_path / f'{name}.{fmt}')
    write(part, fmt, colour, [hz], vcodec=vcodec, acodec=acodec, shift_s=shift)
    with open(part, 'rb') as f:
      parts.append(f.read())
  joined = str(tmp_path / f'joined.{fmt}')
  with open(joined, 'wb') as f:
    f.write(b''.join(parts))
  return joined


def write_song(path: str, fmt: str, codec: str) -> None:
  """1 s of 440 Hz audio with a red cover image: an `attached_pic` stream (mp3, m4a) or a Matroska
  attachment (which demuxes as one)."""
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
      frame = av.AudioFrame.from_ndarray(tone(440.0, 1152, 44100, start)[None], format='fltp',
                                         layout='mono')
      frame.sample_rate, frame.pts = 44100, start
      container.mux(audio.encode(frame))
    container.mux(audio.encode())
