"""In-process decoding of one clip with PyAV: resampled JPEG frames and a 16 kHz mono waveform.

Times are seconds on the file's presentation timeline, measured from the container start, for both
streams, so the returned frames and waveform cover the same [start, end) window:

* video: the frames at `start + k / fps` for `k = 0 .. round((end - start) * fps) - 1`, each the
  decoded frame whose timestamp is nearest (the earlier one on a tie; works for variable frame rate
  sources); resized so the short side is `short_side` (aspect kept, long side rounded to an even size,
  sample aspect ratio and rotation metadata applied); JPEG-encoded.
* audio: all channels averaged with equal weights (a plain mean, not ffmpeg's downmix matrix),
  resampled to 16 kHz with soxr (through librosa), `round((end - start) * 16000)` float32 samples.

Short clips: when the source ends before `end`, the video is padded by repeating the last decoded frame
and the audio with zeros up to the requested duration (padding, not looping); `DecodedClip.degraded`
then says what was padded, and callers should report it. A window that contains no video at all is an
error. With `end=None` the window ends where the last video packet ends, so a file cut short at a packet
boundary cannot be told from a short video: give `end` (a fixed clip duration) to have it reported.

Damaged files: a file that cannot be opened (missing index, garbage, empty) raises `MediaError`; inside
a readable file, packets that the decoder rejects as invalid data are skipped (the video keeps the
nearest decoded frame, the audio has a silent gap) and reported in `degraded`. Audio that is all zeros
(digital silence) is kept and reported in `degraded` too.
"""

import dataclasses
import io
import os
from typing import Iterator

import av
import librosa
import numpy as np

AUDIO_SAMPLE_RATE = 16000
# Gaps or overlaps between consecutive audio frames below this are timestamp rounding, not real gaps.
_AUDIO_JITTER_S = 0.002
# Audio decoding starts this long before the window: after a seek, decoders such as AAC (overlapped
# MDCT frames) output silence or garbage for their first frame.
_AUDIO_PREROLL_S = 0.5

try:
  from PIL import Image
except ImportError:  # Pillow is optional: fall back to TensorFlow's encoder.
  Image = None


class MediaError(Exception):
  """A video file is missing, unreadable, corrupt, or has no usable video stream."""

  def __init__(self, path: str, reason: str):
    super().__init__(f'{path}: {reason}')
    self.path = path
    self.reason = reason

  def __reduce__(self):
    return type(self), (self.path, self.reason)


@dataclasses.dataclass
class DecodedClip:
  """The decoded [start, end) window of one video file.

  Attributes:
    jpeg_frames: JPEG bytes of each resampled frame.
    fps: frame rate of `jpeg_frames`.
    height: height of the frames in pixels.
    width: width of the frames in pixels.
    start: window start, seconds.
    end: window end, seconds.
    waveform: [samples] float32 mono audio at `sample_rate`, or None when the file has no audio stream.
    sample_rate: audio sample rate in Hz.
    degraded: human-readable notes on padding applied to a source shorter than the window.
  """
  jpeg_frames: list[bytes]
  fps: float
  height: int
  width: int
  start: float
  end: float
  waveform: np.ndarray | None
  sample_rate: int = AUDIO_SAMPLE_RATE
  degraded: list[str] = dataclasses.field(default_factory=list)


