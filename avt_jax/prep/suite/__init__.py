"""The learning benchmark suite: named real-media audio-video sets, built and cached on first use.

    from avt_jax.prep import suite
    data_dir = suite.ensure('instruments_icons')   # prepared records folder

`SUITE` are the sets `python -m avt_jax.learning_benchmark` runs by default (`sets.py`: SoundFont
instruments x icon themes); `EXTRA` adds the two VoiceDigits variants (`voice_digits.py`: Hedgewars
voices x handwritten digit scans). `RELIABLE` says which modality each set makes the reliable one.
"""

from avt_jax.prep import voice_digits
from avt_jax.prep.suite import sets

SUITE = tuple(sets.SETS)
EXTRA = tuple(f'voice_digits_{v}' for v in voice_digits.VARIANTS)
RELIABLE = {**{k: v.reliable for k, v in sets.SETS.items()},
            'voice_digits_clean': 'both', 'voice_digits_complementary': 'neither alone'}


def ensure(name: str, cache_dir: str | None = None, **kwargs) -> str:
  """The prepared records folder of set `name` (one of SUITE + EXTRA), built on first use.

  `kwargs` go to `sets.ensure_set` or `voice_digits.ensure_voice_digits` (e.g. `progress`).

  Raises:
    ValueError: unknown name. FileNotFoundError: a source package is missing (names it).
  """
  if name in EXTRA:
    return voice_digits.ensure_voice_digits(name[len('voice_digits_'):], cache_dir, **kwargs)
  if name not in SUITE:
    raise ValueError(f'set: expected one of {list(SUITE + EXTRA)}, got {name!r}.')
  return sets.ensure_set(name, cache_dir, **kwargs)
