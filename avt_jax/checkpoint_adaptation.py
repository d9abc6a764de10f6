"""Restoring a checkpoint into a config that differs from the checkpoint's (our design).

`restore_adapted` resizes position embeddings, converts scanned <-> unrolled layers, drops or
initialises the branches of objectives switched off or on, and otherwise stops with one line naming
the config field that differs (`IncompatibleCheckpointError`). It reads through
`avt_jax.checkpointing.Checkpointer` (the orbax wrapper) and knows the model's parameter layout
(`avt_jax.models.scan`, `avt_jax.models.tokenizers.resize_posemb`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Callable

import jax
from flax import traverse_util

from avt_jax import checkpointing

PyTree = Any

# Config fields that give the train state a shape that restoring cannot adapt (the token grids,
# `model.scan_layers` and the objectives' weights are adapted), for the parameters and for the
# optimizer state.
_PARAM_FIELDS = tuple(f'model.{name}' for name in (
    'size', 'hidden_size', 'num_layers', 'num_heads', 'mlp_dim', 'modalities', 'video_patch',
    'audio_patch', 'audio_stride', 'fusion', 'fusion_layer', 'n_bottlenecks', 'contrastive_dim',
    'decoder_width', 'decoder_depth', 'decoder_heads', 'decoder_mlp_dim')) + (
        'data.num_classes', 'data.label_heads')
_OPTIMIZER_FIELDS = ('optim.name', 'optim.grad_clip_norm', 'optim.momentum')


class IncompatibleCheckpointError(ValueError):
  """A checkpoint cannot be used with this config; the message is one line naming the field."""


def config_snapshot(config: Any) -> dict[str, Any]:
  """The config as JSON values, to store in a checkpoint's meta (`meta['config']`)."""
  return json.loads(config.to_json_best_effort())


def _config_changes(saved: dict[str, Any] | None, config: Any,
                    fields: tuple[str, ...]) -> list[str]:
  """'config.x is A in the checkpoint and B now' for the `fields` (or fields under them) that
  differ."""
  if not saved or config is None:
    return []
  before, now = (traverse_util.flatten_dict(c, sep='.') for c in (saved, config_snapshot(config)))
  return [f'config.{key} is {before.get(key)!r} in the checkpoint and {now.get(key)!r} now'
          for key in sorted(set(before) | set(now))
          if key.startswith(fields) and before.get(key) != now.get(key)]


def _key_name(entry: Any) -> Any:
  for attribute in ('key', 'name', 'idx'):
    if hasattr(entry, attribute):
      return getattr(entry, attribute)
  return str(entry)


