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
from typing import Any

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
from avt_jax.prep import preparation
from avt_jax.prep import shards
from avt_jax.prep.datasets import manifest as manifest_lib

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
def cases(tmp_path_factory):
  """The case files and their manifest: (folder with `videos/`, clip specs, label names)."""
  folder = str(tmp_path_factory.mktemp('cases'))
  names = _write_cases(os.path.join(folder, 'videos'))
  manifest = os.path.join(folder, 'manifest.csv')
  with open(manifest, 'w', encoding='utf-8') as f:
    f.write('path,label\n' + ''.join(f'"{name}",a\n' for name in names))
  return (folder, *manifest_lib.read_manifest(manifest))


CASE_SETTINGS = dict(fps=5, short_side=16, n_mels=16, clip_seconds=2.0, progress=False)


@pytest.fixture(scope='module')
def prepared(cases):
  """The cases prepared at 5 fps, short side 16, 2 s windows; returns (records by id, report by id)."""
  folder, specs, label_names = cases
  out = os.path.join(folder, 'prepared')
  stats = shards.prepare_dataset(specs, os.path.join(folder, 'videos'), out, label_names=label_names,
                                 num_workers=0, **CASE_SETTINGS)
  # The default clip ids are the file paths; keyed here by the path without its extension.
  clips = {}
  for path in glob.glob(os.path.join(out, '*.tfrecord')):
    for serialized in tf.data.TFRecordDataset(path):
      clip = records.parse_clip(serialized)
      clips[os.path.splitext(clip['id'].numpy().decode())[0]] = clip
  with open(os.path.join(out, 'report.jsonl'), encoding='utf-8') as f:
    report = {os.path.splitext(entry['clip_id'])[0]: entry for entry in map(json.loads, f)}
  return clips, report, stats


def _outputs(folder: str) -> dict[str, Any]:
  """Parsed records per shard file, stats.json and report.jsonl of a prepared folder."""
  outputs = {}
  for path in sorted(glob.glob(os.path.join(folder, '*.tfrecord'))):
    outputs[os.path.basename(path)] = [tf.train.SequenceExample.FromString(x.numpy())
                                       for x in tf.data.TFRecordDataset(path)]
  for name in ('stats.json', 'report.jsonl'):
    with open(os.path.join(folder, name), encoding='utf-8') as f:
      outputs[name] = f.read()
  return outputs


def test_beam_runner_writes_what_the_local_runner_writes(cases, tmp_path):
  pytest.importorskip('apache_beam', reason="the Beam runner needs pip install -e '.[beam]'")
  folder, specs, label_names = cases
  videos = os.path.join(folder, 'videos')
  run = lambda out, **kwargs: shards.prepare_dataset(
      specs, videos, str(out), label_names=label_names, num_shards_per_split=3, **CASE_SETTINGS,
      **kwargs)
  run(tmp_path / 'local', num_workers=0)
  beam_options = '--direct_num_workers=2 --direct_running_mode=multi_threading'
  beam_writer = preparation.shard_writer('beam', beam_options)
  run(tmp_path / 'beam', write_shards=beam_writer)
  local = _outputs(tmp_path / 'local')
  assert len(local) == 5 and sum(map(len, (local[f'train-0000{i}-of-00003.tfrecord']
                                           for i in range(3)))) == 9
  assert _outputs(tmp_path / 'beam') == local  # records, combined statistics, report
  # A rerun writes only the shards that are not finished.
  beam = tmp_path / 'beam'
  kept = (beam / 'train-00000-of-00003.tfrecord').stat().st_mtime_ns
  (beam / 'train-00001-of-00003.tfrecord').unlink()
  run(beam, write_shards=beam_writer)
  assert (beam / 'train-00000-of-00003.tfrecord').stat().st_mtime_ns == kept
  assert _outputs(beam) == local


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


# --- Any channel count and layout (issue 12, item 1) ------------------------------------------------

