"""The real-media sets of the learning benchmark suite: SoundFont instruments x icon-theme pictures.

Every set pairs a General MIDI instrument note (a recorded sample played from a SoundFont,
`soundfonts.py`) with a freedesktop icon drawn by an icon-theme designer (`icons.py`), rendered into
2 s clips by the shared renderer (`avt_jax/prep/clips.py`) and prepared exactly like users' videos
(`--dataset=manifest`, 10 fps, 64 px short side, 64 mel bins, 2 s); cached (`prep/cache.py`); each
clip depends only on (seed, set, split, index).

Splits, disjoint by source on both modalities: `train` plays the MuseScore General bank and shows
the Adwaita, Tango and oxygen themes (a class's clips cycle through the three); `test` plays the
TimGM6mb bank and shows the elementary-xfce theme, neither heard nor seen in training. Each clip is
one note: a pitch from `PITCHES`, a velocity from `VELOCITIES`.

| set | classes | train / test clips | reliable modality |
|---|---|---|---|
| `instruments_icons` | 12: instrument k + icon k | 384 / 96 | both |
| `instruments_faint_icons` | the same 12, icon small, faint, in heavy pixel noise | 384 / 96 | audio |
| `icons_noisy_instruments` | the same 12, note quiet under loud hiss | 384 / 96 | video |
| `instrument_x_icon` | 16: each of 4 instruments x each of 4 icons | 384 / 96 | neither alone (each at most 25%) |

Why these sources: they are Debian packages with no speech, no digits and no hand drawings (the
maintainers' hidden sets use spoken digits, MNIST-like handwriting, spoken object names and
drawings), they are small, and each gives the same classes made by several independent makers, so
the test split can be a maker never seen in training. Our design.
"""

import dataclasses
import os
import sys
import zlib

import numpy as np

from avt_jax.prep import cache, clips
from avt_jax.prep.suite import icons, soundfonts

VERSION = 'v2'
INSTRUMENTS = {  # General MIDI program numbers (0-based); the most distinct first (reduced sets)
    'organ': 19, 'trumpet': 56, 'xylophone': 13, 'guitar': 24, 'flute': 73, 'violin': 40,
    'piano': 0, 'sax': 65, 'accordion': 21, 'vibraphone': 11, 'banjo': 105, 'harpsichord': 6}
ICONS = ('folder', 'user-trash', 'printer', 'computer', 'face-smile', 'camera-photo',
         'input-keyboard', 'input-mouse', 'x-office-calendar', 'system-users', 'media-optical',
         'utilities-terminal')
CROSS_INSTRUMENTS = ('xylophone', 'organ', 'guitar', 'trumpet')
CROSS_ICONS = ('folder', 'printer', 'face-smile', 'user-trash')
PITCHES = tuple(range(55, 80, 2))  # MIDI keys G3..G5, whole tones
VELOCITIES = (70, 100, 120)
SPLITS = {'train': ('MuseScore', ('Adwaita', 'Tango', 'oxygen')),
          'test': ('TimGM6mb', ('elementary-xfce',))}


@dataclasses.dataclass(frozen=True)
class SuiteSet:
  """One set: its classes as (instrument, icon) pairs, how each modality is shown, clips per class."""
  classes: tuple[tuple[str, str], ...]
  reliable: str  # 'both', 'audio', 'video' or 'neither alone'
  video_look: clips.VideoLook = clips.VideoLook()
  audio_look: clips.AudioLook = clips.AudioLook()
  per_class: tuple[int, int] = (32, 8)  # (train, test)


PAIRED = tuple(zip(INSTRUMENTS, ICONS))
SETS = {
    'instruments_icons': SuiteSet(PAIRED, 'both'),
    'instruments_faint_icons': SuiteSet(
        PAIRED, 'audio', video_look=clips.VideoLook(size=(20, 28), opacity=0.3, noise=40.0)),
    'icons_noisy_instruments': SuiteSet(
        PAIRED, 'video', audio_look=clips.AudioLook(gain=(0.03, 0.08), noise_rms=(0.03, 0.06))),
    'instrument_x_icon': SuiteSet(
        tuple((s, p) for s in CROSS_INSTRUMENTS for p in CROSS_ICONS), 'neither alone',
        per_class=(24, 6)),
}