def _flatten(tree: PyTree) -> dict[tuple, Any]:
  """{path: leaf} in flattening order, paths as tuples of dict keys / field names / indices whatever
  the containers (a dataclass or named-tuple field and the dict key orbax stores it under agree)."""
  return {tuple(_key_name(k) for k in path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _stored_shape(leaf: Any) -> tuple[int, ...]:
  """The shape orbax stores for `leaf` (a typed PRNG key: that of its uint32 key data)."""
  if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    leaf = jax.eval_shape(jax.random.key_data, leaf)
  return tuple(leaf.shape)


def _fusion_start(params: PyTree) -> int | None:
  """Layers before fusion in the scanned layout of `params`, or None for the unrolled layout."""
  stacks = {path[i]: leaf for path, leaf in _flatten(params).items()
            for i in range(len(path)) if str(path[i]).startswith('encoderblocks_')}
  if not stacks:
    return None
  unimodal = [leaf for name, leaf in stacks.items()
              if name not in ('encoderblocks_fused', 'encoderblocks_shared')]
  return unimodal[0].shape[0] if unimodal else 0


def _ends_with(path: tuple, param_paths: set[tuple]) -> bool:
  """Whether `path` (e.g. of an optimizer moment) ends with one of `param_paths`."""
  return any(path[i:] in param_paths for i in range(1, len(path)))


def _read_as(template_leaf: Any, saved_leaf: jax.ShapeDtypeStruct,
             replicated: jax.sharding.Sharding) -> Any:
  """How to read one saved array: like the template's leaf where it fits, else replicated."""
  if template_leaf is not None and _stored_shape(template_leaf) == tuple(saved_leaf.shape):
    if getattr(template_leaf, 'sharding', None) is not None:
      return template_leaf
    return jax.ShapeDtypeStruct(template_leaf.shape, template_leaf.dtype, sharding=replicated)
  return jax.ShapeDtypeStruct(saved_leaf.shape, saved_leaf.dtype, sharding=replicated)


def restore_adapted(ckpt: checkpointing.Checkpointer, state_template: PyTree, *,
                    init: Callable[[], PyTree], config: Any = None, step: int | None = None,
                    fresh_ok: tuple[str, ...] = ()) -> tuple[PyTree, dict[str, Any], list[str]]:
  """Restores a step into `state_template`, adapting a checkpoint written with another config.

  When the saved arrays have the template's structure and shapes this is `Checkpointer.restore`.
  Otherwise, comparing both sides in the unrolled layer layout:

  - scanned (`model.scan_layers=True`) <-> unrolled encoder layers are converted
    (`avt_jax.models.scan`), for the parameters and the optimizer moments alike;
  - position embeddings (`posembed_input`, [1, *grid, width]) on another token grid (other
    `input.num_frames`, `image_size`, `audio_frames`, `n_mels`) are resized by linear
    interpolation, as `PositionEmbedding` does for inputs on another grid;
  - parameters only in the checkpoint (a head or decoder whose objective now has weight 0) are
    dropped; parameters only in the template (a branch newly switched on) come from `init()`, and
    so do the optimizer moments of new and resized parameters;
  - anything else that differs stops with `IncompatibleCheckpointError`, one line naming the config
    fields that differ and both values (from `meta['config']`, which `train.py` writes), or the
    first differing array for checkpoints without it.

  Matching arrays are read straight into the template's sharding; arrays that need adapting are
  read replicated, adapted, then placed with the template's sharding.

  Args:
    ckpt: the workdir's checkpointer.
    state_template: abstract train state of this config (`jax.ShapeDtypeStruct`s with shardings).
    init: returns a freshly initialised state of this config (called only when needed).
    config: this run's config, to name the fields that differ from `meta['config']`.
    step: the step to read; None for the latest.
    fresh_ok: top-level fields of the state (e.g. 'opt_state' when only evaluating) taken from
      `init()` where they differ, instead of stopping.

  Returns:
    (state, meta, notes); `notes` says what was adapted (empty when nothing was).

  Raises:
    FileNotFoundError: no checkpoint (at `step`).
    IncompatibleCheckpointError: the checkpoint cannot be adapted to this config.
  """
  from avt_jax.models import scan  # pylint: disable=g-import-not-at-top

  step = ckpt.resolve_step(step)
  saved_tree = ckpt.saved_structure(step)
  saved, target = _flatten(saved_tree), _flatten(state_template)
  if saved.keys() == target.keys() and all(
      tuple(saved[path].shape) == _stored_shape(target[path]) for path in target):
    state, meta = ckpt.restore(state_template, step)
    return state, meta, []

  meta = ckpt.restore_meta(step)
  replicated = jax.sharding.NamedSharding(
      jax.sharding.Mesh(jax.devices(), ('all',)), jax.sharding.PartitionSpec())
  read_template = jax.tree_util.tree_map_with_path(
      lambda path, leaf: _read_as(target.get(tuple(_key_name(k) for k in path)), leaf, replicated),
      saved_tree)
  restored, _ = ckpt.restore(read_template, step)

  saved_fusion_start = _fusion_start(restored.get('params', {}))
  target_fusion_start = _fusion_start(getattr(state_template, 'params', {}))
  notes = []
  if (saved_fusion_start is None) != (target_fusion_start is None):
    notes.append('converted the encoder layers from the '
                 f'{"unrolled" if saved_fusion_start is None else "scanned"} layout')
  have = _flatten(scan.scanned_to_unrolled(restored))
  want_tree = jax.eval_shape(scan.scanned_to_unrolled, jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state_template))
  want = _flatten(want_tree)
  changes = _ParamChanges.between(have, want)
  leaves, renewed, unfit = _adapted_leaves(
      have, want, changes, fresh_ok, lambda: _flatten(scan.scanned_to_unrolled(init())))
  if unfit:
    raise _incompatible(ckpt.directory, step, unfit, have, want, meta.get('config'), config)
  notes += changes.notes(have, want, renewed)

  state = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(want_tree), leaves)
  if target_fusion_start is not None:
    state = scan.unrolled_to_scanned(state, target_fusion_start)
  state = jax.tree.map(
      lambda x, t: jax.device_put(x, t.sharding) if getattr(t, 'sharding', None) is not None else x,
      state, state_template)
  return state, meta, notes