def _write_channels(path, audio_codec, layout, tone_channel, hz=500.0, rate=16000, seconds=1.0):
  """1 s of 16x16 video with `layout` audio that is silent except a 0.3-amplitude tone in one channel.

  The audio is given to the encoder as packed float32 frames (PyAV's planar `from_ndarray` cannot make
  8-channel frames); the encoder converts them to its own sample format.
  """
  with av.open(str(path), 'w') as container:
    video = container.add_stream('libx264', rate=10)
    video.width, video.height, video.pix_fmt = 16, 16, 'yuv420p'
    audio = container.add_stream(audio_codec, rate=rate, layout=layout)
    for i in range(round(10 * seconds)):
      frame = av.VideoFrame.from_ndarray(np.full((16, 16, 3), i * STEP, np.uint8), format='rgb24')
      frame.pts = i
      container.mux(video.encode(frame))
    container.mux(video.encode())
    channels = audio.codec_context.layout.nb_channels
    samples = np.zeros((round(rate * seconds), channels), np.float32)
    samples[:, tone_channel] = 0.3 * np.sin(2 * np.pi * hz * np.arange(len(samples)) / rate)
    chunk = audio.codec_context.frame_size or 1024
    for offset in range(0, len(samples), chunk):
      frame = av.AudioFrame.from_ndarray(samples[offset:offset + chunk].reshape(1, -1), format='flt',
                                         layout=audio.codec_context.layout)
      frame.sample_rate, frame.pts = rate, offset
      container.mux(audio.encode(frame))
    container.mux(audio.encode())
  return channels


@pytest.mark.parametrize('audio_codec, layout, decoded_format', [
    ('aac', '7.1', 'fltp'),               # the report's file: planar float, 8 channels
    ('aac', 'hexadecagonal', 'fltp'),     # planar, 16 channels (more than FFmpeg's 8 data pointers)
    ('libopus', '7.1', 'fltp'),
    ('flac', '7.1', 's16'),               # packed integer
    ('pcm_s16le', '24c', 's16'),          # 24 channels in no named order
    ('pcm_f32le', '3c', 'flt'),
])
def test_any_channel_count_and_layout_is_the_plain_channel_mean(tmp_path, audio_codec, layout,
                                                               decoded_format):
  path = tmp_path / 'channels.mkv'
  channels = _write_channels(path, audio_codec, layout, tone_channel=2)
  with av.open(str(path)) as container:
    stream = container.streams.audio[0]
    assert (stream.codec_context.layout.nb_channels, stream.codec_context.format.name) == (
        channels, decoded_format)
  clip = media.decode_clip(str(path), 0.0, 1.0, fps=5, short_side=16)
  assert clip.degraded == [] and len(clip.jpeg_frames) == 5
  middle = clip.waveform[2000:14000]
  # The mean of the channels, one of which holds the tone: amplitude 0.3 / channels (7.1: RMS 0.0265).
  assert _amplitude(middle, 500.0) == pytest.approx(0.3 / channels, rel=0.05)
  if layout == '7.1':
    assert np.sqrt(np.mean(np.square(middle))) == pytest.approx(0.3 / 8 / np.sqrt(2), rel=0.05)


# --- Audio format changing between frames (issue 12, item 2) --------------------------------------

def _mp3(hz, rate, layout, seconds=1.0):
  """The bytes of a raw MP3 file holding a 0.4-amplitude tone."""
  buffer = io.BytesIO()
  with av.open(buffer, 'w', format='mp3') as container:
    stream = container.add_stream('mp3', rate=rate)
    stream.layout = layout
    channels = stream.codec_context.layout.nb_channels
    tone = np.tile(_tones([hz], seconds, rate), (channels, 1))
    for offset in range(0, tone.shape[1], 1152):
      frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(tone[:, offset:offset + 1152]),
                                         format='fltp', layout=layout)
      frame.sample_rate, frame.pts = rate, offset
      container.mux(stream.encode(frame))
    container.mux(stream.encode())
  return buffer.getvalue()


