"""Real-world media cases: each has a defined outcome, checked on files written here with PyAV.

Decoding (`avt_jax.prep.media.decode_clip`): containers and codecs mp4/H.264+AAC, webm/VP9+Opus,
avi/MPEG-4+MP3, mpg/MPEG-2+MP2, ogg/VP8+Vorbis, mkv/H.264+FLAC decode to the right frames and tones;
5.1 audio is the plain mean of the six channels; 8-48 kHz sources become 16 kHz; digital silence is kept
and reported. (Theora cannot be written here: this PyAV build has no libtheora encoder, so the ogg
case uses VP8 video; Theora decoding is FFmpeg's and untested here.)

Preparation (`avt_jax.prep.shards.prepare_dataset`, one dataset holding every other case): a missing
file, a truncated mp4 and an empty file are skipped; a truncated Matroska file, a clip shorter than the
window and a file with a corrupt packet are kept, padded or patched, and reported as degraded; a file
without audio gets silence and `audio/missing`; variable frame rate, odd frame sizes, rotation metadata
and non-ASCII file names decode correctly.
"""

import glob
import io
import json
import os
from fractions import Fraction

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import av
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from avt_jax import records
from avt_jax.prep import annotations
from avt_jax.prep import logmel
from avt_jax.prep import media
from avt_jax.prep import shards

STEP = 10  # source frame i is a flat grey image of brightness i * STEP


def _write(path, fmt, video_codec, frames, fps, audio_codec=None, audio=None, rate=16000,
           layout='mono', pix_fmt='yuv420p', times=None, rotation=None):
  """Writes frames [n, h, w, 3] (at `times` seconds, default i / fps) and audio [channels, samples]."""
  with av.open(str(path), 'w', format=fmt) as container:
    video = container.add_stream(video_codec, rate=fps)
    video.width, video.height, video.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
    if video_codec in ('mpeg4', 'mpeg2video'):
      video.bit_rate = 2_000_000  # the default (200 kbit/s) blurs the grey levels that number frames
    if times is not None:
      video.codec_context.time_base = Fraction(1, 1000)
    if rotation is not None:
      video.set_display_rotation(rotation)
    if audio is not None:
      stream = container.add_stream(audio_codec, rate=rate)
      stream.layout = layout
      if audio_codec == 'vorbis':  # FFmpeg's own Vorbis encoder is marked experimental
        stream.codec_context.options = {'strict': 'experimental'}
    for i, image in enumerate(frames):
      frame = av.VideoFrame.from_ndarray(image, format='rgb24')
      if times is None:
        frame.pts = i
      else:
        frame.pts, frame.time_base = round(times[i] * 1000), Fraction(1, 1000)
      container.mux(video.encode(frame))
    container.mux(video.encode())
    if audio is not None:
      chunk = stream.codec_context.frame_size or 1024
      for offset in range(0, audio.shape[1], chunk):
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(audio[:, offset:offset + chunk]),
                                           format='fltp', layout=layout)
        frame.sample_rate, frame.pts = rate, offset
        container.mux(stream.encode(frame))
      container.mux(stream.encode())


def _numbered(count, height=16, width=16, step=STEP):
  return np.stack([np.full((height, width, 3), i * step, np.uint8) for i in range(count)])


def _tones(freqs, seconds, rate, amplitude=0.4):
  t = np.arange(round(seconds * rate)) / rate
  return np.stack([amplitude * np.sin(2 * np.pi * f * t) for f in freqs]).astype(np.float32)


def _amplitude(waveform, hz, rate=16000):
  """Amplitude of the sinusoid at `hz` (Hann-windowed DFT at one frequency)."""
  window = np.hanning(len(waveform))
  t = np.arange(len(waveform)) / rate
  return 2 * abs(np.sum(waveform * window * np.exp(-2j * np.pi * hz * t))) / window.sum()


def _brightness(jpeg):
  return np.asarray(Image.open(io.BytesIO(jpeg))).mean()