def decode_clip(path: str, start: float | None, end: float | None, fps: float, short_side: int,
                jpeg_quality: int = 90) -> DecodedClip:
  """Decodes the [start, end) window of a video file (see the module docstring for the conventions).

  Args:
    path: local video file.
    start: window start in seconds, None for 0.
    end: window end in seconds, None for the end of the video stream.
    fps: target frame rate.
    short_side: target size of the shorter frame side, even.
    jpeg_quality: JPEG quality 1..100.

  Returns:
    The decoded clip.

  Raises:
    MediaError: the file is missing, unreadable or corrupt, has no video stream, or has no video
      frames in the window.
    ValueError: bad arguments.
  """
  if fps <= 0:
    raise ValueError(f'fps must be > 0, got {fps}.')
  if short_side <= 0 or short_side % 2:
    raise ValueError(f'short_side must be a positive even number of pixels, got {short_side}.')
  start = 0.0 if start is None else float(start)
  if start < 0 or (end is not None and end <= start):
    raise ValueError(f'{path}: invalid window [{start}, {end}).')
  if not os.path.isfile(path):
    raise MediaError(path, 'file not found')
  try:
    with av.open(path) as container:
      if not container.streams.video:
        raise MediaError(path, 'no video stream')
      video = container.streams.video[0]
      origin = container.start_time / av.time_base if container.start_time is not None else 0.0
      if end is None:
        end = _video_end(path, video, origin)
        if end <= start:
          raise MediaError(path, f'the window start {start:.3f}s is past the video end {end:.3f}s')
      degraded = []
      encoder = _FrameEncoder(video, short_side, jpeg_quality)
      decoder = _TolerantDecoder()
      jpeg_frames, video_end = _decode_video(path, container, video, origin, start, end, fps, encoder,
                                             decoder)
      if video_end < end - 0.5 / fps:
        degraded.append(f'video ends at {video_end:.3f}s before the window end {end:.3f}s; '
                        'padded by repeating the last frame')
      degraded.extend(decoder.notes('video'))
      has_audio = bool(container.streams.audio)
    waveform = None
    if has_audio:
      decoder = _TolerantDecoder()
      with av.open(path) as container:  # a fresh demuxer: see `_decode_audio`
        waveform, audio_end = _decode_audio(container, container.streams.audio[0], origin, start, end,
                                            decoder)
      if audio_end < end - 0.5 / fps:
        degraded.append(f'audio ends at {audio_end:.3f}s before the window end {end:.3f}s; '
                        'padded with silence')
      degraded.extend(decoder.notes('audio'))
      if not np.any(waveform):
        degraded.append('audio is digital silence')
  except av.error.FFmpegError as e:
    raise MediaError(path, f'cannot decode ({type(e).__name__}: {e})') from e
  return DecodedClip(jpeg_frames=jpeg_frames, fps=fps, height=encoder.height, width=encoder.width,
                     start=start, end=end, waveform=waveform, degraded=degraded)


def _video_end(path: str, video: av.video.stream.VideoStream, origin: float) -> float:
  """End of the video stream in seconds from the container start.

  Read from the packets (the end of the last one) in a separate demuxer, since duration metadata is
  missing in some containers (Matroska, WebM) and wrong in others (MPEG program streams give one frame's
  duration, AVI may count the audio); the metadata is the fallback when no packet has a timestamp.
  """
  period = 1.0 / float(video.average_rate or video.guessed_rate or 25)
  last = None
  with av.open(path) as probe:
    for packet in probe.demux(probe.streams.video[0]):
      if packet.pts is not None:
        duration = float(packet.duration * packet.time_base) if packet.duration else period
        end = float(packet.pts * packet.time_base) + duration
        last = end if last is None else max(last, end)
    if last is None and video.duration is not None and video.time_base is not None:
      last = float(((video.start_time or 0) + video.duration) * video.time_base)
    if last is None and probe.duration is not None:
      last = probe.duration / av.time_base + origin
  if last is None or last - origin <= 0:
    raise MediaError(path, 'cannot determine the video duration')
  return last - origin


def _seek(container: av.container.InputContainer, stream: av.stream.Stream, seconds: float) -> None:
  """Seeks `stream` to the last keyframe at or before `seconds` (absolute time); no-op at the start."""
  if seconds > 0:
    container.seek(int(seconds / stream.time_base), stream=stream, backward=True, any_frame=False)


