"""The datasets `python -m avt_jax.prepare` reads, one module each, and the entry that describes one.

Each module (`kinetics`, `vggsound`, `epic_kitchens_100`, `manifest`) holds its dataset's annotation
parser, preparation defaults, TFDS builder description and smoke writer, and exposes them as a
`Dataset`; `avt_jax.prep.registry` maps `--dataset` names to these entries (our design).
"""

import dataclasses
from typing import Callable, Mapping, Sequence

import numpy as np

from avt_jax.prep import annotations

# (annotation files, video folder, `--classes` value or None) -> (clips, label head -> class names).
Reader = Callable[[Sequence[str], str, str | None],
                  tuple[list[annotations.ClipSpec], dict[str, list[str]]]]
# (raw folder, random generator) -> (annotation files, video folder, `--classes` value or None).
SmokeWriter = Callable[[str, np.random.Generator], tuple[list[str], str, str | None]]


@dataclasses.dataclass(frozen=True)
class Defaults:
  """Preparation defaults of a dataset (our choice, matching the paper-scale configs: 25 fps records,
  a 256-px short side for 224-px crops, 128 mel bins).

  Attributes:
    fps: stored frames per second.
    short_side: stored frame short side in pixels (even).
    n_mels: mel bins of the log-mel spectrogram.
    clip_seconds: fixed clip duration in seconds (a window centred on the annotated segment), or None
      to keep the annotated segments.
    val_fraction: least fraction of the `train` clips held out as split `val` when the annotations
      have no `val` split (`avt_jax.prep.holdout`); 0 for datasets with their own validation split.
  """
  fps: float = 25.0
  short_side: int = 256
  n_mels: int = 128
  clip_seconds: float | None = 10.0
  val_fraction: float = 0.0


@dataclasses.dataclass(frozen=True)
class TfdsSpec:
  """The tensorflow-datasets copy of a prepared dataset (`avt_jax.input.tfds_builders`).

  Attributes:
    name: the TFDS dataset name, e.g. 'avt_vggsound'.
    title: what the dataset is, for the builder's docstring, e.g. 'VGGSound (309 classes)'.
    labels: TFDS feature name -> (label head in the records, number of classes).
  """
  name: str
  title: str
  labels: Mapping[str, tuple[str, int]]


@dataclasses.dataclass(frozen=True)
class Dataset:
  """One `--dataset` of `python -m avt_jax.prepare`.

  Attributes:
    name: the `--dataset` value.
    read: the annotation parser (`Reader`); errors name the file and line.
    defaults: preparation defaults.
    tfds: its TFDS builder, or None for none.
    write_smoke: writes a few generated clips in the dataset's own layout and annotation format
      (`avt_jax.prep.smoke_data`), or None for none.
  """
  name: str
  read: Reader
  defaults: Defaults
  tfds: TfdsSpec | None = None
  write_smoke: SmokeWriter | None = None