# name: (format, extension, video codec, audio codec, audio rate, frames per second)
CONTAINERS = {
    'mp4/H.264+AAC': ('mp4', 'mp4', 'libx264', 'aac', 44100, 10),
    'webm/VP9+Opus': ('webm', 'webm', 'libvpx-vp9', 'libopus', 48000, 10),
    'avi/MPEG-4+MP3': ('avi', 'avi', 'mpeg4', 'mp3', 22050, 10),
    'mpg/MPEG-2+MP2': ('mpeg', 'mpg', 'mpeg2video', 'mp2', 44100, 25),  # MPEG-2 needs a standard rate
    'ogg/VP8+Vorbis': ('ogg', 'ogg', 'libvpx', 'vorbis', 32000, 10),
    'mkv/H.264+FLAC': ('matroska', 'mkv', 'libx264', 'flac', 8000, 10),
}
# FFmpeg's experimental Vorbis encoder loses most of a second, different tone on the right channel (an
# encoder artefact), so that file carries the same tone on both channels.
STEREO_TONES = {'ogg/VP8+Vorbis': [440.0, 440.0]}
EXPECTED_CODECS = {'mp4/H.264+AAC': ('h264', 'aac'), 'webm/VP9+Opus': ('vp9', 'opus'),
                   'avi/MPEG-4+MP3': ('mpeg4', 'mp3'), 'mpg/MPEG-2+MP2': ('mpeg2video', 'mp2'),
                   'ogg/VP8+Vorbis': ('vp8', 'vorbis'), 'mkv/H.264+FLAC': ('h264', 'flac')}


@pytest.fixture(scope='module')
def container_files(tmp_path_factory):
  """2 s files: numbered grey frames, 440 Hz on the left channel and 1000 Hz on the right."""
  folder = tmp_path_factory.mktemp('containers')
  files = {}
  for name, (fmt, extension, video_codec, audio_codec, rate, fps) in CONTAINERS.items():
    path = folder / f'clip.{extension}'
    _write(path, fmt, video_codec, _numbered(2 * fps, step=5), fps, audio_codec,
           _tones(STEREO_TONES.get(name, [440.0, 1000.0]), 2.0, rate), rate, 'stereo')
    files[name] = str(path)
  return files


@pytest.mark.parametrize('name', list(CONTAINERS))
def test_containers_and_codecs_decode_frames_and_tones(container_files, name):
  path, fps = container_files[name], CONTAINERS[name][5]
  with av.open(path) as container:
    codecs = tuple(streams[0].codec_context.codec.canonical_name
                   for streams in (container.streams.video, container.streams.audio))
  assert codecs == EXPECTED_CODECS[name]
  clip = media.decode_clip(path, 0.0, 2.0, fps=5, short_side=16)
  assert len(clip.jpeg_frames) == 10 and clip.degraded == []
  source_frames = [_brightness(jpeg) / 5 for jpeg in clip.jpeg_frames]
  # The nearest source frame, to within 1.5 frames: lossy grey levels, the AVI muxer shifts timestamps
  # by a frame, the MPEG-2 encoder drops one.
  expected = [k / 5 * fps for k in range(10)]
  assert np.all(np.abs(np.array(source_frames) - expected) <= 1.5), source_frames
  middle = clip.waveform[4000:28000]
  assert clip.waveform.shape == (32000,)
  tones = STEREO_TONES.get(name, [440.0, 1000.0])
  for hz in set(tones):  # each channel's tone at half amplitude: the mean of the two channels
    assert _amplitude(middle, hz) == pytest.approx(0.2 * tones.count(hz), rel=0.1), hz
  assert _amplitude(middle, 700.0) < 0.01


@pytest.mark.parametrize('fmt, extension, audio_codec, layout', [
    ('mp4', 'mp4', 'aac', '5.1'), ('webm', 'webm', 'libopus', '5.1'),
    ('matroska', 'mkv', 'ac3', '5.1(side)')])