class _TolerantDecoder:
  """Decodes a stream packet by packet, skipping the packets the decoder rejects as invalid data.

  A damaged region of a file then costs the frames it holds (the video repeats the nearest decoded
  frame, the audio has a silent gap) instead of the whole clip; `notes` reports it.
  """

  def __init__(self):
    self.skipped: list[float | None] = []  # file time of each skipped packet, seconds

  def decode(self, container: av.container.InputContainer,
             stream: av.stream.Stream) -> Iterator[av.frame.Frame]:
    """Yields the decoded frames of `stream` from the container's current position."""
    for packet in container.demux(stream):
      try:
        yield from packet.decode()
      except av.error.InvalidDataError:
        self.skipped.append(None if packet.pts is None else float(packet.pts * packet.time_base))

  def notes(self, kind: str) -> list[str]:
    """A report line when packets of this `kind` ('video' or 'audio') were skipped."""
    if not self.skipped:
      return []
    known = [t for t in self.skipped if t is not None]
    where = f' (first at {min(known):.3f}s in the file)' if known else ''
    return [f'{len(self.skipped)} corrupt {kind} packet(s) skipped{where}']


def _frame_time(frame: av.frame.Frame, origin: float) -> float | None:
  return None if frame.time is None else frame.time - origin


def _decode_video(path: str, container, video, origin: float, start: float, end: float, fps: float,
                  encoder: '_FrameEncoder', decoder: '_TolerantDecoder') -> tuple[list[bytes], float]:
  """Encodes, for each target time, the decoded frame with the nearest timestamp.

  Frames are encoded as soon as they are chosen, so memory holds two decoded frames at most.

  Returns:
    (one JPEG per target time, padded with the last frame when the source ends early; end of the
    decoded video in seconds, or `end` when the source covers the whole window).
  """
  num_frames = max(1, round((end - start) * fps))
  targets = start + np.arange(num_frames) / fps
  nominal_period = 1.0 / float(video.average_rate or video.guessed_rate or 25)
  _seek(container, video, start + origin)
  chosen: list[bytes] = []
  previous, previous_time = None, None
  for frame in decoder.decode(container, video):
    time = _frame_time(frame, origin)
    if time is None:  # No timestamp: assume a constant rate from the previous frame.
      time = 0.0 if previous_time is None else previous_time + nominal_period
    while len(chosen) < num_frames and targets[len(chosen)] <= time:
      target = targets[len(chosen)]
      use_previous = previous is not None and target - previous_time <= time - target
      chosen.append(encoder(previous if use_previous else frame))
    previous, previous_time = frame, time
    if len(chosen) == num_frames:
      return chosen, end
  if previous is None:
    raise MediaError(path, f'no video frames in the window [{start:.3f}, {end:.3f})s')
  period = float(previous.duration * previous.time_base) if previous.duration else nominal_period
  video_end = previous_time + period
  if video_end <= start:
    raise MediaError(path, f'the video ends at {video_end:.3f}s, before the window start {start:.3f}s')
  last = encoder(previous)
  chosen.extend([last] * (num_frames - len(chosen)))  # Source shorter than the window.
  return chosen, video_end