def class_names(spec: SuiteSet, num_classes: int | None = None) -> list[str]:
  """`<instrument>+<icon>` per class (the first `num_classes`)."""
  return [f'{s}+{p}' for s, p in spec.classes[:num_classes]]


def check_sources(spec: SuiteSet) -> None:
  """Raises FileNotFoundError (naming the package to install) if a source of `spec` is missing."""
  for bank, themes in SPLITS.values():
    soundfonts.soundfont_path(bank)
    for theme in themes:
      for _, icon in spec.classes:
        icons.icon_path(theme, icon)


def plan_clips(name: str, spec: SuiteSet, num_classes: int, per_class: tuple[int, int], seed: int
               ) -> list[clips.Clip]:
  """The clips of set `name`: per split and class, `per_class` clips, each one note (random pitch
  and velocity, from the split's bank) and the class icon of the split's themes in turn."""
  rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
  plan = []
  for (split, (bank, themes)), count in zip(SPLITS.items(), per_class):
    notes = [(k, int(rng.choice(PITCHES)), int(rng.choice(VELOCITIES)))
             for k in range(num_classes) for _ in range(count)]
    unique = sorted({(INSTRUMENTS[spec.classes[k][0]], key, vel) for k, key, vel in notes})
    sounds = dict(zip(unique, soundfonts.render_notes(bank, unique)))
    pictures = {(theme, icon): icons.load_icon(theme, icon)
                for theme in themes for _, icon in spec.classes[:num_classes]}
    label = class_names(spec, num_classes)
    for i, (k, key, vel) in enumerate(notes):
      instrument, icon = spec.classes[k]
      theme = themes[i % len(themes)]
      plan.append(clips.Clip(split, label[k], sounds[(INSTRUMENTS[instrument], key, vel)],
                             pictures[(theme, icon)], f'{bank}-{theme}'))
  return plan


def ensure_set(name: str, cache_dir: str | None = None, *, num_classes: int | None = None,
               per_class: tuple[int, int] | None = None, seed: int = 0,
               num_workers: int | None = None, progress: bool = True) -> str:
  """Returns the prepared records folder of suite set `name`, building it on first use.

  Args:
    name: a key of SETS.
    cache_dir: cache root (None: `$AVT_JAX_CACHE` or ~/.cache/avt_jax).
    num_classes: use the first `num_classes` classes (None: all); a reduced set for tests.
    per_class: (train, test) clips per class (None: the set's own).
    seed: clip layout seed.
    num_workers: processes (None: all cores up to 8; 0: this process).
    progress: show progress on stderr.

  Raises:
    ValueError: unknown set or class count. FileNotFoundError: a source package is not installed
    (the message names it).
  """
  if name not in SETS:
    raise ValueError(f'set: expected one of {sorted(SETS)}, got {name!r}.')
  spec = SETS[name]
  num_classes = num_classes or len(spec.classes)
  per_class = per_class or spec.per_class
  if not 2 <= num_classes <= len(spec.classes):
    raise ValueError(f'num_classes: expected 2..{len(spec.classes)}, got {num_classes}.')
  check_sources(spec)  # fail before creating anything
  folder = cache.versioned_folder(cache_dir, 'suite', VERSION, name, f'{num_classes}c',
                                  '{}x{}'.format(*per_class), f'seed{seed}')
  num_workers = clips.default_workers(num_workers)

  def build(building: str) -> None:
    if progress:
      sys.stderr.write(f'suite: writing {name} clips in {building}\n')
    plan = plan_clips(name, spec, num_classes, per_class, seed)
    manifest = clips.write_clips(building, name, plan, seed, num_workers, spec.video_look,
                                 spec.audio_look)
    clips.prepare(manifest, class_names(spec, num_classes), building,
                  os.path.join(building, 'prepared'), num_workers, progress)

  cache.build_once(folder, build, {'version': VERSION})
  return os.path.join(folder, 'prepared')
