"""In-process decoding of one clip with PyAV: resampled JPEG frames and a 16 kHz mono waveform.

Times are seconds on the file's presentation timeline, measured from the container start, for both
streams, so the returned frames and waveform cover the same [start, end) window:

* video: the frames at `start + k / fps` for `k = 0 .. round((end - start) * fps) - 1`
  (`data_format.frame_count`), each the decoded frame whose timestamp is nearest (the earlier one on
  a tie; works for variable frame rate sources); resized so the short side is `short_side` (aspect
  kept, long side rounded to an even size, sample aspect ratio and rotation metadata applied);
  JPEG-encoded.
* audio: all channels averaged with equal weights (a plain mean, not ffmpeg's downmix matrix), for any
  channel count, layout and sample format, resampled to 16 kHz with soxr (through librosa),
  `round((end - start) * 16000)` float32 samples. Sample rate, channel layout and sample format may
  change between frames (e.g. concatenated MP3s): each frame is converted with its own parameters and
  placed at its own timestamp.

Seeking: a window that starts after the beginning of the file is decoded from a seek to the keyframe
before it. Where a seek lands past the window (containers without an index such as MPEG-TS and MPEG-PS,
long GOPs, non-zero start times), decoding starts again from earlier points and at last from the first
packet, so every window that decodes when the file is read from the start decodes.

Short clips: when the source ends before `end`, the video is padded by repeating the last decoded frame
and the audio with zeros up to the requested duration (padding, not looping); `DecodedClip.degraded`
then says what was padded, and callers should report it. A window that contains no video at all is an
error. With `end=None` the window ends where the last video packet ends, so a file cut short at a packet
boundary cannot be told from a short video: give `end` (a fixed clip duration) to have it reported.

Streams: a file with several video or audio streams is read from one of each, chosen as ffmpeg's
`av_find_best_stream` chooses (highest score of the default flag plus not being marked for the hearing or
visually impaired, then more frames, up to 5, then the higher bit rate, then more frames), except that
cover images (`attached_pic` streams: album art in MP3/M4A/Matroska; single-picture JPEG/PNG tracks) are
never the video. A file whose only video is a cover image raises `MediaError` with the reason
`COVER_ONLY`. `DecodedClip.notes` says which streams were used when there was a choice.

Timestamps that restart or leap (files joined with `cat`: recorder segments, DVB/HLS chunks): a first
pass over the packets follows every jump as the ffmpeg CLI does for formats with discontinuities (MPEG-TS,
MPEG-PS): a timestamp more than 0.1 s before the previous one of its stream, or (in those formats) more
than 10 s after where the stream should go on, starts a new part, and every later packet of the file is
moved by the same amount so that the parts follow one another. Backward jumps are followed in every
container; large forward gaps are kept as they are in containers with exact timestamps (MP4, Matroska),
as ffmpeg keeps them. Such a file is decoded from its first packet (its timestamps cannot be sought), and
`DecodedClip.notes` lists the jumps. The first pass reads packets without decoding them, once per file and
process (cached): measured 0.18 s for a 2-minute 320x240 H.264/AAC MP4 on the 2-core CPU machine.

Damaged files: a file that cannot be opened (missing index, garbage, empty) raises `MediaError`; inside
a readable file, packets that the decoder rejects are skipped (the video keeps the nearest decoded
frame, the audio has a silent gap) and reported in `degraded`, and an error while reading the file ends
the streams there (padded and reported like a short file). The audio stream is handled on its own: when
at least half of its packets in the window cannot be decoded (or its decoder cannot be opened), the
clip keeps its video, `waveform` is None and `audio_error` says which stream failed and how many
packets. Audio that is all zeros (digital silence) is kept and reported in `degraded` too.
"""

import dataclasses
import fractions
import functools
import io
import os
from typing import Any, Callable, Iterator, NamedTuple

import av
import librosa
import numpy as np

from avt_jax import data_format