@dataclasses.dataclass(frozen=True)
class _ParamChanges:
  """Parameter paths (without the leading 'params') that differ between a checkpoint and a config:
  only in the config (`added`), only in the checkpoint (`dropped`), position embeddings on another
  token grid (`resized`)."""
  added: frozenset
  dropped: frozenset
  resized: frozenset

  @classmethod
  def between(cls, have: dict, want: dict) -> '_ParamChanges':
    params = lambda paths: {path[1:] for path in paths if path[0] == 'params'}

    def resizable(path):
      old, new = have[('params',) + path], want[('params',) + path]
      return (path[-1] == 'posembed_input' and _stored_shape(old) != _stored_shape(new)
              and len(old.shape) == len(new.shape) and old.shape[0] == 1
              and old.shape[-1] == new.shape[-1])

    return cls(frozenset(params(want) - params(have)), frozenset(params(have) - params(want)),
               frozenset(p for p in params(want) & params(have) if resizable(p)))

  @property
  def explained(self) -> frozenset:
    return self.added | self.dropped | self.resized

  def notes(self, have: dict, want: dict, renewed: set) -> list[str]:
    """One line per kind of adaptation, for the restore report."""
    notes = [f'resized {"/".join(path)} from a {have[("params",) + path].shape[1:-1]} to a '
             f'{want[("params",) + path].shape[1:-1]} token grid' for path in sorted(self.resized)]
    for verb, paths, where in (('dropped', self.dropped, 'config'),
                               ('initialised', self.added, 'checkpoint')):
      if paths:
        notes.append(f'{verb} the parameters not in the {where}: '
                     f'{", ".join(sorted({str(path[0]) for path in paths}))}')
    if renewed:
      notes.append(f'initialised {", ".join(sorted(renewed))} afresh')
    return notes


def _adapted_leaves(have: dict, want: dict, changes: _ParamChanges, fresh_ok: tuple[str, ...],
                    fresh_state: Callable[[], dict]) -> tuple[list, set, list]:
  """The leaves of the wanted (unrolled, flattened) state, each kept, cast, resized or fresh.

  Returns:
    (leaves in `want`'s order, top-level fields renewed only because of `fresh_ok`, the paths that
    could not be adapted).
  """
  from avt_jax.models.tokenizers import resize_posemb  # pylint: disable=g-import-not-at-top
  fresh = functools.cache(fresh_state)  # called only when some leaf needs it
  explained = changes.explained
  leaves, renewed, unfit = [], set(), []
  for path, new in want.items():
    if path in have and _stored_shape(have[path]) == _stored_shape(new):
      old = have[path]
      keep_dtype = jax.dtypes.issubdtype(new.dtype, jax.dtypes.prng_key) or old.dtype == new.dtype
      leaves.append(old if keep_dtype else old.astype(new.dtype))
    elif path[0] == 'params' and path[1:] in changes.resized:
      leaves.append(resize_posemb(have[path], new.shape[1:-1]).astype(new.dtype))
    elif path[0] == 'params' and path[1:] in changes.added:
      leaves.append(fresh()[path])
    elif path[0] != 'params' and (_ends_with(path, explained) or path[0] in fresh_ok):
      leaves.append(fresh()[path])
      if not _ends_with(path, explained):
        renewed.add(path[0])
    else:
      unfit.append(path)
  unfit += [path for path in have if path not in want and path[0] != 'params'
            and not _ends_with(path, explained) and path[0] not in fresh_ok]
  return leaves, renewed, unfit


def _incompatible(directory: str, step: int, unfit: list, have: dict, want: dict,
                  saved_config: Any, config: Any) -> 'IncompatibleCheckpointError':
  """The error for arrays that cannot be adapted: the config fields that differ, one example."""
  example = unfit[0]
  shape = lambda tree: (f'{_stored_shape(tree[example])}' if example in tree else 'absent')
  first = f'{"/".join(map(str, example))}: {shape(have)} in the checkpoint, {shape(want)} now'
  fields = _PARAM_FIELDS if any(path[0] == 'params' for path in unfit) else _OPTIMIZER_FIELDS
  changes = _config_changes(saved_config, config, fields)
  return IncompatibleCheckpointError(
      f'Cannot restore {directory} step {step} into this config: '
      + ('; '.join(changes) if changes else 'the saved state differs') +
      f' ({len(unfit)} arrays differ, e.g. {first}). Use the checkpoint\'s values or a new '
      'workdir.')