def test_5_1_audio_is_the_plain_mean_of_all_six_channels(tmp_path, fmt, extension, audio_codec, layout):
  freqs = [300.0, 500.0, 700.0, 90.0, 1100.0, 1300.0]  # one tone per channel; LFE (4th) low
  path = tmp_path / f'surround.{extension}'
  _write(path, fmt, 'libx264' if fmt != 'webm' else 'libvpx-vp9', _numbered(10), 10, audio_codec,
         _tones(freqs, 1.0, 48000), 48000, layout)
  with av.open(str(path)) as container:
    assert container.streams.audio[0].codec_context.layout.nb_channels == 6
  waveform = media.decode_clip(str(path), 0.0, 1.0, fps=5, short_side=16).waveform[2000:14000]
  for hz in freqs:  # equal weights 1/6 (not ffmpeg's downmix matrix, which drops the LFE)
    assert _amplitude(waveform, hz) == pytest.approx(0.4 / 6, rel=0.05), hz


@pytest.mark.parametrize('rate', [8000, 11025, 16000, 22050, 32000, 44100, 48000])
def test_sample_rates_from_8_to_48_khz_become_16_khz_mono(tmp_path, rate):
  path = tmp_path / f'r{rate}.mp4'
  _write(path, 'mp4', 'libx264', _numbered(10), 10, 'aac', _tones([300.0], 1.0, rate), rate, 'mono')
  clip = media.decode_clip(str(path), 0.0, 1.0, fps=5, short_side=16)
  assert clip.sample_rate == 16000 and clip.waveform.shape == (16000,)
  assert _amplitude(clip.waveform[3000:13000], 300.0) == pytest.approx(0.4, rel=0.05)
  assert _amplitude(clip.waveform[3000:13000], 600.0) < 0.01


@pytest.mark.parametrize('fmt, extension, audio_codec, rate, layout', [
    ('mp4', 'mp4', 'aac', 16000, 'mono'), ('webm', 'webm', 'libopus', 48000, 'stereo')])
def test_digital_silence_is_kept_and_reported(tmp_path, fmt, extension, audio_codec, rate, layout):
  path = tmp_path / f'silent.{extension}'
  channels = 1 if layout == 'mono' else 2
  _write(path, fmt, 'libx264' if fmt == 'mp4' else 'libvpx-vp9', _numbered(10), 10, audio_codec,
         np.zeros((channels, rate), np.float32), rate, layout)
  clip = media.decode_clip(str(path), 0.0, 1.0, fps=5, short_side=16)
  assert not np.any(clip.waveform) and clip.degraded == ['audio is digital silence']
  silence = logmel.log_mel(clip.waveform, n_mels=8)
  np.testing.assert_array_equal(silence, np.float32(np.log(logmel.LOG_OFFSET)))


# Every other case, prepared as one dataset: (clip id, relative path) -> file writer.
VFR_TIMES = [0.0, 0.05, 0.3, 0.33, 0.9, 1.2, 1.26, 1.8]