AUDIO_SAMPLE_RATE = 16000
# Gaps or overlaps between consecutive audio frames below this are timestamp rounding, not real gaps.
_AUDIO_JITTER_S = 0.002
# Audio decoding starts this long before the window: after a seek, decoders such as AAC (overlapped
# MDCT frames) output silence or garbage for their first frame.
_AUDIO_PREROLL_S = 0.5
# When a seek lands past the window, decoding starts again this much before the window start, then from
# the first packet of the file.
_SEEK_MARGINS_S = (0.0, 2.0, 10.0, 60.0)
SILENCE_NOTE = 'audio is digital silence'  # the `DecodedClip.degraded` line of all-zero audio
# The `MediaError.reason` of a file whose only video stream is a cover image (audio with album art).
COVER_ONLY = 'no video: the only video stream is a cover image (album art)'
# Timestamp jumps followed as the ffmpeg CLI follows them in formats with discontinuities
# (fftools/ffmpeg_demux.c, ts_discontinuity_detect: 0.1 s back, `-dts_delta_threshold` 10 s).
_BACKWARD_JUMP_S = 0.1
_FORWARD_JUMP_S = 10.0
_AVFMT_TS_DISCONT = 0x0200  # libavformat/avformat.h: the format allows timestamp discontinuities

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
    waveform: [samples] float32 mono audio at `sample_rate`, or None when the file has no audio stream
      or its audio stream cannot be decoded (then `audio_error` says why).
    sample_rate: audio sample rate in Hz.
    degraded: human-readable notes on padding, skipped packets and silence.
    audio_error: why the file's audio stream could not be decoded, or None.
    notes: what a reader should know that is not damage: the streams used when the file had several to
      choose from, timestamp jumps that were followed.
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
  audio_error: str | None = None
  notes: list[str] = dataclasses.field(default_factory=list)


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
    stat = os.stat(path)
    layout = _layout(path, stat.st_size, stat.st_mtime_ns)
    if end is None:
      if layout.video_end is None:
        raise MediaError(path, 'cannot determine the video duration')
      end = layout.video_end
      if end <= start:
        raise MediaError(path, f'the window start {start:.3f}s is past the video end {end:.3f}s')
    degraded = []
    jpeg_frames, video_end, (height, width), notes = _decode_video(
        path, layout, start, end, fps, short_side, jpeg_quality)
    if video_end < end - 0.5 / fps:
      degraded.append(f'video ends at {video_end:.3f}s before the window end {end:.3f}s; '
                      'padded by repeating the last frame')
    degraded.extend(notes)
  except av.error.FFmpegError as e:
    raise MediaError(path, f'cannot decode ({type(e).__name__}: {e})') from e
  waveform, audio_error = None, None
  if layout.audio is not None:
    # The audio stream is decoded on its own: whatever goes wrong there costs the audio, not the clip.
    try:
      waveform, audio_end, notes = _decode_audio(path, layout, start, end)
    except _StreamFailed as e:
      audio_error = e.reason
    except (av.error.FFmpegError, ValueError) as e:
      audio_error = f'audio stream cannot be decoded ({type(e).__name__}: {e})'
    else:
      if audio_end < end - 0.5 / fps:
        degraded.append(f'audio ends at {audio_end:.3f}s before the window end {end:.3f}s; '
                        'padded with silence')
      degraded.extend(notes)
      if not np.any(waveform):
        degraded.append(SILENCE_NOTE)
  return DecodedClip(jpeg_frames=jpeg_frames, fps=fps, height=height, width=width, start=start,
                     end=end, waveform=waveform, degraded=degraded, audio_error=audio_error,
                     notes=list(layout.notes))


def _open(path: str) -> av.container.InputContainer:
  """Opens a file for reading; metadata that is not valid UTF-8 (Latin-1 tags, a damaged Vorbis
  comment header) is read with replacement characters instead of failing the whole file."""
  return av.open(path, metadata_errors='replace')


