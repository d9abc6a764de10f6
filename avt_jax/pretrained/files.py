"""Reads checkpoint files into flat {'a/b/c': numpy array} dicts, without pickle.

Containers (chosen by file type, then by content):
  `.npz`: numpy zip archives (the original ViT release, big_vision), read with `allow_pickle=False`;
    bfloat16 arrays that big_vision stores as raw 2-byte records are viewed as bfloat16.
  `.safetensors`: the format timm and Hugging Face `transformers` write (8-byte header length, JSON
    header, raw little-endian data); parsed with `safetensors.deserialize`, BF16/F16 included.
  flax msgpack (`flax.training.checkpoints`, e.g. Scenic's `checkpoint_<step>` files): read with
    `flax.serialization.msgpack_restore`, which only decodes arrays and plain containers.
  a directory: this project's workdir (orbax `checkpoints/<step>/state`, the `params` subtree is read
    as numpy) or a Scenic checkpoint folder (the newest `checkpoint_<step>` file in it).
PyTorch pickles (`.pth`, `.pt`, `.bin`, ...) are refused with instructions to convert them.
Paths may be local or `gs://` (etils.epath); every process of a multi-host job reads the same file.
"""

import io
import json
import logging
import re
import zipfile

import ml_dtypes
import numpy as np
from etils import epath
from flax import traverse_util

Flat = dict[str, np.ndarray]

PICKLE_SUFFIXES = ('.pth', '.pt', '.bin', '.ckpt', '.pkl', '.pickle')
CONVERT_HINT = (
    'Convert it once to safetensors where PyTorch is installed: python -c "import torch; '
    "from safetensors.torch import save_file; sd = torch.load('IN.pth', map_location='cpu', "
    "weights_only=True); sd = sd.get('state_dict', sd.get('model', sd)); save_file({k: v.contiguous() "
    "for k, v in sd.items()}, 'OUT.safetensors')\" (Hugging Face models: "
    'model.save_pretrained(DIR, safe_serialization=True) writes model.safetensors).')
_SAFETENSORS_DTYPES = {'F64': np.float64, 'F32': np.float32, 'F16': np.float16,
                       'BF16': ml_dtypes.bfloat16, 'I64': np.int64, 'I32': np.int32, 'I16': np.int16,
                       'I8': np.int8, 'U8': np.uint8, 'BOOL': np.bool_}


class PretrainedError(ValueError):
  """A pretrained checkpoint cannot be read or mapped; the message names the file or parameter."""


def _pickle_error(path: epath.Path) -> PretrainedError:
  return PretrainedError(
      f'{path}: PyTorch pickle checkpoints are not read (unpickling can run arbitrary code). '
      + CONVERT_HINT)


def read(path: str | epath.Path) -> tuple[str, Flat]:
  """Reads a checkpoint.

  Args:
    path: a file or directory, local or `gs://`.

  Returns:
    (container, flat arrays): container is 'npz', 'safetensors', 'msgpack' or 'orbax'; keys join the
    tree path with '/' (safetensors keys are kept as they are, e.g. 'blocks.0.attn.qkv.weight').

  Raises:
    PretrainedError: missing path, a pickle, or bytes that none of the containers can decode.
  """
  path = epath.Path(path)
  if not path.exists():
    raise PretrainedError(f'{path}: no such file or directory.')
  if path.is_dir():
    return _read_directory(path)
  if path.suffix.lower() in PICKLE_SUFFIXES:
    raise _pickle_error(path)
  data = path.read_bytes()
  if data[:1] == b'\x80':  # pickle protocol 2+ opcode
    raise _pickle_error(path)
  if data[:2] == b'PK' or path.suffix.lower() == '.npz':
    return 'npz', _read_npz(path, data)
  if path.suffix.lower() == '.safetensors' or _looks_like_safetensors(data):
    return 'safetensors', _read_safetensors(path, data)
  return 'msgpack', _read_msgpack(path, data)


def _read_npz(path: epath.Path, data: bytes) -> Flat:
  try:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
      if any(n.endswith('.pkl') for n in archive.namelist()):  # torch.save's zip format
        raise _pickle_error(path)
  except zipfile.BadZipFile as e:
    raise PretrainedError(f'{path}: not a readable .npz (zip) archive ({e}).') from e
  try:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
      flat = {k: npz[k] for k in npz.files}
  except (ValueError, OSError, zipfile.BadZipFile) as e:
    raise PretrainedError(f'{path}: not a readable .npz archive of arrays ({e}).') from e
  # big_vision writes bfloat16 as raw 2-byte records ('V2'); numpy has no bfloat16 of its own.
  return {k: v.view(ml_dtypes.bfloat16) if v.dtype == np.dtype('V2') else v for k, v in flat.items()}


def _looks_like_safetensors(data: bytes) -> bool:
  if len(data) < 9:
    return False
  return int.from_bytes(data[:8], 'little') < len(data) and data[8:9] == b'{'