def _write_cases(folder):
  """Writes the case files under `folder`; returns their paths relative to `folder` (one is missing)."""
  def path(relative):
    full = os.path.join(folder, relative)
    os.makedirs(os.path.dirname(full), exist_ok=True)
    return full

  two_seconds = _tones([440.0], 2.0, 16000)
  _write(path('good.mp4'), 'mp4', 'libx264', _numbered(20), 10, 'aac', two_seconds)
  _write(path('no_audio.mp4'), 'mp4', 'libx264', _numbered(20), 10)
  _write(path('short.mp4'), 'mp4', 'libx264', _numbered(10), 10, 'aac', _tones([440.0], 1.0, 16000))
  _write(path('Ünïcode/vidéo 日本語 ñ.mp4'), 'mp4', 'libx264', _numbered(20), 10, 'aac', two_seconds)
  _write(path('vfr.mp4'), 'mp4', 'libx264', _numbered(len(VFR_TIMES)), 1000, 'aac', two_seconds,
         times=VFR_TIMES)
  _write(path('odd.webm'), 'webm', 'libvpx-vp9', _numbered(20, 17, 33), 10, 'libopus',
         _tones([440.0], 2.0, 48000), 48000)
  corner = _numbered(20, 16, 24)
  corner[:, :4, :4] = (250, 0, 0)  # red block at the top-left of the coded frames
  _write(path('rotated.mp4'), 'mp4', 'libx264', corner, 10, 'aac', two_seconds, rotation=270)
  _write(path('whole.mkv'), 'matroska', 'libx264', _numbered(20), 10, 'flac', two_seconds)
  with open(path('whole.mkv'), 'rb') as f:
    content = f.read()
  with open(path('truncated_stream.mkv'), 'wb') as f:  # streamable: readable up to the cut
    f.write(content[:len(content) // 2])
  with open(path('good.mp4'), 'rb') as f:
    content = f.read()
  with open(path('truncated_index.mp4'), 'wb') as f:  # index (moov) at the end: lost
    f.write(content[:len(content) // 2])
  open(path('empty.mp4'), 'wb').close()
  with av.open(path('good.mp4')) as container:
    packets = [(p.pos, p.size) for p in container.demux(video=0) if p.size]
  position, size = packets[6]
  with open(path('corrupt.mp4'), 'wb') as f:  # the 7th video packet zeroed
    f.write(content[:position] + bytes(size) + content[position + size:])
  names = ['good.mp4', 'no_audio.mp4', 'short.mp4', 'Ünïcode/vidéo 日本語 ñ.mp4', 'vfr.mp4',
           'odd.webm', 'rotated.mp4', 'truncated_stream.mkv', 'truncated_index.mp4', 'empty.mp4',
           'corrupt.mp4', 'missing.mp4']
  return names


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  """The cases prepared at 5 fps, short side 16, 2 s windows; returns (records by id, report by id)."""
  folder = str(tmp_path_factory.mktemp('cases'))
  names = _write_cases(os.path.join(folder, 'videos'))
  manifest = os.path.join(folder, 'manifest.csv')
  with open(manifest, 'w', encoding='utf-8') as f:
    f.write('path,label\n' + ''.join(f'"{name}",a\n' for name in names))
  specs, label_names = annotations.read_manifest(manifest)
  out = os.path.join(folder, 'prepared')
  stats = shards.prepare_dataset(specs, os.path.join(folder, 'videos'), out, fps=5, short_side=16,
                                 n_mels=16, clip_seconds=2.0, label_names=label_names, num_workers=0,
                                 progress=False)
  clips = {}
  for path in glob.glob(os.path.join(out, '*.tfrecord')):
    for serialized in tf.data.TFRecordDataset(path):
      clip = records.parse_clip(serialized)
      clips[clip['id'].numpy().decode()] = clip
  with open(os.path.join(out, 'report.jsonl'), encoding='utf-8') as f:
    report = {entry['clip_id']: entry for entry in map(json.loads, f)}
  return clips, report, stats


def _frames(clip):
  return [tf.io.decode_jpeg(jpeg).numpy() for jpeg in clip['jpeg']]


def test_every_case_has_its_outcome(prepared):
  clips, report, stats = prepared
  assert sorted(clips) == ['corrupt', 'good', 'no_audio', 'odd', 'rotated', 'short', 'truncated_stream',
                           'vfr', 'Ünïcode/vidéo 日本語 ñ']
  skipped = {clip_id: entry['reason'] for clip_id, entry in report.items() if entry['status'] == 'skipped'}
  assert sorted(skipped) == ['empty', 'missing', 'truncated_index']
  assert skipped['missing'] == 'file not found'
  assert skipped['empty'].startswith('cannot decode (InvalidDataError')
  assert skipped['truncated_index'].startswith('cannot decode (InvalidDataError')
  degraded = {clip_id for clip_id, entry in report.items() if entry['status'] == 'degraded'}
  assert degraded == {'no_audio', 'short', 'corrupt', 'truncated_stream'}
  assert stats['num_clips'] == {'train': 9} and stats['num_skipped'] == {'train': 3}


def test_good_clip_is_not_reported(prepared):
  clips, report, _ = prepared
  assert 'good' not in report
  assert clips['good']['jpeg'].shape == (10,) and clips['good']['logmel'].shape == (200, 16)


def test_missing_audio_becomes_flagged_silence(prepared):
  clips, report, _ = prepared
  assert report['no_audio']['reason'] == 'no audio stream; silence substituted'
  assert clips['no_audio']['audio_missing'].numpy() == 1
  assert np.all(clips['no_audio']['logmel'].numpy() == np.float16(np.log(logmel.LOG_OFFSET)))
  assert clips['good']['audio_missing'].numpy() == 0


def test_short_clip_is_padded_not_looped(prepared):
  clips, report, _ = prepared
  reason = report['short']['reason']
  assert 'video ends at 1.000s' in reason and 'padded with silence' in reason
  brightness = [frame.mean() / STEP for frame in _frames(clips['short'])]
  assert np.round(brightness).tolist() == [0, 2, 4, 6, 8, 9, 9, 9, 9, 9]  # last frame repeated
  spectrogram = clips['short']['logmel'].numpy()  # [200, 16]
  assert spectrogram[110:].max() == pytest.approx(np.log(logmel.LOG_OFFSET), abs=0.01)  # silence
  assert spectrogram[10:90].max() > 0  # the tone


def test_truncated_streamable_file_is_kept_and_padded(prepared):
  clips, report, _ = prepared
  reason = report['truncated_stream']['reason']
  assert reason.startswith('video ends at') and 'padded by repeating the last frame' in reason
  frames = [frame.mean() / STEP for frame in _frames(clips['truncated_stream'])]
  assert len(frames) == 10 and frames[-1] == frames[-2] < 18  # ends before the last source frame


def test_corrupt_packet_is_skipped_and_reported(prepared):
  clips, report, _ = prepared
  assert report['corrupt']['reason'] == '1 corrupt video packet(s) skipped (first at 0.600s in the file)'
  brightness = np.round([frame.mean() / STEP for frame in _frames(clips['corrupt'])]).tolist()
  assert brightness[:3] == [0, 2, 4] and brightness[4:] == [8, 10, 12, 14, 16, 18]
  assert brightness[3] != 6  # the frame of the damaged packet is not the true frame 6


def test_variable_frame_rate_uses_timestamps(prepared):
  clips, _, _ = prepared
  picked = np.round([frame.mean() / STEP for frame in _frames(clips['vfr'])]).tolist()
  expected = [int(np.argmin([abs(t - k / 5) for t in VFR_TIMES])) for k in range(10)]
  assert picked == expected


def test_odd_frame_size_and_rotation(prepared):
  clips, _, _ = prepared
  assert _frames(clips['odd'])[0].shape == (16, 32, 3)  # 33x17 source: short side 16, long side even
  rotated = _frames(clips['rotated'])[0].astype(int)  # 24x16 coded, rotated 270 degrees: portrait
  assert rotated.shape == (24, 16, 3)
  assert rotated[1, -2, 0] > 180 and rotated[1, 1, 0] < 60  # top-left corner turned to the top-right


def test_non_ascii_file_names(prepared):
  clips, _, _ = prepared
  clip = clips['Ünïcode/vidéo 日本語 ñ']
  assert len(clip['jpeg']) == 10 and clip['audio_missing'].numpy() == 0


def test_ogg_theora_vorbis_shipped_file():
  """tests/data/theora_vorbis.ogg: 1 s of ffmpeg's testsrc at 64x48, 10 fps (Theora) with a 440 Hz
  sine at 16 kHz (Vorbis), made with Debian's ffmpeg (libtheora, libvorbis) since this PyAV build
  has no Theora encoder: `ffmpeg -f lavfi -i testsrc=size=64x48:rate=10:duration=1 -f lavfi -i
  sine=frequency=440:sample_rate=16000:duration=1 -c:v libtheora -q:v 5 -c:a libvorbis -ac 1`."""
  path = os.path.join(os.path.dirname(__file__), 'data', 'theora_vorbis.ogg')
  with av.open(path) as container:
    codecs = tuple(streams[0].codec_context.codec.canonical_name
                   for streams in (container.streams.video, container.streams.audio))
  assert codecs == ('theora', 'vorbis')
  clip = media.decode_clip(path, 0.0, 1.0, fps=5, short_side=24)
  assert len(clip.jpeg_frames) == 5 and clip.degraded == []
  assert (clip.height, clip.width) == (24, 32)
  assert clip.waveform.shape == (16000,)
  middle = clip.waveform[2000:14000]
  assert _amplitude(middle, 440.0) > 10 * _amplitude(middle, 700.0)