@dataclasses.dataclass(frozen=True)
class _Layout:
  """What a first pass over a file's packets found (`_layout`).

  Attributes:
    video: index of the video stream to decode.
    audio: index of the audio stream to decode, or None.
    origin: container start time, seconds (times are measured from it).
    video_end: end of the video stream, seconds from `origin`, on the joined timeline; None when
      neither the packets nor the metadata tell.
    forward_jumps: whether large forward timestamp jumps are followed (formats with discontinuities).
    jumps: whether the timestamps jump (then decoding starts at the first packet and follows them).
    notes: the `DecodedClip.notes` of the file.
  """
  video: int
  audio: int | None
  origin: float
  video_end: float | None
  forward_jumps: bool
  jumps: bool
  notes: tuple[str, ...]

  def streams(self, container: av.container.InputContainer) -> list[av.stream.Stream]:
    """The chosen streams, in index order."""
    return [container.streams[i] for i in sorted({self.video, self.audio} - {None})]


class _JumpFollower:
  """Joins the parts of a file whose timestamps restart or leap, packet by packet in file order.

  One offset for the whole file, as the ffmpeg CLI keeps (our reading of fftools' discontinuity check): a
  packet whose decoding time is more than `_BACKWARD_JUMP_S` before the previous one of its stream, or
  (with `forward`) more than `_FORWARD_JUMP_S` after where its stream should go on, changes the offset
  so that it follows on; the new offset applies to every stream from then on, so the parts of the
  video and the audio stay together.
  """

  def __init__(self, forward: bool):
    self._forward = forward
    self.offset = 0.0  # seconds added to the timestamps of the current packet and the ones after it
    self._last: dict[int, float] = {}  # stream index -> previous decoding time on the joined timeline
    self._next: dict[int, float] = {}  # stream index -> where that stream should go on
    self.jumps: list[tuple[float, float]] = []  # (joined time, seconds jumped: < 0 back, > 0 forward)

  def __call__(self, packet: 'av.Packet | _PacketTimes') -> float:
    """Updates the offset with `packet` (read in file order); returns the offset for `packet`, s."""
    if packet.dts is None or packet.time_base is None:
      return self.offset  # no decoding time to check (Matroska's first packets)
    stream = packet.stream_index
    dts = float(packet.dts * packet.time_base) + self.offset
    if stream in self._last:
      delta = dts - self._next[stream]
      if dts + _BACKWARD_JUMP_S < self._last[stream] or (self._forward and delta > _FORWARD_JUMP_S):
        self.offset -= delta
        dts -= delta
        self.jumps.append((dts, delta))
    self._last[stream] = dts
    self._next[stream] = dts + (float(packet.duration * packet.time_base) if packet.duration else 0.0)
    return self.offset

  def shift(self, packet: av.Packet) -> None:
    """Moves `packet`'s timestamps onto the joined timeline (call in file order)."""
    offset = round(self(packet) / packet.time_base) if packet.time_base else 0
    if offset:
      packet.pts = None if packet.pts is None else packet.pts + offset
      packet.dts = None if packet.dts is None else packet.dts + offset

  def note(self, origin: float) -> str | None:
    """The `DecodedClip.notes` line of the jumps followed, or None."""
    if not self.jumps:
      return None
    where = ', '.join(f'{"back" if delta < 0 else "forward"} {abs(delta):.3f}s at {time - origin:.3f}s'
                      for time, delta in self.jumps[:5])
    more = f' and {len(self.jumps) - 5} more' if len(self.jumps) > 5 else ''
    return (f'timestamps jump {len(self.jumps)} time(s) ({where}{more}): the parts were placed one after '
            'another, as ffmpeg does')


def _disposition_rank(stream: av.stream.Stream) -> int:
  """av_find_best_stream's disposition score: default flag, and not for the hearing/visually impaired."""
  flags = stream.disposition
  impaired = av.stream.Disposition.hearing_impaired | av.stream.Disposition.visual_impaired
  return int(not flags & impaired) + int(bool(flags & av.stream.Disposition.default))