class _FrameEncoder:
  """Resizes, rotates and JPEG-encodes frames; a frame chosen several times in a row is encoded once.

  The output size is fixed by the first frame: short side `short_side`, display aspect ratio (sample
  aspect ratio applied) kept, long side rounded to an even size, then rotated by the display matrix.
  """

  def __init__(self, stream, short_side: int, quality: int):
    self._stream = stream
    self._short_side = short_side
    self._quality = quality
    self._reformatter = av.video.reformatter.VideoReformatter()  # reuses its scaler across frames
    self._size = None  # (width, height) before rotation
    self._quarter_turns = 0  # counterclockwise
    self._last = None  # (frame, jpeg)

  @property
  def height(self) -> int:
    """Height of the encoded (rotated) frames."""
    width, height = self._size
    return width if self._quarter_turns % 2 else height

  @property
  def width(self) -> int:
    """Width of the encoded (rotated) frames."""
    width, height = self._size
    return height if self._quarter_turns % 2 else width

  def __call__(self, frame: av.VideoFrame) -> bytes:
    if self._last is not None and self._last[0] is frame:
      return self._last[1]
    if self._size is None:
      self._size = self._scaled_size(frame)
      self._quarter_turns = round((frame.rotation or 0) / 90) % 4
    width, height = self._size
    image = self._reformatter.reformat(frame, width=width, height=height, format='rgb24',
                                       interpolation='AREA').to_ndarray()  # [height, width, 3]
    jpeg = encode_jpeg(np.rot90(image, k=self._quarter_turns), self._quality)
    self._last = (frame, jpeg)
    return jpeg

  def _scaled_size(self, frame: av.VideoFrame) -> tuple[int, int]:
    sar = self._stream.codec_context.sample_aspect_ratio or self._stream.sample_aspect_ratio
    display_width = frame.width * (float(sar) if sar and sar > 0 else 1.0)
    short, long = sorted((display_width, frame.height))
    scaled_long = max(2, 2 * round(long / short * self._short_side / 2))
    if display_width <= frame.height:
      return self._short_side, scaled_long
    return scaled_long, self._short_side


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
  """JPEG-encodes an RGB uint8 [height, width, 3] image (Pillow if installed, else TensorFlow)."""
  image = np.ascontiguousarray(image)
  if Image is not None:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format='JPEG', quality=quality)
    return buffer.getvalue()
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.io.encode_jpeg(image, quality=quality).numpy()


def _decode_audio(container, audio, origin: float, start: float, end: float,
                  decoder: '_TolerantDecoder') -> tuple[np.ndarray, float]:
  """Decodes [start, end) of `audio` to 16 kHz mono.

  `container` must be freshly opened: a window near the start is then decoded from the first packet
  without seeking (seeking, even to 0, loses the codec's priming); later windows seek
  `_AUDIO_PREROLL_S` before `start` so that the decoder has settled when the window begins.

  Returns:
    ([round((end - start) * 16000)] float32 waveform, end of the decoded audio in seconds).
  """
  if start > _AUDIO_PREROLL_S:
    _seek(container, audio, start - _AUDIO_PREROLL_S + origin)
  # Planar float at the source layout and rate: a format conversion only.
  converter = av.AudioResampler(format='fltp')
  rate = None
  buffer = None  # [channels, samples] at the source rate
  cursor = None  # sample index (in `buffer`) just after the previous frame
  covered = 0
  for frame in decoder.decode(container, audio):
    for converted in converter.resample(frame):
      samples = converted.to_ndarray()  # [channels, samples]
      if rate is None:
        rate = converted.sample_rate
        buffer = np.zeros((samples.shape[0], round((end - start) * rate)), np.float32)
      time = _frame_time(frame, origin)
      if time is not None:
        offset = round((time - start) * rate)
      else:  # No timestamp: continue after the previous frame, or start the stream at 0.
        offset = cursor if cursor is not None else round(-start * rate)
      if cursor is not None and abs(offset - cursor) <= _AUDIO_JITTER_S * rate:
        offset = cursor
      cursor = offset + samples.shape[1]
      lo, hi = max(offset, 0), min(cursor, buffer.shape[1])
      if lo < hi:
        buffer[:, lo:hi] = samples[:, lo - offset:hi - offset]
        covered = max(covered, hi)
    if cursor is not None and cursor >= buffer.shape[1]:
      break
  num_samples = round((end - start) * AUDIO_SAMPLE_RATE)
  if rate is None:
    return np.zeros(num_samples, np.float32), start
  mono = buffer.mean(axis=0)  # [samples]
  if rate != AUDIO_SAMPLE_RATE:
    mono = librosa.resample(mono, orig_sr=rate, target_sr=AUDIO_SAMPLE_RATE, res_type='soxr_hq')
  mono = librosa.util.fix_length(mono, size=num_samples).astype(np.float32)
  return mono, start + covered / rate