def _read_safetensors(path: epath.Path, data: bytes) -> Flat:
  import safetensors  # pylint: disable=g-import-not-at-top
  try:
    tensors = safetensors.deserialize(data)
  except Exception as e:  # the Rust parser raises its own SafetensorError
    raise PretrainedError(f'{path}: not a readable safetensors file ({e}).') from e
  flat = {}
  for name, t in tensors:
    if t['dtype'] not in _SAFETENSORS_DTYPES:
      raise PretrainedError(f'{path}: tensor {name!r} has dtype {t["dtype"]}, expected one of '
                            f'{sorted(_SAFETENSORS_DTYPES)}.')
    dtype = np.dtype(_SAFETENSORS_DTYPES[t['dtype']]).newbyteorder('<')
    flat[name] = np.frombuffer(bytes(t['data']), dtype=dtype).reshape(t['shape'])
  return flat


def _flatten(tree) -> Flat:
  """The numeric leaves of a nested dict, keyed by '/'-joined paths."""
  flat = traverse_util.flatten_dict(tree, sep='/')
  numeric = lambda v: isinstance(v, (np.ndarray, np.generic, int, float)) and type(v) is not bool
  return {name: np.asarray(value) for name, value in flat.items() if numeric(value)}


def _read_msgpack(path: epath.Path, data: bytes) -> Flat:
  from flax import serialization  # pylint: disable=g-import-not-at-top
  try:
    tree = serialization.msgpack_restore(data)
  except Exception as e:  # msgpack raises several unrelated exception types
    raise PretrainedError(
        f'{path}: not a checkpoint this project reads (expected .npz, .safetensors, a flax msgpack '
        f'checkpoint or a checkpoint directory; decoding as msgpack failed: {e}).') from e
  if not isinstance(tree, dict):
    raise PretrainedError(f'{path}: the msgpack content is a {type(tree).__name__}, not a tree of '
                          'arrays.')
  return _flatten(tree)


def _latest_step_dir(directory: epath.Path) -> epath.Path | None:
  steps = [p for p in directory.iterdir() if p.is_dir() and p.name.isdigit() and (p / 'state').exists()]
  return max(steps, key=lambda p: int(p.name)) if steps else None


def _read_directory(path: epath.Path) -> tuple[str, Flat]:
  """This project's workdir / checkpoints dir / step dir, or a Scenic checkpoint folder."""
  for candidate in (path, path / 'checkpoints'):
    if (candidate / 'state').exists():
      return 'orbax', _read_orbax_params(candidate / 'state')
    if candidate.is_dir():
      step = _latest_step_dir(candidate)
      if step is not None:
        return 'orbax', _read_orbax_params(step / 'state')
  flax_files = [p for p in path.iterdir() if re.fullmatch(r'checkpoint_\d+', p.name)]
  if flax_files:
    latest = max(flax_files, key=lambda p: int(p.name.split('_')[1]))
    return 'msgpack', _read_msgpack(latest, latest.read_bytes())
  raise PretrainedError(
      f'{path}: a directory without checkpoints; expected a workdir of this project (holding '
      'checkpoints/<step>/state), one of its checkpoint steps, or a folder of flax checkpoint_<step> '
      'files (Scenic).')


def _read_orbax_params(state_dir: epath.Path) -> Flat:
  """The `params` subtree of an orbax train-state item, as numpy (no device memory used)."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  checkpointer = ocp.PyTreeCheckpointer()
  absl_logger = logging.getLogger('absl')
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)  # orbax warns that a sub-item has no step metadata file
  try:
    tree = checkpointer.metadata(state_dir).item_metadata.tree
    if 'params' not in tree:
      raise PretrainedError(f'{state_dir}: the checkpoint has no `params` (found {sorted(tree)}).')
    item = {'params': jax.tree_util.tree_map(lambda m: np.zeros(m.shape, m.dtype), tree['params'])}
    args = {'params': jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                             tree['params'])}
    restored = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
        item=item, restore_args=args, partial_restore=True))
  finally:
    absl_logger.setLevel(level)
  return _flatten(restored['params'])


def side_config(path: str | epath.Path) -> dict:
  """The `config.json` beside a checkpoint file (Hugging Face and timm hub folders), or {}.

  Raises:
    PretrainedError: the file exists but is not a JSON object.
  """
  path = epath.Path(path)
  side = path.parent / 'config.json'
  if path.is_dir() or not side.exists():
    return {}
  try:
    config = json.loads(side.read_text())
  except ValueError as e:
    raise PretrainedError(f'{side}: not readable JSON ({e}).') from e
  if not isinstance(config, dict):
    raise PretrainedError(f'{side}: expected a JSON object, got {type(config).__name__}.')
  return config


def describe(flat: Flat, limit: int = 8) -> str:
  """A few keys with shapes, for error messages."""
  keys = sorted(flat)
  shown = ', '.join(f'{k} {tuple(flat[k].shape)}' for k in keys[:limit])
  return shown + (f', ... ({len(keys)} entries)' if len(keys) > limit else '')