def _best(streams: list[av.stream.Stream], packets: dict[int, int]) -> av.stream.Stream:
  """The stream av_find_best_stream would pick among `streams`: disposition, then (up to 5) frames,
  bit rate, frames; `packets` (stream index -> packet count) stands in for the frames its probe saw.
  The earliest wins a tie."""
  def rank(stream):
    count = packets.get(stream.index, 0)
    return (_disposition_rank(stream), min(5, count), stream.bit_rate or 0, count)
  return max(streams, key=lambda stream: (rank(stream), -stream.index))


def _describe(stream: av.stream.Stream) -> str:
  """`#2 (aac, default, 'main')`."""
  context = stream.codec_context
  parts = [context.name if context is not None else 'no decoder']
  parts += [flag for flag in ('default', 'attached_pic') if stream.disposition & getattr(
      av.stream.Disposition, flag)]
  title = stream.metadata.get('title') or stream.metadata.get('language')
  if title and title != 'und':  # 'und': language undetermined
    parts.append(repr(title))
  return f'#{stream.index} ({", ".join(parts)})'


_PICTURE_CODECS = ('mjpeg', 'png', 'bmp', 'gif', 'webp', 'tiff', 'jpeg2000', 'jpegls')


def _is_picture(stream: av.stream.Stream, packets: dict[int, int]) -> bool:
  """Whether a video stream is a cover image: an `attached_pic` stream, or a track of at most one
  packet of a picture codec (how some muxers keep a cover given as an ordinary stream)."""
  if stream.disposition & av.stream.Disposition.attached_pic:
    return True
  name = stream.codec_context.name if stream.codec_context is not None else ''
  return packets.get(stream.index, 0) <= 1 and name in _PICTURE_CODECS


def _choose_streams(path: str, container: av.container.InputContainer, packets: dict[int, int]
                    ) -> tuple[av.stream.Stream, av.stream.Stream | None, list[str]]:
  """(video stream, audio stream or None, notes naming the choice when there was one)."""
  videos = list(container.streams.video)
  if not videos:
    raise MediaError(path, 'no video stream')
  moving = [s for s in videos if not _is_picture(s, packets)]
  if not moving:
    raise MediaError(path, COVER_ONLY)
  video = _best(moving, packets)
  # Audio streams without a decoder, channels or sample rate are taken only when there is no other.
  audios = list(container.streams.audio)
  usable = [s for s in audios
            if s.codec_context is not None and s.codec_context.channels and s.codec_context.sample_rate]
  audio = _best(usable or audios, packets) if audios else None
  notes = []
  for kind, chosen, streams in (('video', video, videos), ('audio', audio, audios)):
    if len(streams) > 1:
      others = ', '.join(_describe(s) for s in streams if s is not chosen)
      notes.append(f'{kind} stream {_describe(chosen)} used of {len(streams)} (not {others})')
  return video, audio, notes


class _PacketTimes(NamedTuple):
  """The timestamps of one packet (the `av.Packet` attributes `_JumpFollower` reads)."""
  stream_index: int
  pts: int | None
  dts: int | None
  duration: int | None
  time_base: fractions.Fraction | None