def _mux_with_video(path, mp3_bytes, seconds=2, fps=10):
  """Copies the MP3 packets, as they are, next to `seconds` of numbered H.264 frames in Matroska."""
  with av.open(io.BytesIO(mp3_bytes), format='mp3') as source, \
       av.open(str(path), 'w', format='matroska') as container:
    video = container.add_stream('libx264', rate=fps)
    video.width, video.height, video.pix_fmt = 16, 16, 'yuv420p'
    audio = container.add_stream_from_template(source.streams.audio[0])
    for i, image in enumerate(_numbered(seconds * fps)):
      frame = av.VideoFrame.from_ndarray(image, format='rgb24')
      frame.pts = i
      container.mux(video.encode(frame))
    container.mux(video.encode())
    for packet in source.demux(source.streams.audio[0]):
      if packet.size:
        packet.stream = audio
        container.mux(packet)


def _peak_hz(waveform, rate=16000):
  return float(np.fft.rfftfreq(len(waveform), 1 / rate)[np.argmax(np.abs(np.fft.rfft(waveform)))])


@pytest.mark.parametrize('second_half, hz, changes', [
    (('880', 48000, 'mono'), 880.0, 'sample rate 44.1 -> 48 kHz'),
    (('440', 44100, 'stereo'), 440.0, 'mono -> stereo'),
    (('880', 22050, 'stereo'), 880.0, 'rate and layout'),
])
def test_audio_format_changing_mid_stream(tmp_path, second_half, hz, changes):
  """Two MP3 files concatenated byte-wise (how such streams arise): the second's frames keep their
  own rate and layout. ffmpeg's CLI gives the second tone at its true pitch; so must we."""
  del changes
  path = tmp_path / 'concatenated.mkv'
  _mux_with_video(path, _mp3(440.0, 44100, 'mono') + _mp3(float(second_half[0]), *second_half[1:]))
  clip = media.decode_clip(str(path), 0.0, 2.0, fps=5, short_side=16)
  first, second = clip.waveform[1600:14400], clip.waveform[17600:30400]
  assert _peak_hz(first) == pytest.approx(440.0, abs=2) and _peak_hz(second) == pytest.approx(hz, abs=2)
  assert _amplitude(first, 440.0) == pytest.approx(0.4, rel=0.1)
  assert _amplitude(second, hz) == pytest.approx(0.4, rel=0.1)  # the whole file, at full level
  # The second file's header frame is the one packet the MP3 decoder rejects (ffmpeg: 'Header
  # missing'); nothing is padded.
  assert len(clip.jpeg_frames) == 10
  assert [note for note in clip.degraded if 'corrupt audio' not in note] == []


# --- Seeking in containers without an index (issue 12, item 3) ------------------------------------

def _write_one_gop(path, fmt, video_codec, audio_codec, seconds=4, fps=25, rate=44100, gop=250):
  """`seconds` of numbered frames with one keyframe every `gop` frames, plus a 600 Hz stereo tone."""
  with av.open(str(path), 'w', format=fmt) as container:
    video = container.add_stream(video_codec, rate=fps)
    video.width, video.height, video.pix_fmt = 16, 16, 'yuv420p'
    video.gop_size = gop
    if video_codec == 'libx264':
      video.codec_context.options = {'keyint_min': str(gop), 'sc_threshold': '0'}
    else:
      video.bit_rate = 2_000_000
    audio = container.add_stream(audio_codec, rate=rate)
    audio.layout = 'stereo'
    for i, image in enumerate(_numbered(seconds * fps, step=2)):
      frame = av.VideoFrame.from_ndarray(image, format='rgb24')
      frame.pts = i
      container.mux(video.encode(frame))
    container.mux(video.encode())
    tone = _tones([600.0, 600.0], seconds, rate, amplitude=0.3)
    chunk = audio.codec_context.frame_size or 1152
    for offset in range(0, tone.shape[1] - chunk + 1, chunk):
      frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(tone[:, offset:offset + chunk]),
                                         format='fltp', layout='stereo')
      frame.sample_rate, frame.pts = rate, offset
      container.mux(audio.encode(frame))
    container.mux(audio.encode())


def _frames_from_the_start(path):
  """(time from the container start, frame number) of every frame, decoding from the first packet."""
  with av.open(str(path)) as container:
    origin = container.start_time / av.time_base
    return [(frame.time - origin, round(frame.to_ndarray(format='rgb24').mean() / 2))
            for frame in container.decode(video=0)]


