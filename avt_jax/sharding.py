"""Device mesh and parameter placement by logical axis rules.

The mesh has axes ('data', 'fsdp', 'model'). The batch is split over ('data', 'fsdp'). The modules
name the axes of their parameters where they create them (`nn.with_logical_partitioning`, e.g. an
MLP input kernel is ('embed', 'mlp'); scanned stacks add 'layers'), and `LOGICAL_RULES` maps logical
names to mesh axes: 'embed' -> 'fsdp' (ZeRO-3 style parameter sharding), 'mlp' / 'heads' -> 'model'
(Megatron-style tensor parallelism); other names and unannotated parameters stay replicated. A
dimension that the mesh axis does not divide stays replicated, so every model runs on every mesh.
"""

from typing import Any, Mapping, Sequence

import flax.linen as nn
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


Axes = Mapping[tuple[str, ...], tuple[str | None, ...]]  # parameter path -> logical axis names


def _keys(path) -> tuple[str, ...]:
  """The dict keys of a pytree path (attribute and sequence steps, e.g. `.params`, are left out)."""
  return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def logical_axes(boxed_params: Any) -> Axes:
  """Logical axis names of every annotated parameter.

  Args:
    boxed_params: parameters as `init` returns them, before unboxing (abstract is enough, e.g.
      `jax.eval_shape(model.init, ...)['params']`).

  Returns:
    parameter path (dict keys) -> its axes' logical names.
  """
  specs = nn.get_partition_spec(boxed_params)
  leaves = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, P))[0]
  return {_keys(path): tuple(spec) for path, spec in leaves if len(spec)}


def _spec(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh) -> P:
  rules = dict(LOGICAL_RULES)
  spec = []
  for name, size in zip(axes, shape):
    axis = rules.get(name)
    spec.append(axis if axis and size % mesh.shape[axis] == 0 and mesh.shape[axis] > 1 else None)
  return P(*spec)


def tree_shardings(tree: Any, mesh: Mesh, axes: Axes) -> Any:
  """NamedShardings for every array in `tree` (params, optimizer state, train state) by the rules.

  An array whose path ends with the path of a parameter in `axes` and has its rank is placed like
  that parameter (so optimizer moments, which mirror the parameter tree, follow their parameters);
  everything else is replicated.
  """
  def one(path, leaf):
    shape, keys = tuple(getattr(leaf, 'shape', ())), _keys(path)
    names = next((axes[keys[i:]] for i in range(len(keys)) if keys[i:] in axes), ())
    if len(names) != len(shape):
      names = (None,) * len(shape)
    return NamedSharding(mesh, _spec(names, shape, mesh))
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