@functools.lru_cache(maxsize=64)
def _layout(path: str, size: int, mtime_ns: int) -> _Layout:
  """Chooses the streams and follows the timestamps of `path` in one pass over its packets (no
  decoding); `size` and `mtime_ns` key the cache, so a file that changes is read again.

  The video end is the end of the last video packet on the joined timeline, since duration metadata is
  missing in some containers (Matroska, WebM) and wrong in others (MPEG program streams give one frame's
  duration, AVI may count the audio); the metadata is the fallback when no packet has a timestamp. A
  read error ends the pass (the packets before it count).
  """
  del size, mtime_ns
  with _open(path) as container:
    origin = container.start_time / av.time_base if container.start_time is not None else 0.0
    candidates = [s for s in container.streams if s.type in ('video', 'audio')]
    packets: list[_PacketTimes] = []  # timestamps only: a long file's data does not stay in memory
    counts: dict[int, int] = {}
    for packet in _read_packets(container, candidates):
      counts[packet.stream_index] = counts.get(packet.stream_index, 0) + 1
      packets.append(_PacketTimes(packet.stream_index, packet.pts, packet.dts, packet.duration,
                                  packet.time_base))
    video, audio, notes = _choose_streams(path, container, counts)
    chosen = {video.index} | ({audio.index} if audio is not None else set())
    follower = _JumpFollower(forward=bool(container.format.flags & _AVFMT_TS_DISCONT))
    period = 1.0 / float(video.average_rate or video.guessed_rate or 25)
    last = None
    for packet in packets:
      if packet.stream_index not in chosen:
        continue
      offset = follower(packet)
      if packet.stream_index == video.index and packet.pts is not None:
        duration = float(packet.duration * packet.time_base) if packet.duration else period
        end = float(packet.pts * packet.time_base) + offset + duration
        last = end if last is None else max(last, end)
    if last is None and video.duration is not None and video.time_base is not None:
      last = float(((video.start_time or 0) + video.duration) * video.time_base)
    if last is None and container.duration is not None:
      last = container.duration / av.time_base + origin
    jump_note = follower.note(origin)
    return _Layout(video=video.index, audio=None if audio is None else audio.index, origin=origin,
                   video_end=None if last is None or last <= origin else last - origin,
                   forward_jumps=bool(container.format.flags & _AVFMT_TS_DISCONT),
                   jumps=bool(follower.jumps), notes=tuple(notes + ([jump_note] if jump_note else [])))


def _read_packets(container: av.container.InputContainer, streams: list[av.stream.Stream]
                  ) -> Iterator[av.Packet]:
  """The packets of `streams` in file order, up to the end or the first read error."""
  if not streams:
    return
  packets = container.demux(*streams)
  while True:
    try:
      yield next(packets)
    except (StopIteration, av.error.FFmpegError):
      return


def _seek_points(start: float, layout: _Layout) -> list[float | None]:
  """Where to start decoding for a window starting at `start` (seconds from the container start).

  The first try seeks to `start`; when a seek lands past the window (see `_decode_video`), decoding
  starts again from earlier points, and finally from the first packet (None, a fresh demuxer). A file
  whose timestamps jump is always read from the first packet.
  """
  if start <= 0 or layout.jumps:
    return [None]
  return [start - margin for margin in _SEEK_MARGINS_S if start - margin > 0] + [None]


def _seek(container: av.container.InputContainer, stream: av.stream.Stream, seconds: float) -> None:
  """Seeks `stream` to the last keyframe at or before `seconds` (absolute time)."""
  container.seek(int(seconds / stream.time_base), stream=stream, backward=True, any_frame=False)


class _StreamFailed(Exception):
  """A stream of an otherwise readable file cannot be decoded; `reason` says which and why."""

  def __init__(self, reason: str):
    super().__init__(reason)
    self.reason = reason


