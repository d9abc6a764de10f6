"""Initialising AVT from pretrained checkpoints, driven by `config.init`.

    prepared = prepare(config, abstract_state.params)   # read, convert, map: errors before compiling
    state = jax.jit(init, out_shardings=shardings)(rng)  # the usual random init
    state = apply(prepared, state, shardings, tx)        # loaded values placed shard by shard

`prepare` works on host numpy arrays and the model's abstract shapes only; `apply` puts each mapped
leaf onto its target `NamedSharding` with `jax.make_array_from_callback`, so a device receives only
its own shard (no device ever holds a full copy of a sharded parameter) and every process of a
multi-host job reads the same file and supplies its addressable shards. Stacked (`scan_layers=True`)
parameters are assembled from the unrolled names layer by layer; layers without a checkpoint value
keep their init.
"""

import dataclasses
import json
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import traverse_util

from avt_jax.models import scan
from avt_jax.pretrained import files, layouts, mapping
from avt_jax.pretrained.files import PretrainedError

MODALITIES = ('video', 'audio')
REPORT_FILE = 'init_report.json'


def requested(config: ml_collections.ConfigDict) -> bool:
  init = config.get('init')
  return bool(init) and bool(init.checkpoint or any(init[m].checkpoint for m in MODALITIES))


def _check(condition: bool, field: str, message: str) -> None:
  if not condition:
    raise PretrainedError(f'config.init.{field}: {message}')


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises PretrainedError naming the `config.init` field with an impossible value."""
  init = config.init
  for field, fmt in [('format', init.format)] + [(f'{m}.format', init[m].format) for m in MODALITIES]:
    _check(fmt in ('auto',) + layouts.FORMATS, field,
           f'expected auto or one of {layouts.FORMATS}, got {fmt!r}')
  for field, grid in [('posemb_grid', init.get('posemb_grid', ()))] + [
      (f'{m}.posemb_grid', init[m].get('posemb_grid', ())) for m in MODALITIES]:
    _check(isinstance(grid, (tuple, list)) and len(grid) in (0, 2) and
           all(isinstance(g, int) and g > 0 for g in grid), field,
           f'expected () or two positive patch counts (rows, columns), got {grid!r}')
  _check(set(init.modalities) <= set(MODALITIES), 'modalities',
         f'expected a subset of {MODALITIES}, got {tuple(init.modalities)}')
  _check(init.video_kernel in mapping.VIDEO_KERNELS, 'video_kernel',
         f'expected one of {tuple(mapping.VIDEO_KERNELS)}, got {init.video_kernel!r}')
  _check(init.pixel_normalization in mapping.PIXEL_NORMALIZATIONS, 'pixel_normalization',
         f'expected one of {tuple(mapping.PIXEL_NORMALIZATIONS)}, got {init.pixel_normalization!r}')
  _check(not isinstance(init.exclude, str), 'exclude',
         f'expected a tuple of regular expressions, got the string {init.exclude!r}')
  for pattern in init.exclude:
    try:
      re.compile(pattern)
    except re.error as e:
      raise PretrainedError(f'config.init.exclude: {pattern!r} is not a regular expression ({e}).') from e


def plan(config: ml_collections.ConfigDict) -> list[dict[str, Any]]:
  """Which checkpoint initialises what: [{path, format, grid, modalities, shared}], one per
  checkpoint (`grid`: its `posemb_grid`, () when unset).

  A modality's encoder reads `init.<modality>.checkpoint` if set, else `init.checkpoint` when the
  modality is in `init.modalities`. Shared parameters (bottleneck, heads, decoders of several
  modalities) come from `init.checkpoint` only.
  """
  validate(config)
  init, sources = config.init, {}
  for m in config.model.modalities:
    own = init[m].checkpoint
    field = init[m] if own else init
    path, fmt, grid = own or init.checkpoint, field.format, tuple(field.get('posemb_grid', ()))
    if path and (own or m in init.modalities):
      sources.setdefault((path, fmt, grid), []).append(m)
  if init.checkpoint:
    sources.setdefault((init.checkpoint, init.format, tuple(init.get('posemb_grid', ()))), [])
  return [{'path': path, 'format': fmt, 'grid': grid, 'modalities': mods,
           'shared': path == init.checkpoint} for (path, fmt, grid), mods in sources.items()]


def read_source(path: str, fmt: str) -> layouts.Source:
  """Reads and converts one checkpoint (`fmt='auto'` detects the format), with the config.json
  beside it if there is one."""
  container, flat = files.read(path)
  if fmt == 'auto':
    fmt = layouts.detect(container, flat)
  return layouts.convert(fmt, flat, str(path), files.side_config(path))


def _model_grids(shapes: dict[str, tuple[int, ...]], modalities: list[str]) -> list[tuple[int, ...]]:
  """The 2D patch grids of the encoders a checkpoint initialises: video (rows, cols), audio (time,
  mel)."""
  grids = []
  for m in modalities:
    shape = shapes.get(f'posembed_{m}/posembed_input')
    if shape is not None:
      grids.append(tuple(shape[-3:-1]))
  return grids


# ----------------------------------------------------------------------------------------------
# The model's parameter layout


def _flatten(tree: Any) -> dict[str, Any]:
  return traverse_util.flatten_dict(tree, sep='/')


def _unflatten(flat: dict[str, Any]) -> dict:
  return traverse_util.unflatten_dict(flat, sep='/')


def _stacked(name: str) -> bool:
  return any(part.startswith('encoderblocks_') for part in name.split('/'))


def target_layout(abstract_params: Any) -> tuple[dict[str, tuple[int, ...]],
                                                 dict[str, tuple[str, int | None]]]:
  """The model's parameters under their unrolled names.

  Returns:
    (shapes: unrolled name -> shape; where: unrolled name -> (leaf name in the model's own layout,
    layer index in a stacked leaf or None)).
  """
  leaves = _flatten(abstract_params)
  names, stride = list(leaves), 1 << 20
  ids = {name: (np.arange(leaf.shape[0]) if _stacked(name) else np.zeros((), np.int64)) + i * stride
         for i, (name, leaf) in enumerate(leaves.items())}
  unrolled = _flatten(scan.scanned_to_unrolled(_unflatten(ids)))
  shapes, where = {}, {}
  for uname, ident in unrolled.items():
    index, layer = divmod(int(ident), stride)
    name = names[index]
    stacked = _stacked(name)
    where[uname] = (name, layer if stacked else None)
    shapes[uname] = tuple(leaves[name].shape[1:] if stacked else leaves[name].shape)
  return shapes, where


# ----------------------------------------------------------------------------------------------
# Prepare (host) and apply (devices)


@dataclasses.dataclass
class Prepared:
  """Mapped checkpoint values in the model's own layout, and the report.

  Attributes:
    values: leaf name (model layout, '/'-joined) -> float32 array of the leaf's shape.
    layer_masks: stacked leaf name -> [layers] bool, where only some layers have values.
    report: see `prepare`.
  """
  values: dict[str, np.ndarray]
  layer_masks: dict[str, np.ndarray]
  report: dict


def map_params(config: ml_collections.ConfigDict, shapes: dict[str, tuple[int, ...]]
               ) -> tuple[dict[str, np.ndarray], dict]:
  """Reads the configured checkpoints and maps them onto parameters of `shapes` (unrolled names).

  Returns:
    (values by unrolled name, report).
  """
  report = mapping.empty_report()
  report['sources'] = {}
  entries: dict[str, mapping.Entry] = {}
  for item in plan(config):
    source = read_source(item['path'], item['format'])
    where = f'{item["path"]} ({source.format})'
    mapping.check_heads(source, shapes, where)
    if source.kind == 'vit':
      source.posemb_note = layouts.resolve_posemb(
          source, _model_grids(shapes, item['modalities']), where, item['grid'] or None)
    for role in item['modalities'] + (['shared'] if item['shared'] else []):
      report['sources'][role] = {'checkpoint': str(item['path']), 'format': source.format}
    new = {}
    if source.kind == 'vit':
      for m in item['modalities']:
        new.update({k: v for k, v in mapping.vit_to_modality(
            source, m, shapes, config.init.video_kernel, where).items() if k not in new})
    else:
      new, skipped = mapping.avt_entries(source, item['modalities'], item['shared'])
      report['unused'] += skipped
    if source.format != 'avt':  # our own checkpoints already take AVT's [0, 1] pixels
      mapping.fold_pixel_normalization(new, config.init.pixel_normalization)
    entries.update({k: v for k, v in new.items() if k not in entries})  # shared blocks: first wins
    report['unused'] += source.unused
  values = mapping.match(entries, shapes, tuple(config.init.exclude), report)
  report['counts'] = {c: len(report[c]) for c in mapping.CATEGORIES}
  report['parameters'] = {'from_checkpoint': int(sum(v.size for v in values.values())),
                          'total': int(sum(np.prod(s, dtype=np.int64) for s in shapes.values()))}
  return values, report


def prepare(config: ml_collections.ConfigDict, abstract_params: Any) -> Prepared | None:
  """Reads `config.init`'s checkpoints and maps them onto the model (host memory only).

  Args:
    config: the run's config (`init`, `model`).
    abstract_params: the model's parameters or their `jax.ShapeDtypeStruct`s, any layer layout.

  Returns:
    None without `config.init` checkpoints, else the values and the report: {'sources': role ->
    {checkpoint, format}, 'loaded': name -> source entry, 'inflated' / 'transformed' / 'resized':
    name -> {source, from, to, how}, 'excluded', 'init' (left at initialisation): [names],
    'unused': [checkpoint entries], 'counts', 'parameters'}.

  Raises:
    PretrainedError: unreadable or pickle files, missing entries, shapes that cannot be mapped (all
      of them, each with its name and both shapes), bad `config.init` fields.
  """
  if not requested(config):
    return None
  shapes, where = target_layout(abstract_params)
  values, report = map_params(config, shapes)
  leaf_values, masks, layers = {}, {}, {}
  flat = _flatten(abstract_params)
  for uname, value in values.items():
    name, layer = where[uname]
    if layer is None:
      leaf_values[name] = value
    else:
      layers.setdefault(name, {})[layer] = value
  for name, by_layer in layers.items():
    stacked = np.zeros(flat[name].shape, np.float32)
    mask = np.zeros(flat[name].shape[0], bool)
    for layer, value in by_layer.items():
      stacked[layer], mask[layer] = value, True
    leaf_values[name] = stacked
    if not mask.all():
      masks[name] = mask
  return Prepared(leaf_values, masks, report)


def _path_name(path: tuple) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)


def _place(value: np.ndarray, like: jax.Array, sharding: jax.sharding.Sharding) -> jax.Array:
  """A global array of `value` on `sharding`; each device gets (and the callback reads) its shard."""
  value = value.astype(like.dtype)
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def apply(prepared: Prepared | None, state: Any, state_shardings: Any, tx: Any) -> Any:
  """Puts the prepared values into `state.params` on their shardings; fresh optimizer state.

  Each loaded leaf is assembled shard by shard on its target sharding; one jitted step then merges
  partly loaded stacked leaves with their init (per layer) and re-initialises the optimizer state.

  Args:
    prepared: `prepare`'s result (None: `state` is returned unchanged).
    state: an initialised TrainState (`params`, `opt_state`, ...).
    state_shardings: the state's NamedShardings (same structure).
    tx: the optimizer, whose state is re-initialised for the new parameters.
  """
  if prepared is None:
    return state
  shardings = dict(jax.tree_util.tree_flatten_with_path(state_shardings.params)[0])
  placed = {}
  for path, initial in jax.tree_util.tree_flatten_with_path(state.params)[0]:
    name = _path_name(path)
    if name in prepared.values:
      placed[name] = _place(prepared.values[name], initial, shardings[path])

  def merge(state, placed):
    def leaf(path, initial):
      name = _path_name(path)
      if name not in placed:
        return initial
      if name in prepared.layer_masks:
        mask = prepared.layer_masks[name].reshape((-1,) + (1,) * (initial.ndim - 1))
        return jnp.where(mask, placed[name], initial)
      return placed[name]
    params = jax.tree_util.tree_map_with_path(leaf, state.params)
    return state.replace(params=params, opt_state=tx.init(params))

  return jax.jit(merge, out_shardings=state_shardings)(state, placed)


def load_into(config: ml_collections.ConfigDict, params: Any) -> Any:
  """`params` (a host pytree, e.g. a fresh init) with `config.init`'s checkpoint values put in:
  the unsharded counterpart of `prepare` + `apply`, for probes and notebooks.

  Raises:
    PretrainedError: as `prepare`.
  """
  prepared = prepare(config, params)
  if prepared is None:
    return params

  def leaf(path, initial):
    name = _path_name(path)
    if name not in prepared.values:
      return initial
    value = prepared.values[name].astype(np.asarray(initial).dtype)
    if name in prepared.layer_masks:
      mask = prepared.layer_masks[name].reshape((-1,) + (1,) * (value.ndim - 1))
      return np.where(mask, value, initial)
    return value

  return jax.tree_util.tree_map_with_path(leaf, params)


# ----------------------------------------------------------------------------------------------
# Report


def _grouped(names: list[str]) -> str:
  groups: dict[str, int] = {}
  for name in names:
    parts = name.split('/')
    key = '/'.join(parts[:2] if parts[0] == 'encoder' else parts[:1])
    groups[key] = groups.get(key, 0) + 1
  return ', '.join(f'{k} ({n})' if n > 1 else k for k, n in groups.items()) or '-'


def format_report(report: dict) -> str:
  """A readable summary of `prepare`'s report (every list complete except `loaded`)."""
  lines = ['Initialised from pretrained checkpoints:']
  lines += [f'  {role} <- {s["checkpoint"]} ({s["format"]})' for role, s in report['sources'].items()]
  counts = report['counts']
  p = report['parameters']
  labels = {'init': 'left at init'}
  lines.append('  ' + ', '.join(f'{labels.get(c, c)} {counts[c]}' for c in mapping.CATEGORIES) +
               f' | {p["from_checkpoint"]:,} of {p["total"]:,} parameter values from checkpoints')
  for category in ('inflated', 'transformed', 'resized'):
    for name, d in report[category].items():
      lines.append(f'  {category}: {name} {tuple(d["from"])} -> {tuple(d["to"])}: {d["how"]}')
  lines.append(f'  excluded: {_grouped(report["excluded"])}')
  lines.append(f'  left at init: {_grouped(report["init"])}')
  lines.append(f'  unused checkpoint entries: {", ".join(report["unused"]) or "-"}')
  return '\n'.join(lines)


def save_report(report: dict, workdir: str) -> None:
  """Writes `<workdir>/init_report.json` (process 0), so resumed runs still list it in results."""
  if jax.process_index() == 0:
    (epath.Path(workdir) / REPORT_FILE).write_text(json.dumps(report, indent=2))


def saved_report(workdir: str) -> dict:
  """{'init': report} if this workdir was initialised from checkpoints, else {}."""
  path = epath.Path(workdir) / REPORT_FILE
  return {'init': json.loads(path.read_text())} if path.exists() else {}
