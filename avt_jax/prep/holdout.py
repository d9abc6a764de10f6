"""Test and validation splits held out of the training clips, by group.

`configs/manifest.py` evaluates on split `test` and fits the fusion weights of its two classifiers
(`avt_jax.calibration`) on split `val`, clips the model never trained on. Users' manifests often
have neither, so preparation can carve them out of `train` (our design): whole groups (a speaker, a
source video, a recording session: the manifest's `group` column, else each clip alone) move to the
split until at least the asked fraction of the training clips have moved, in an order fixed by a
hash of the group name, so the same manifest always gives the same splits. `test` is taken first
and `val` then from what stays in `train`, so no group is in two of them. Holding out whole groups
keeps clips that share a recording out of both sides, so held-out accuracy says how the model does
on sources it has not heard or seen.
"""

import collections
import dataclasses
import zlib
from typing import Sequence

from avt_jax.prep.annotations import ClipSpec

TEST_SPLIT = 'test'
VALIDATION_SPLIT = 'val'
# Fewer training clips than this: no validation split is held out (too few to fit the fusion
# weights on, too few to spare). A test split is asked for explicitly and has no such floor.
MIN_TRAIN_CLIPS = 40


def hold_out_splits(specs: Sequence[ClipSpec], *, test_fraction: float = 0.0,
                    val_fraction: float = 0.0, train_split: str = 'train'
                    ) -> tuple[list[ClipSpec], list[str]]:
  """Holds out `TEST_SPLIT`, then `VALIDATION_SPLIT` from what stays in `train_split`.

  Args:
    specs: the clips.
    test_fraction: in [0, 1): the least fraction of the training clips moved to `test` when no clip
      is in `test` (0 moves nothing).
    val_fraction: in [0, 1): the least fraction of the clips left in training moved to `val` when
      no clip is in `val`, and there are at least `MIN_TRAIN_CLIPS` of them (0 moves nothing).
    train_split: the split the clips are taken from.

  Returns:
    (clips with the moved ones' split changed, one-line notes for the user: one per split held out).

  Raises:
    ValueError: a fraction outside [0, 1), naming it; or `test_fraction` > 0 with no `test` clips
      and fewer than two training groups (nothing can be held out without emptying training).
  """
  for name, fraction in (('test_fraction', test_fraction), ('val_fraction', val_fraction)):
    if not 0.0 <= fraction < 1.0:
      raise ValueError(f'{name}: expected a number in [0, 1), got {fraction}.')
  specs, test_note = _hold_out(specs, TEST_SPLIT, test_fraction, purpose='for evaluation',
                               train_split=train_split)
  if test_fraction and not any(s.split == TEST_SPLIT for s in specs):
    raise ValueError(f'test_fraction: the {train_split!r} clips form fewer than two groups, so none '
                     f'can be held out as {TEST_SPLIT!r}; give rows with split {TEST_SPLIT!r} or '
                     'more groups.')
  specs, val_note = _hold_out(specs, VALIDATION_SPLIT, val_fraction,
                              purpose='for fusion calibration', min_train_clips=MIN_TRAIN_CLIPS,
                              train_split=train_split)
  return specs, [note for note in (test_note, val_note) if note]


def _hold_out(specs: Sequence[ClipSpec], split: str, fraction: float, *, purpose: str,
              min_train_clips: int = 0, train_split: str = 'train'
              ) -> tuple[list[ClipSpec], str | None]:
  """Moves whole groups of `train_split` clips to `split` until at least `fraction` of them moved,
  in group-name hash order, keeping one group in training. `spec.group` (None: the clip id) names
  each clip's group. Returns (the clips, a one-line note naming flag `--{split}_fraction`), or
  (`specs`, None) when nothing moved: `split` is already there, `fraction` is 0, or there are fewer
  than `min_train_clips` training clips or two training groups."""
  train = [s for s in specs if s.split == train_split]
  groups = collections.Counter(_group(s) for s in train)
  if (not fraction or len(train) < min_train_clips or len(groups) < 2
      or any(s.split == split for s in specs)):
    return list(specs), None
  wanted, moved, held = fraction * len(train), 0, set()
  for group in sorted(groups, key=lambda g: (zlib.crc32(g.encode()), g)):
    if moved >= wanted or len(held) == len(groups) - 1:
      break
    held.add(group)
    moved += groups[group]
  out = [dataclasses.replace(s, split=split)
         if s.split == train_split and _group(s) in held else s for s in specs]
  note = (f'held out {moved} of {len(train)} {train_split!r} clips ({len(held)} of {len(groups)} '
          f'groups) as split {split!r} {purpose} ({split}_fraction={fraction}; give a `group` '
          f'column to hold out whole speakers or sources, or rows with split {split!r} to choose '
          'them).')
  return out, note


def _group(spec: ClipSpec) -> str:
  return spec.group if spec.group else spec.clip_id
