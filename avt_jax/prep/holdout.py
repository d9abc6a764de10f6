"""A validation split held out of the training clips, by group, for fusion calibration.

`configs/manifest.py` fits the late-fusion weights (`avt_jax.calibration`) on clips the model never
trained on. Users' manifests rarely have such a split, so preparation carves one out of `train`
(our design): whole groups (a speaker, a source video, a recording session: the manifest's `group`
column, else each clip alone) move to `val` until at least `fraction` of the training clips have
moved, in an order fixed by a hash of the group name, so the same manifest always gives the same split.
Holding out whole groups keeps clips that share a recording out of both sides, so the held-out
accuracy of each modality says how it does on sources it has not heard or seen.
"""

import collections
import dataclasses
import zlib
from typing import Sequence

from avt_jax.prep.annotations import ClipSpec

VALIDATION_SPLIT = 'val'
# Fewer training clips than this: nothing is held out (too few to fit weights on, too few to spare).
MIN_TRAIN_CLIPS = 40


def hold_out_validation(specs: Sequence[ClipSpec], fraction: float, *, train_split: str = 'train'
                        ) -> tuple[list[ClipSpec], str | None]:
  """Moves whole groups of `train_split` clips to `VALIDATION_SPLIT`.

  Args:
    specs: the clips; `spec.group` (None: the clip id) names each clip's group.
    fraction: in [0, 1): the least fraction of training clips to move (0 moves nothing).
    train_split: the split the clips are taken from.

  Returns:
    (clips with the moved ones' split changed, a one-line note for the user or None when nothing
     moved: the annotations already have a validation split, `fraction` is 0, there are fewer than
     `MIN_TRAIN_CLIPS` training clips or fewer than two training groups).

  Raises:
    ValueError: `fraction` outside [0, 1).
  """
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f'val_fraction: expected a number in [0, 1), got {fraction}.')
  train = [s for s in specs if s.split == train_split]
  groups = collections.Counter(_group(s) for s in train)
  if not fraction or len(train) < MIN_TRAIN_CLIPS or len(groups) < 2 or any(s.split == VALIDATION_SPLIT for s in specs):
    return list(specs), None
  wanted, moved, held = fraction * len(train), 0, set()
  for group in sorted(groups, key=lambda g: (zlib.crc32(g.encode()), g)):
    if moved >= wanted or len(held) == len(groups) - 1:
      break
    held.add(group)
    moved += groups[group]
  out = [dataclasses.replace(s, split=VALIDATION_SPLIT)
         if s.split == train_split and _group(s) in held else s for s in specs]
  note = (f'held out {moved} of {len(train)} {train_split!r} clips ({len(held)} of {len(groups)} '
          f'groups) as split {VALIDATION_SPLIT!r} for fusion calibration (val_fraction={fraction}; '
          f'give a `group` column to hold out whole speakers or sources, or rows with split '
          f'{VALIDATION_SPLIT!r} to choose them).')
  return out, note


def _group(spec: ClipSpec) -> str:
  return spec.group if spec.group else spec.clip_id
