"""Instrument notes played from sample-based General MIDI SoundFonts with FluidSynth.

Sources (Debian packages; `apt-get install fluidsynth timgm6mb-soundfont
musescore-general-soundfont-small`):

* `TimGM6mb`: `/usr/share/sounds/sf2/TimGM6mb.sf2` (package `timgm6mb-soundfont`, Tim Brechbill's
  6 MB General MIDI bank, GPL-2).
* `MuseScore`: `/usr/share/sounds/sf3/MuseScore_General_Lite.sf3` (package
  `musescore-general-soundfont-small`, the MuseScore General bank by S. Christian Collins, MIT).

Both are banks of recorded instrument samples (not synthesis from scratch): the same General MIDI
program is a different recording, by a different maker, in each bank, so a split that hears one bank
in training and the other in test is disjoint by source. FluidSynth (package `fluidsynth`, LGPL-2.1)
plays a Standard MIDI File holding every requested note, one per `SLOT_S` seconds, in one call per
bank; `render_notes` cuts the slots apart. Our design.
"""

import os
import shutil
import subprocess
import tempfile

import numpy as np

from avt_jax.prep import clips

SOUNDFONTS = {
    'TimGM6mb': ('/usr/share/sounds/sf2/TimGM6mb.sf2', 'timgm6mb-soundfont'),
    'MuseScore': ('/usr/share/sounds/sf3/MuseScore_General_Lite.sf3',
                  'musescore-general-soundfont-small'),
}
SLOT_S = 2.0  # seconds of the rendering per note
NOTE_S = 1.0  # key held
SOUND_S = 1.6  # kept per note: the held key and the start of its release
TICKS_PER_SECOND = 960  # 480 ticks per quarter note at the default 120 beats per minute


def soundfont_path(bank: str) -> str:
  """The file of SoundFont `bank` (a key of SOUNDFONTS).

  Raises:
    FileNotFoundError: the bank or FluidSynth is not installed; the message names the package.
  """
  path, package = SOUNDFONTS[bank]
  if not os.path.exists(path):
    raise FileNotFoundError(f'SoundFont {bank!r} not found at {path}: `apt-get install {package}`.')
  if not shutil.which('fluidsynth'):
    raise FileNotFoundError('The `fluidsynth` program was not found: `apt-get install fluidsynth`.')
  return path


def _variable_length(value: int) -> bytes:
  """A MIDI variable-length quantity (7 bits per byte, high bit set on all but the last)."""
  out = [value & 0x7F]
  value >>= 7
  while value:
    out.append(0x80 | (value & 0x7F))
    value >>= 7
  return bytes(reversed(out))


def midi_file(notes: list[tuple[int, int, int]]) -> bytes:
  """A format-0 Standard MIDI File playing `notes` (program, key, velocity) on channel 0, the i-th
  starting at i * SLOT_S seconds and held NOTE_S seconds."""
  events, now = bytearray(), 0
  for i, (program, key, velocity) in enumerate(notes):
    start = round(i * SLOT_S * TICKS_PER_SECOND)
    events += _variable_length(start - now) + bytes([0xC0, program])
    events += _variable_length(0) + bytes([0x90, key, velocity])
    events += _variable_length(round(NOTE_S * TICKS_PER_SECOND)) + bytes([0x80, key, 0])
    now = start + round(NOTE_S * TICKS_PER_SECOND)
  end = round(len(notes) * SLOT_S * TICKS_PER_SECOND)
  events += _variable_length(end - now) + b'\xff\x2f\x00'
  header = b'MThd' + (6).to_bytes(4, 'big') + (0).to_bytes(2, 'big') + (1).to_bytes(2, 'big') + (
      TICKS_PER_SECOND // 2).to_bytes(2, 'big')
  return header + b'MTrk' + len(events).to_bytes(4, 'big') + bytes(events)


def render_notes(bank: str, notes: list[tuple[int, int, int]]) -> list[np.ndarray]:
  """Each of `notes` (GM program 0..127, MIDI key, velocity 1..127) played from `bank`.

  Returns:
    One [SOUND_S * AUDIO_RATE] float32 mono waveform per note, peak-normalised to 1, with a 50 ms
    fade-out (reverb and chorus off).
  """
  import soundfile  # pylint: disable=g-import-not-at-top

  path = soundfont_path(bank)
  with tempfile.TemporaryDirectory() as tmp:
    with open(os.path.join(tmp, 'notes.mid'), 'wb') as f:
      f.write(midi_file(notes))
    subprocess.run(['fluidsynth', '-n', '-i', '-q', '-R', '0', '-C', '0', '-g', '0.5',
                    '-r', str(clips.AUDIO_RATE), '-T', 'wav', '-F', os.path.join(tmp, 'notes.wav'),
                    path, os.path.join(tmp, 'notes.mid')], check=True, capture_output=True)
    audio, rate = soundfile.read(os.path.join(tmp, 'notes.wav'), dtype='float32', always_2d=True)
  assert rate == clips.AUDIO_RATE, rate
  audio = audio.mean(1)
  slot, keep = round(SLOT_S * rate), round(SOUND_S * rate)
  fade = np.minimum(1.0, np.arange(keep, 0, -1) / (0.05 * rate)).astype(np.float32)
  out = []
  for i in range(len(notes)):
    note = audio[i * slot:i * slot + keep]
    note = np.pad(note, (0, keep - len(note))) * fade
    out.append((note / max(float(np.abs(note).max()), 1e-6)).astype(np.float32))
  return out