class _TolerantDecoder:
  """Decodes one stream packet by packet, skipping the packets the decoder (or `convert`) rejects.

  A damaged region of a file then costs the frames it holds (the video repeats the nearest decoded
  frame, the audio has a silent gap) instead of the whole clip; `notes` reports it. Any FFmpeg error
  while decoding a packet counts (invalid data, a decoder that cannot be opened, ...). An error while
  reading the file (demuxing) ends the stream there, as if the file were cut at that point.
  """

  def __init__(self, kind: str, after_seek: bool = False):
    """`after_seek`: the container was just seeked. Packets that fail before the first decoded frame
    are then where the seek landed (MPEG-PS seeks into the middle of packets), not damage: they are
    not counted once a frame decodes."""
    self.kind = kind  # 'video' or 'audio'
    self._after_seek = after_seek
    self.packets = 0  # packets with data read from the stream
    self.skipped: list[float | None] = []  # file time of each skipped packet, seconds
    self.first_error: Exception | None = None
    self.read_error: Exception | None = None

  def decode(self, container: av.container.InputContainer, stream: av.stream.Stream,
             convert: Callable[[av.frame.Frame], Any] | None = None, layout: _Layout | None = None
             ) -> Iterator[tuple[av.frame.Frame, Any]]:
    """Yields (frame, convert(frame)) for the frames of `stream` from the current position.

    With the `layout` of a file whose timestamps jump, the chosen streams are read from the first
    packet and `stream`'s packets are moved onto the joined timeline before decoding."""
    follower = _JumpFollower(layout.forward_jumps) if layout is not None and layout.jumps else None
    packets = container.demux(*layout.streams(container)) if follower else container.demux(stream)
    decoded_any = False
    while True:
      try:
        packet = next(packets)
      except StopIteration:
        return
      except av.error.FFmpegError as e:
        self.read_error = e
        return
      if follower is not None:
        follower.shift(packet)
        if packet.stream_index != stream.index:
          continue
      if packet.size:
        self.packets += 1
      try:
        decoded = [(frame, convert(frame) if convert else None) for frame in packet.decode()]
      except (av.error.FFmpegError, ValueError) as e:  # ValueError: PyAV's checks on odd frames
        if not packet.size:
          continue  # the empty packet that flushes the decoder at the end carries no data
        self.first_error = self.first_error or e
        self.skipped.append(None if packet.pts is None else float(packet.pts * packet.time_base))
        continue
      if decoded and not decoded_any:
        decoded_any = True
        if self._after_seek:
          self.skipped, self.first_error, self.packets = [], None, 1
      yield from decoded

  def notes(self) -> list[str]:
    """Report lines for skipped packets and read errors."""
    lines = []
    if self.skipped:
      known = [t for t in self.skipped if t is not None]
      where = f' (first at {min(known):.3f}s in the file)' if known else ''
      lines.append(f'{len(self.skipped)} corrupt {self.kind} packet(s) skipped{where}')
    if self.read_error is not None:
      lines.append(f'reading the file stopped with {type(self.read_error).__name__} ({self.read_error}); '
                   f'the {self.kind} after that point is missing')
    return lines

  def failed(self) -> bool:
    """True when at least half of the packets read (and at least one) could not be decoded."""
    return bool(self.skipped) and 2 * len(self.skipped) >= self.packets

  def failure(self, stream: av.stream.Stream) -> str:
    """The report line of a stream that `failed`."""
    error = self.first_error
    return (f'{self.kind} stream #{stream.index} ({stream.codec_context.name}) cannot be decoded: '
            f'{len(self.skipped)} of {self.packets} packet(s) failed ({type(error).__name__}: {error})')


def _frame_time(frame: av.frame.Frame, origin: float) -> float | None:
  return None if frame.time is None else frame.time - origin


