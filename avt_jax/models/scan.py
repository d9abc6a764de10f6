"""Converts encoder parameters between the unrolled and the scanned (`scan_layers=True`) layout.

Unrolled (`FusionEncoder` default, ViT/MBT naming), inside the `encoder` dict:
  `encoderblock_{i}_{modality}`: layer i of a modality's stack (bottleneck and late fusion, and the
    unimodal layers of concat fusion);
  `encoderblock_{i}`: layer i shared by all modalities (the fused layers of concat fusion).
Scanned (leading axis = layer, in order):
  `encoderblocks_{modality}`: layers [0, fusion_start) of that modality;
  `encoderblocks_fused`: {modality: layers [fusion_start, num_layers)} (bottleneck fusion);
  `encoderblocks_shared`: layers [fusion_start, num_layers) (concat fusion).
Everything else (`encoder_norm_{modality}`, `bottleneck`, tokenizers, heads) is the same in both.

Both functions walk any pytree (parameters, optimizer states such as optax's Adam moments, a whole
`TrainState`) and convert every dict holding encoder blocks, so a checkpoint written with one layout
can be used with the other:

    scanned = unrolled_to_scanned(params, fusion_start=8)
    params = scanned_to_unrolled(scanned)
"""

import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

_UNROLLED = re.compile(r'^encoderblock_(\d+)(?:_(.+))?$')
_SCANNED_PREFIX = 'encoderblocks_'


def _stack(trees: list[Any]) -> Any:
  return jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *trees)


def _unstack(tree: Any) -> list[Any]:
  n = jax.tree_util.tree_leaves(tree)[0].shape[0]
  return [jax.tree_util.tree_map(lambda leaf: leaf[i], tree) for i in range(n)]


def _walk(tree: Any, convert_dict: Callable[[dict], dict]) -> Any:
  """Applies `convert_dict` to every dict of `tree` that holds encoder blocks (any pytree: dicts,
  tuples, named tuples, flax struct dataclasses such as a TrainState)."""
  def holds_blocks(node: Any) -> bool:
    return isinstance(node, Mapping) and any(
        _UNROLLED.match(str(k)) or str(k).startswith(_SCANNED_PREFIX) for k in node)

  return jax.tree_util.tree_map(lambda node: convert_dict(dict(node)) if holds_blocks(node) else node,
                                tree, is_leaf=holds_blocks)


def unrolled_to_scanned(tree: Any, fusion_start: int) -> Any:
  """Stacks `encoderblock_*` parameters into the scanned layout.

  Args:
    tree: parameters (or any pytree containing them) in the unrolled layout.
    fusion_start: first layer whose modalities exchange information (`FusionEncoder.fusion_start`:
      `fusion_layer`, or `num_layers` for late fusion and single-modality models).

  Returns:
    The same tree with each encoder's blocks in the scanned layout.

  Raises:
    ValueError: a layer is missing, or `fusion_start` is outside [0, num_layers].
  """
  def convert(d: dict) -> dict:
    blocks = {k: _UNROLLED.match(k) for k in d}
    blocks = {k: (int(m.group(1)), m.group(2)) for k, m in blocks.items() if m}
    if not blocks:
      return d
    num_layers = max(i for i, _ in blocks.values()) + 1
    if not 0 <= fusion_start <= num_layers:
      raise ValueError(f'unrolled_to_scanned: fusion_start must be in [0, {num_layers}] for '
                       f'{num_layers} layers, got {fusion_start}.')
    modalities = sorted({m for _, m in blocks.values() if m is not None})

    def take(names):
      missing = [n for n in names if n not in d]
      if missing:
        raise ValueError(f'unrolled_to_scanned: encoder parameters {missing} are missing (found '
                         f'{sorted(blocks)}).')
      return _stack([d[n] for n in names])

    out = {k: v for k, v in d.items() if k not in blocks}
    if fusion_start > 0:
      for m in modalities:
        out[f'{_SCANNED_PREFIX}{m}'] = take([f'encoderblock_{i}_{m}' for i in range(fusion_start)])
    fused = range(fusion_start, num_layers)
    if fused and f'encoderblock_{fusion_start}' in d:
      out[f'{_SCANNED_PREFIX}shared'] = take([f'encoderblock_{i}' for i in fused])
    elif fused:
      out[f'{_SCANNED_PREFIX}fused'] = {
          m: take([f'encoderblock_{i}_{m}' for i in fused]) for m in modalities}
    return out

  return _walk(tree, convert)


def scanned_to_unrolled(tree: Any) -> Any:
  """Splits scanned `encoderblocks_*` parameters back into `encoderblock_{i}[_{modality}]`."""
  def convert(d: dict) -> dict:
    stacks = {k: v for k, v in d.items() if k.startswith(_SCANNED_PREFIX)}
    if not stacks:
      return d
    out = {k: v for k, v in d.items() if k not in stacks}
    unimodal = {k[len(_SCANNED_PREFIX):]: v for k, v in stacks.items()
                if k not in (f'{_SCANNED_PREFIX}fused', f'{_SCANNED_PREFIX}shared')}
    sizes = {len(_unstack(v)) for v in unimodal.values()}
    if len(sizes) > 1:
      raise ValueError(f'scanned_to_unrolled: the modalities have different numbers of unimodal '
                       f'layers: { {m: len(_unstack(v)) for m, v in unimodal.items()} }.')
    fusion_start = sizes.pop() if sizes else 0
    for m, stack in unimodal.items():
      for i, block in enumerate(_unstack(stack)):
        out[f'encoderblock_{i}_{m}'] = block
    if f'{_SCANNED_PREFIX}shared' in stacks:
      for i, block in enumerate(_unstack(stacks[f'{_SCANNED_PREFIX}shared'])):
        out[f'encoderblock_{fusion_start + i}'] = block
    for m, stack in stacks.get(f'{_SCANNED_PREFIX}fused', {}).items():
      for i, block in enumerate(_unstack(stack)):
        out[f'encoderblock_{fusion_start + i}_{m}'] = block
    return out

  return _walk(tree, convert)