@pytest.mark.parametrize('fmt, extension, video_codec, audio_codec, gop', [
    ('mpegts', 'ts', 'libx264', 'aac', 250),       # one keyframe; start time > 0
    ('mpeg', 'mpg', 'mpeg2video', 'mp2', 250),     # MPEG-PS, one keyframe; start time ~0.5 s
    ('mpegts', 'ts', 'libx264', 'aac', 30),        # a keyframe every 1.2 s
])
def test_windows_in_containers_without_an_index(tmp_path, fmt, extension, video_codec, audio_codec, gop):
  path = tmp_path / f'long_gop.{extension}'
  _write_one_gop(path, fmt, video_codec, audio_codec, gop=gop)
  reference = _frames_from_the_start(path)
  assert len(reference) == 100  # every frame decodes when read from the start
  times = np.array([t for t, _ in reference])
  for start, end in ((0.0, 2.0), (1.0, 3.0), (1.9, 3.9), (None, None)):
    clip = media.decode_clip(str(path), start, end, fps=5, short_side=16)
    first = start or 0.0
    expected = [reference[int(np.argmin(np.abs(times - (first + k / 5))))][1]
                for k in range(len(clip.jpeg_frames))]
    assert len(clip.jpeg_frames) == (20 if start is None else 10), (start, end)
    assert [round(_brightness(jpeg) / 2) for jpeg in clip.jpeg_frames] == expected, (start, end)
    assert clip.degraded == [], (start, end)
    waveform = clip.waveform[800:-800]  # the tone through the whole window, no gap
    assert _amplitude(waveform, 600.0) == pytest.approx(0.3, rel=0.1), (start, end)
    peaks = np.abs(waveform[:len(waveform) // 160 * 160]).reshape(-1, 160).max(axis=1)  # per 10 ms
    assert peaks.min() > 0.2, (start, end)


# --- A damaged audio stream in an otherwise readable file (issue 12, item 5) ----------------------

_OGG_CRC_TABLE = []
for _byte in range(256):
  _crc = _byte << 24
  for _ in range(8):
    _crc = ((_crc << 1) ^ 0x04C11DB7) if _crc & 0x80000000 else _crc << 1
  _OGG_CRC_TABLE.append(_crc & 0xFFFFFFFF)


def _ogg_crc(page: bytes) -> int:
  crc = 0
  for byte in page:
    crc = ((crc << 8) & 0xFFFFFFFF) ^ _OGG_CRC_TABLE[((crc >> 24) & 0xFF) ^ byte]
  return crc


def _damage_vorbis(data: bytes, damage) -> bytes:
  """Applies `damage(buffer, packet_start, packet_length, packet_index)` to every packet of the Vorbis
  stream of an Ogg file and recomputes the page checksums (so the demuxer keeps the pages and the
  decoder sees the damaged packets). Packet 0 is the identification header."""
  data = bytearray(data)
  codec_of = {}  # page serial number -> codec magic of its first packet
  index, position = 0, 0
  while position < len(data):
    assert data[position:position + 4] == b'OggS'
    lacing = data[position + 27:position + 27 + data[position + 26]]
    body = position + 27 + len(lacing)
    serial = bytes(data[position + 14:position + 18])
    codec_of.setdefault(serial, bytes(data[body + 1:body + 7]))
    if codec_of[serial] == b'vorbis':
      start, length = body, 0
      for size in lacing:  # packets end at a lacing value below 255
        length += size
        if size < 255:
          damage(data, start, length, index)
          index, start, length = index + 1, start + length, 0
      data[position + 22:position + 26] = bytes(4)
      data[position + 22:position + 26] = _ogg_crc(bytes(data[position:body + sum(lacing)])).to_bytes(
          4, 'little')
    position = body + sum(lacing)
  return bytes(data)


def _theora_vorbis():
  with open(os.path.join(os.path.dirname(__file__), 'data', 'theora_vorbis.ogg'), 'rb') as f:
    return f.read()


def _audio_packets(path):
  with av.open(str(path)) as container:
    return sum(1 for packet in container.demux(audio=0) if packet.size)


def _bad_sample_rate(data, start, length, index):
  if index == 0:  # identification header: bytes 12-15 are the sample rate (16000 here)
    data[start + 15] = 0xDA  # -> a negative rate; FFmpeg's decoder refuses to open (EINVAL)


def test_undecodable_audio_stream_keeps_the_video(tmp_path):
  """The shipped Theora + Vorbis file with a damaged Vorbis header: `ffmpeg -i` decodes the video and
  reports 'Invalid sample rate' / 'Error while opening decoder' for the audio. The clip keeps its video;
  the audio is reported as failed, naming the stream and the packet count."""
  path = tmp_path / 'bad_vorbis.ogg'
  path.write_bytes(_damage_vorbis(_theora_vorbis(), _bad_sample_rate))
  clip = media.decode_clip(str(path), 0.0, 1.0, fps=5, short_side=24)
  reference = media.decode_clip(os.path.join(os.path.dirname(__file__), 'data', 'theora_vorbis.ogg'),
                                0.0, 1.0, fps=5, short_side=24)
  assert clip.jpeg_frames == reference.jpeg_frames and clip.degraded == []
  assert clip.waveform is None
  packets = _audio_packets(path)
  assert packets > 20
  assert clip.audio_error.startswith(
      f'audio stream #1 (vorbis) cannot be decoded: {packets} of {packets} packet(s) failed '
      '(ArgumentError: ')


def test_a_few_damaged_audio_packets_leave_gaps(tmp_path):
  """Four data packets that are no Vorbis audio packets (first bit set): the decoder rejects them and
  they are reported; the audio stream is kept."""
  def not_audio(data, start, length, index):
    if index in (12, 13, 14, 15):
      data[start] |= 1
  path = tmp_path / 'gaps.ogg'
  path.write_bytes(_damage_vorbis(_theora_vorbis(), not_audio))
  clip = media.decode_clip(str(path), 0.0, 1.0, fps=5, short_side=24)
  assert clip.audio_error is None and len(clip.jpeg_frames) == 5
  assert len(clip.degraded) == 1 and clip.degraded[0].startswith('4 corrupt audio packet(s) skipped')
  intact = media.decode_clip(os.path.join(os.path.dirname(__file__), 'data', 'theora_vorbis.ogg'),
                             0.0, 1.0, fps=5, short_side=24).waveform
  assert _amplitude(clip.waveform[2000:14000], 440.0) > 0.6 * _amplitude(intact[2000:14000], 440.0)


@pytest.mark.parametrize('missing_audio', ['silence', 'skip'])
def test_undecodable_audio_follows_the_missing_audio_policy(tmp_path, missing_audio):
  videos = tmp_path / 'videos'
  videos.mkdir()
  (videos / 'bad_vorbis.ogg').write_bytes(_damage_vorbis(_theora_vorbis(), _bad_sample_rate))
  (videos / 'good.ogg').write_bytes(_theora_vorbis())
  specs = [annotations.ClipSpec(name, f'{name}.ogg', {'class': [0]}) for name in ('bad_vorbis', 'good')]
  out = tmp_path / 'out'
  stats = shards.prepare_dataset(specs, str(videos), str(out), fps=5, short_side=16, n_mels=16,
                                 clip_seconds=1.0, label_names={'class': ['a']}, num_workers=0,
                                 missing_audio=missing_audio, progress=False)
  with open(out / 'report.jsonl', encoding='utf-8') as f:
    report = [json.loads(line) for line in f]
  assert [entry['clip_id'] for entry in report] == ['bad_vorbis']
  reason = report[0]['reason']
  assert reason.startswith('audio stream #1 (vorbis) cannot be decoded: ')
  if missing_audio == 'skip':
    assert report[0]['status'] == 'skipped' and stats['num_clips'] == {'train': 1}
    return
  assert report[0]['status'] == 'degraded' and reason.endswith('; silence substituted')
  clips = {}
  for serialized in tf.data.TFRecordDataset(glob.glob(str(out / '*.tfrecord'))):
    clip = records.parse_clip(serialized)
    clips[clip['id'].numpy().decode()] = clip
  assert clips['bad_vorbis']['jpeg'].shape == (5,) and clips['bad_vorbis']['audio_missing'].numpy() == 1
  assert clips['good']['audio_missing'].numpy() == 0