def _decode_video(path: str, layout: _Layout, start: float, end: float, fps: float, short_side: int,
                  jpeg_quality: int) -> tuple[list[bytes], float, tuple[int, int], list[str]]:
  """Encodes, for each target time, the decoded frame with the nearest timestamp.

  Seeks to the keyframe before `start` first. A seek can land past the window: containers without an
  index (MPEG-TS, MPEG-PS) seek by timestamp to a packet that need not be a keyframe, so the decoder
  drops frames until the next keyframe, which may come after the window start or never; long GOPs and
  non-zero container start times make this common. When the first frame decoded after a seek is later
  than the window start (more than half a frame period), or nothing decodes, decoding starts again from
  an earlier point, and at last from the first packet of the file.

  Returns:
    (one JPEG per target time, padded with the last frame when the source ends early; end of the
    decoded video in seconds, or `end` when the source covers the whole window; (height, width) of the
    frames; report lines).
  """
  origin = layout.origin
  num_frames = max(1, data_format.frame_count(start, end, fps))
  targets = start + np.arange(num_frames) / fps
  seek_points = _seek_points(start, layout)
  for attempt, seek_point in enumerate(seek_points):
    last_attempt = attempt == len(seek_points) - 1
    decoder = _TolerantDecoder('video', after_seek=seek_point is not None)
    with _open(path) as container:
      video = container.streams[layout.video]
      nominal_period = 1.0 / float(video.average_rate or video.guessed_rate or 25)
      encoder = _FrameEncoder(video, short_side, jpeg_quality)
      if seek_point is not None:
        _seek(container, video, seek_point + origin)
      chosen: list[bytes] = []
      previous, previous_time = None, None
      for frame, _ in decoder.decode(container, video, layout=layout):
        time = _frame_time(frame, origin)
        if time is None:  # No timestamp: assume a constant rate from the previous frame.
          time = 0.0 if previous_time is None else previous_time + nominal_period
        if previous is None and not last_attempt and time > start + 0.5 * nominal_period:
          break  # The seek landed past the window start: try from an earlier point.
        while len(chosen) < num_frames and targets[len(chosen)] <= time:
          target = targets[len(chosen)]
          use_previous = previous is not None and target - previous_time <= time - target
          chosen.append(encoder(previous if use_previous else frame))
        previous, previous_time = frame, time
        if len(chosen) == num_frames:
          return chosen, end, (encoder.height, encoder.width), decoder.notes()
      if previous is None and not last_attempt:
        continue  # Nothing decoded after this seek.
      if previous is None:
        failed = decoder.failure(video) if decoder.failed() else ''
        raise MediaError(path, f'no video frames in the window [{start:.3f}, {end:.3f})s'
                         + (f'; {failed}' if failed else ''))
      period = float(previous.duration * previous.time_base) if previous.duration else nominal_period
      video_end = previous_time + period
      if video_end <= start:
        raise MediaError(path, f'the video ends at {video_end:.3f}s, before the window start {start:.3f}s')
      last = encoder(previous)
      chosen.extend([last] * (num_frames - len(chosen)))  # Source shorter than the window.
      return chosen, video_end, (encoder.height, encoder.width), decoder.notes()
  raise AssertionError('unreachable: the last attempt returns or raises')


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


class _MonoConverter:
  """Turns audio frames of any sample format, channel count and layout into mono float32 samples.

  Each frame is converted to packed float32 at its own layout and rate (a format conversion only, no
  remixing or resampling) and its channels are averaged with equal weights. Packed data is one plane:
  PyAV's planar `to_ndarray` reads past the channel pointers for 8 or more channels (a 7.1 frame
  crashes the process). A new converter is set up whenever the format, layout or rate of the frames
  changes (PyAV's resampler keeps the parameters of its first frame).
  """

  def __init__(self):
    self._key = None
    self._resampler = None

  def __call__(self, frame: av.AudioFrame) -> np.ndarray:
    """[samples] float32 mean of the channels of `frame`, at `frame.sample_rate`."""
    channels = frame.layout.nb_channels
    key = (frame.format.name, frame.layout.name, channels, frame.sample_rate)
    if key != self._key:
      self._key, self._resampler = key, av.AudioResampler(format='flt')
    if not frame.samples or not channels:
      return np.zeros(0, np.float32)
    packed = [converted.to_ndarray().reshape(-1, channels) for converted in self._resampler.resample(frame)]
    samples = np.concatenate(packed) if packed else np.zeros((0, channels), np.float32)
    return samples.mean(axis=1, dtype=np.float32)  # [samples]


