"""Device mesh and parameter placement by logical axis rules.

The mesh has axes ('data', 'fsdp', 'model'). The batch is split over ('data', 'fsdp'); parameters get
logical axis names from their path and shape (e.g. an MLP input kernel is ('embed', 'mlp')), and
`LOGICAL_RULES` maps logical names to mesh axes: 'embed' -> 'fsdp' (ZeRO-3 style parameter sharding),
'mlp' / 'heads' -> 'model' (Megatron-style tensor parallelism). A dimension that the mesh axis does not
divide stays replicated, so every model runs on every mesh.
"""

from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'model')
BATCH_AXES = ('data', 'fsdp')
LOGICAL_RULES = (('embed', 'fsdp'), ('mlp', 'model'), ('heads', 'model'))


def make_mesh(mesh_config: ml_collections.ConfigDict,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the ('data', 'fsdp', 'model') mesh; one axis may be -1 (all remaining devices)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = [int(mesh_config[a]) for a in MESH_AXES]
  if shape.count(-1) > 1:
    raise ValueError(f'config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, shape))}.')
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(f'config.mesh: {len(devices)} devices are not divisible by the fixed axes '
                       f'{dict(zip(MESH_AXES, shape))}.')
    shape[shape.index(-1)] = len(devices) // known
  if int(np.prod(shape)) != len(devices):
    raise ValueError(f'config.mesh: shape {dict(zip(MESH_AXES, shape))} needs {int(np.prod(shape))} '
                     f'devices, but {len(devices)} are available.')
  grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_axes(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[str | None, ...]:
  """Logical axis names of a parameter (or optimizer moment) from its path and shape."""
  names = [str(getattr(k, 'key', getattr(k, 'name', k))) for k in path]
  leaf = names[-1] if names else ''
  parent = names[-2] if len(names) > 1 else ''
  if leaf == 'kernel' and parent in ('query', 'key', 'value') and len(shape) == 3:
    return ('embed', 'heads', None)
  if leaf == 'kernel' and parent == 'out' and len(shape) == 3:
    return ('heads', None, 'embed')
  if parent in ('query', 'key', 'value') and leaf == 'bias' and len(shape) == 2:
    return ('heads', None)
  if 'MlpBlock_3' in names and parent == 'Dense_0':
    return ('embed', 'mlp') if leaf == 'kernel' else ('mlp',)
  if 'MlpBlock_3' in names and parent == 'Dense_1' and leaf == 'kernel':
    return ('mlp', 'embed')
  return (None,) * len(shape)


def _spec(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh) -> P:
  rules = dict(LOGICAL_RULES)
  spec = []
  for name, size in zip(axes, shape):
    axis = rules.get(name)
    spec.append(axis if axis and size % mesh.shape[axis] == 0 and mesh.shape[axis] > 1 else None)
  return P(*spec)


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
  """NamedShardings for every array in `tree` (params, optimizer state, train state) by the rules."""
  def one(path, leaf):
    shape = tuple(getattr(leaf, 'shape', ()))
    return NamedSharding(mesh, _spec(logical_axes(path, shape), shape, mesh))
  return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the data-parallel axes."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each host's part of the batch into global arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}