class _AudioTimeline:
  """Places mono audio frames at their timestamps in the [start, end) window.

  Frames are kept at their own sample rate (one buffer per rate, so a rate that changes in the middle
  of the stream is placed correctly); `waveform` resamples each buffer to 16 kHz and adds them up.
  """

  def __init__(self, start: float, end: float):
    self._start = start
    self._end = end
    self._buffers: dict[int, np.ndarray] = {}  # rate -> [samples] mono
    self._cursor: tuple[int, int] | None = None  # (rate, sample index just after the previous frame)
    self.covered = 0.0  # seconds of the window up to the end of the last placed sample
    self.frames = 0

  def add(self, time: float | None, samples: np.ndarray, rate: int) -> None:
    """Places `samples` [n] at `time` (seconds from the container start; None: after the previous)."""
    buffer = self._buffers.get(rate)
    if buffer is None:
      samples_in_window = data_format.frame_count(self._start, self._end, rate)
      buffer = self._buffers[rate] = np.zeros(samples_in_window, np.float32)
    expected = None  # where the previous frame ended, in samples at `rate`
    if self._cursor is not None:
      cursor_rate, cursor = self._cursor
      expected = cursor if cursor_rate == rate else round(cursor / cursor_rate * rate)
    if time is not None:
      offset = round((time - self._start) * rate)
    else:  # No timestamp: continue after the previous frame, or start the stream at 0.
      offset = expected if expected is not None else round(-self._start * rate)
    if expected is not None and abs(offset - expected) <= _AUDIO_JITTER_S * rate:
      offset = expected
    self._cursor = (rate, offset + len(samples))
    self.frames += 1
    lo, hi = max(offset, 0), min(offset + len(samples), len(buffer))
    if lo < hi:
      buffer[lo:hi] = samples[lo - offset:hi - offset]
      self.covered = max(self.covered, hi / rate)

  def done(self) -> bool:
    """Whether the previous frame reached the end of the window."""
    if self._cursor is None:
      return False
    rate, cursor = self._cursor
    return cursor >= len(self._buffers[rate])

  def waveform(self) -> np.ndarray:
    """[round(duration * 16000)] float32 mono waveform."""
    num_samples = data_format.frame_count(self._start, self._end, AUDIO_SAMPLE_RATE)
    mono = np.zeros(num_samples, np.float32)
    for rate, buffer in self._buffers.items():
      if rate != AUDIO_SAMPLE_RATE:
        buffer = librosa.resample(buffer, orig_sr=rate, target_sr=AUDIO_SAMPLE_RATE, res_type='soxr_hq')
      mono += librosa.util.fix_length(buffer, size=num_samples).astype(np.float32)
    return mono


def _decode_audio(path: str, layout: _Layout, start: float, end: float
                  ) -> tuple[np.ndarray, float, list[str]]:
  """Decodes [start, end) of the chosen audio stream of `path` (`layout.audio`) to 16 kHz mono.

  A window near the start is decoded from the first packet of a fresh demuxer without seeking
  (seeking, even to 0, loses the codec's priming); later windows seek `_AUDIO_PREROLL_S` before `start`
  so that the decoder has settled when the window begins. When that seek lands past the window start
  (the first frame is later than the window start), decoding starts again from earlier points, and at
  last from the first packet. Sample rate, channel layout and sample format may change from frame to
  frame.

  Returns:
    ([round((end - start) * 16000)] float32 waveform, end of the decoded audio in seconds, report
    lines).

  Raises:
    _StreamFailed: at least half of the stream's packets in the window could not be decoded.
  """
  origin = layout.origin
  preroll_start = start - _AUDIO_PREROLL_S
  seek_points = _seek_points(preroll_start, layout)
  for attempt, seek_point in enumerate(seek_points):
    last_attempt = attempt == len(seek_points) - 1
    decoder = _TolerantDecoder('audio', after_seek=seek_point is not None)
    timeline = _AudioTimeline(start, end)
    landed_late = False
    with _open(path) as container:
      audio = container.streams[layout.audio]
      if audio.codec_context is None:
        raise _StreamFailed(f'audio stream #{audio.index} has no decoder in this FFmpeg build')
      if seek_point is not None:
        _seek(container, audio, seek_point + origin)
      for frame, samples in decoder.decode(container, audio, _MonoConverter(), layout):
        time = _frame_time(frame, origin)
        if timeline.frames == 0 and not last_attempt and time is not None and time > start:
          landed_late = True
          break
        timeline.add(time, samples, frame.sample_rate)
        if timeline.done():
          break
      if decoder.failed():
        raise _StreamFailed(decoder.failure(audio))
    if (landed_late or timeline.frames == 0) and not last_attempt:
      continue
    return timeline.waveform(), start + timeline.covered, decoder.notes()
  raise AssertionError('unreachable: the last attempt returns')
