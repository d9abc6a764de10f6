"""Maps converted checkpoints (`layouts.Source`) onto AVT's parameters, and the report of what happened.

Names are those of AVT's unrolled layer layout (`model.scan_layers=False`, e.g.
`encoder/encoderblock_3_video/MlpBlock_3/Dense_0/kernel`), whatever layout the model uses; `exclude`
patterns and the report use them too.

A 2D ViT (`kind='vit'`) becomes a modality's encoder (our design, following ViViT and AST):
  video: the patch kernel [h, w, 3, D] is inflated to the tubelet [t, h, w, 3, D] (`central`: the
    kernel on the central frame, zeros elsewhere; `average`: kernel / t on every frame; both give the
    image model's patch embedding on a static video); the patch position embedding is resized
    (bilinear) to the frame grid and repeated over the tubelet time steps.
  audio: the kernel is summed over its input channels ([h, w, 3, D] -> [h, w, 1, D], AST's choice: a
    spectrogram then embeds like the grey image with the spectrogram in all three channels); the
    position embedding is resized to the spectrogram's (time, mel) patch grid.
  both: the CLS token (with its position embedding folded in), the blocks and the final norm are
  copied; q/k/v/out kernels are reshaped to the model's (heads, head_dim).
Parameters under AVT names (`kind='avt'`: this project, MBT) load by name; position embeddings are
resized to the model's grid and surplus bottleneck tokens dropped (MBT stores n_bottlenecks + 1).
A patch kernel whose patch size differs from the model's (every format) is resampled with FlexiViT's
pseudo-inverse resize (`patch_resize`); the report names both patch sizes.
"""

import dataclasses
import math
import re
from typing import Iterable

import jax.numpy as jnp
import numpy as np

from avt_jax.models.tokenizers import inflate_2d_kernel, resize_posemb
from avt_jax.pretrained import patch_resize
from avt_jax.pretrained.files import PretrainedError
from avt_jax.pretrained.layouts import ATTENTION, Source

# Pixel normalisation the checkpoint was trained with (AVT's video pixels are in [0, 1]): per-channel
# (mean, std). `minus_one_to_one`: the ViT release, big_vision, Scenic (zero_centering), HF google/vit-*,
# timm augreg ViTs; `imagenet`: torchvision / most other timm models; `none`: trained on [0, 1].
PIXEL_NORMALIZATIONS = {'minus_one_to_one': ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
                        'imagenet': ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                        'none': ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))}
MODALITY_SUFFIXED = ('tokenizer', 'posembed', 'cls', 'decoder', 'contrastive_projection', 'encoder_norm')
VIDEO_KERNELS = {'central': 'central_frame', 'average': 'average'}
CATEGORIES = ('loaded', 'inflated', 'transformed', 'resized', 'excluded', 'init', 'unused')


@dataclasses.dataclass
class Entry:
  """A value for one AVT parameter (before the final shape check).

  Attributes:
    value: the array.
    origin: the checkpoint entries it comes from.
    category: 'loaded', 'inflated', 'transformed' or 'resized'.
    how: what was done, for the report ('' when loaded as is).
    from_shape: the checkpoint's shape where it differs.
  """
  value: np.ndarray
  origin: str
  category: str = 'loaded'
  how: str = ''
  from_shape: tuple[int, ...] | None = None


def modality_of(name: str) -> str | None:
  """The modality a parameter belongs to (None: shared, e.g. the bottleneck or the classifier)."""
  for m in ('video', 'audio'):
    if re.search(rf'(^|/)({"|".join(MODALITY_SUFFIXED)})_{m}(/|$)|encoderblock_\d+_{m}/', name):
      return m
  return None


# ----------------------------------------------------------------------------------------------
# 2D ViT -> a modality's encoder


def _grid_of(n: int, target_grid: tuple[int, ...], prefer_square: bool) -> tuple[int, ...] | None:
  """The patch grid of a flat [1, n, D] position embedding, guessed against the model's grid.

  Tried in order: the model's own grid; (image sources) a square grid; keeping the model's trailing
  axes (mel bins, or frame height x width) and inferring the leading one; a square grid per step of
  the model's leading axis (video); a square grid.
  """
  if n == math.prod(target_grid):
    return tuple(target_grid)
  root = int(round(math.sqrt(n)))
  if prefer_square and root * root == n:
    return (root, root)
  tail = math.prod(target_grid[1:])
  if n % tail == 0:
    return (n // tail, *target_grid[1:])
  if len(target_grid) == 3 and n % target_grid[0] == 0:
    per_step = int(round(math.sqrt(n // target_grid[0])))
    if per_step * per_step * target_grid[0] == n:
      return (target_grid[0], per_step, per_step)
  return (root, root) if root * root == n else None


def _cubic_matrix(size_in: int, size_out: int, a: float = -0.75) -> np.ndarray:
  """[size_out, size_in] weights of cubic convolution (Keys' kernel with a = -0.75, half-pixel
  centres, edge values repeated, no antialiasing): PyTorch's `interpolate(mode='bicubic',
  align_corners=False)` and ONNX Resize `cubic`, which DINOv2 uses on its position embedding."""
  def kernel(x):
    x = np.abs(x)
    return np.where(x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0))
  matrix = np.zeros((size_out, size_in))
  for i in range(size_out):
    x = (i + 0.5) * size_in / size_out - 0.5
    left = int(np.floor(x))
    for j in range(left - 1, left + 3):
      matrix[i, min(max(j, 0), size_in - 1)] += kernel(x - j)
  return matrix


def resize_bicubic(posemb: np.ndarray, grid: tuple[int, ...]) -> np.ndarray:
  """[1, *old_grid, D] -> [1, *grid, D] by separable cubic convolution (`_cubic_matrix`), float64."""
  out = posemb.astype(np.float64)
  for axis, size in enumerate(grid, start=1):
    out = np.moveaxis(np.tensordot(_cubic_matrix(out.shape[axis], size), np.moveaxis(out, axis, 0),
                                   axes=1), 0, axis)
  return out.astype(np.float32)


def fit_posemb(posemb: np.ndarray, target: tuple[int, ...], name: str, origin: str,
               image: bool, grid: tuple[int, ...] | None = None, method: str = 'bilinear'
               ) -> tuple[np.ndarray, str]:
  """Position embedding [1, N, D] or [1, *grid, D] -> the model's [1, *grid, D].

  A flat embedding is first laid out on its patch grid: `grid` where the checkpoint states it, else
  `_grid_of`; a grid that differs from the model's is resized (`method`: 'bilinear', or 'bicubic'
  as DINOv2 resizes its own); an image source's 2D grid is repeated over a video's time steps.

  Returns:
    (the embedding [1, *model grid, D] float32, what was done).
  """
  target_grid, width = tuple(target[1:-1]), target[-1]
  if posemb.shape[-1] != width:
    raise PretrainedError(f"{name}: the checkpoint's {origin} has width {posemb.shape[-1]} "
                          f'(shape {posemb.shape}), the model needs {target}.')
  steps = []
  if posemb.ndim == 3 and len(target_grid) > 1:
    if grid is not None and math.prod(grid) != posemb.shape[1]:
      raise PretrainedError(f'{name}: {origin} has {posemb.shape[1]} patch rows, the stated patch '
                            f'grid {tuple(grid)} has {math.prod(grid)}.')
    grid = grid or _grid_of(posemb.shape[1], target_grid, prefer_square=image)
    if grid is None:
      raise PretrainedError(f'{name}: cannot tell the patch grid of {origin} with shape '
                            f"{posemb.shape} for the model's grid {target_grid}.")
    posemb = posemb.reshape(1, *grid, width)
    steps.append(f'laid out on a {grid} grid')
  repeat = 1
  if posemb.ndim == 4 and len(target_grid) == 3:  # an image grid for video frames
    repeat, target_grid = target_grid[0], target_grid[1:]
  if tuple(posemb.shape[1:-1]) != tuple(target_grid):
    steps.append(f'{method} resize {tuple(posemb.shape[1:-1])} -> {tuple(target_grid)}')
    if method == 'bicubic':
      posemb = resize_bicubic(posemb, target_grid)
    else:
      posemb = np.asarray(resize_posemb(jnp.asarray(posemb, jnp.float32), target_grid))
  if posemb.ndim == len(target) - 1:
    posemb = np.repeat(posemb[:, None], repeat, axis=1)
    steps.append(f'repeated over {repeat} time steps')
  return posemb.astype(np.float32), ', '.join(steps)


def _block_value(key: str, value: np.ndarray, target: tuple[int, ...]) -> np.ndarray:
  """Canonical [D, heads x head_dim] / [heads x head_dim, D] / [heads x head_dim] attention arrays
  -> the model's [D, heads, head_dim] / [heads, head_dim, D] / [heads, head_dim]."""
  if (ATTENTION not in key or value.shape == target or value.size != math.prod(target)
      or value.ndim != len(target) - 1):
    return value
  if key.endswith('out/kernel') and value.shape[-1] == target[-1]:
    return value.reshape(target)
  if key.endswith('kernel') and value.shape[0] == target[0]:
    return value.reshape(target)
  if key.endswith('bias') and value.ndim == 1:
    return value.reshape(target)
  return value


def check_heads(source: Source, targets: dict[str, tuple[int, ...]], where: str) -> None:
  heads = {shape[1] for name, shape in targets.items()
           if name.endswith(f'{ATTENTION}/query/kernel') and name.startswith('encoder/')}
  if source.num_heads is not None and heads and heads != {source.num_heads}:
    raise PretrainedError(f'{where}: the checkpoint has {source.num_heads} attention heads, the model '
                          f'{heads.pop()} (set model.num_heads={source.num_heads}).')


def vit_to_modality(source: Source, modality: str, targets: dict[str, tuple[int, ...]],
                    video_kernel: str, where: str) -> dict[str, Entry]:
  """Entries for one modality's tokenizer, CLS, position embedding, blocks and norm from a 2D ViT.

  Args:
    source: a converted checkpoint of kind 'vit'.
    modality: 'video' or 'audio'.
    targets: the model's parameter shapes by (unrolled) name.
    video_kernel: 'central' or 'average' (see the module docstring).
    where: the checkpoint, for messages.
  """
  p, entries = source.params, {}
  kernel_name = f'tokenizer_{modality}/embedding/kernel'
  kernel, shape = p['embedding/kernel'], targets.get(kernel_name)
  origin = source.origin['embedding/kernel']
  if shape is not None and modality == 'video' and kernel.ndim == 4 and len(shape) == 5:
    inflated = inflate_2d_kernel(kernel, shape[0], VIDEO_KERNELS[video_kernel])
    entries[kernel_name] = Entry(inflated, origin, 'inflated', f'{video_kernel} over {shape[0]} '
                                 'frames', kernel.shape)
  elif shape is not None and modality == 'audio' and (kernel.shape[-2] != 1 or kernel.ndim == 5):
    summed = kernel.sum(axis=tuple(range(kernel.ndim - 4)) + (kernel.ndim - 2,), keepdims=False)
    entries[kernel_name] = Entry(summed[..., None, :], origin, 'transformed',
                                 'summed over input channels (AST)', kernel.shape)
  else:
    entries[kernel_name] = Entry(kernel, origin)
  entries[f'tokenizer_{modality}/embedding/bias'] = Entry(p['embedding/bias'],
                                                           source.origin['embedding/bias'])
  if 'cls' in p:
    entries[f'cls_{modality}'] = Entry(p['cls'], source.origin['cls'])
  pos_name = f'posembed_{modality}/posembed_input'
  if pos_name in targets:
    fitted, how = fit_posemb(p['posemb'], targets[pos_name], pos_name, source.origin['posemb'],
                             image=kernel.ndim == 4, grid=source.grid, method=source.posemb_resize)
    how = ', '.join(filter(None, [source.posemb_note, how]))
    entries[pos_name] = Entry(fitted, source.origin['posemb'], 'resized', how, p['posemb'].shape)
  for key, value in p.items():
    match = re.match(r'^encoderblock_(\d+)/(.+)$', key)
    if match:
      i, rest = match.groups()
      for name in (f'encoder/encoderblock_{i}_{modality}/{rest}', f'encoder/encoderblock_{i}/{rest}'):
        if name in targets:
          entries[name] = Entry(_block_value(rest, value, targets[name]), source.origin[key])
  for leaf in ('scale', 'bias'):
    entries[f'encoder/encoder_norm_{modality}/{leaf}'] = Entry(p[f'encoder_norm/{leaf}'],
                                                               source.origin[f'encoder_norm/{leaf}'])
  return entries


def fold_pixel_normalization(entries: dict[str, Entry], normalization: str) -> None:
  """Folds the checkpoint's input normalisation into the video patch embedding (in place).

  With pixels p in [0, 1] and a checkpoint trained on x = (p - mean_c) / std_c, a (VALID, strided)
  patch embedding gives K . x + b = (K / std_c) . p + (b - sum_{t,h,w,c} K mean_c / std_c), so the
  folded kernel on AVT's pixels equals the checkpoint on its own input, exactly.
  """
  kernel, bias = (entries.get(f'tokenizer_video/embedding/{n}') for n in ('kernel', 'bias'))
  if normalization == 'none' or kernel is None or bias is None or kernel.value.shape[-2] != 3:
    return
  mean, std = (np.asarray(v, np.float32) for v in PIXEL_NORMALIZATIONS[normalization])
  offset = (kernel.value * (mean / std)[:, None]).sum(axis=tuple(range(kernel.value.ndim - 1)))
  how = f'input normalisation {normalization} folded in'
  entries['tokenizer_video/embedding/kernel'] = dataclasses.replace(
      kernel, value=kernel.value / std[:, None], how=', '.join(filter(None, [kernel.how, how])),
      category='inflated' if kernel.category == 'inflated' else 'transformed',
      from_shape=kernel.from_shape or kernel.value.shape)
  entries['tokenizer_video/embedding/bias'] = dataclasses.replace(
      bias, value=bias.value - offset, category='transformed', how=how,
      from_shape=bias.from_shape or bias.value.shape)


def avt_entries(source: Source, modalities: Iterable[str], shared: bool) -> tuple[dict[str, Entry],
                                                                                  list[str]]:
  """Entries of an AVT-named source for `modalities` (and the shared parameters if `shared`).

  Returns (entries, origins of the parameters of other modalities, which stay unused).
  """
  entries, skipped = {}, []
  for name, value in source.params.items():
    m = modality_of(name)
    if (m is None and shared) or m in modalities:
      entries[name] = Entry(value, source.origin[name])
    else:
      skipped.append(source.origin[name])
  return entries, skipped


# ----------------------------------------------------------------------------------------------
# Matching against the model


def _fit(name: str, entry: Entry, shape: tuple[int, ...]) -> Entry:
  """The entry with the model's shape, or PretrainedError naming the parameter and both shapes."""
  value = _block_value(name, entry.value, shape)  # flat attention arrays -> the model's heads
  if tuple(value.shape) == tuple(shape):
    return dataclasses.replace(entry, value=value)
  if (re.fullmatch(r'tokenizer_(video|audio)/embedding/kernel', name) and value.ndim == len(shape)
      and value.shape[:-4] == shape[:-4] and value.shape[-2:] == shape[-2:]):
    old, new = tuple(value.shape[-4:-2]), tuple(shape[-4:-2])
    how = ', '.join(filter(None, [entry.how, patch_resize.describe(old, new)]))
    return Entry(patch_resize.resample_kernel(value, new), entry.origin,
                 'transformed' if entry.category == 'loaded' else entry.category, how,
                 entry.from_shape or value.shape)
  if name.endswith('posembed_input') and value.ndim in (3, len(shape)):
    fitted, how = fit_posemb(value, shape, name, entry.origin, image=False)
    return Entry(fitted, entry.origin, 'resized', how, value.shape)
  if (name == 'encoder/bottleneck' and value.ndim == 3 and value.shape[2] == shape[2]
      and value.shape[1] >= shape[1]):
    return Entry(value[:, :shape[1]], entry.origin, 'resized', f'first {shape[1]} tokens', value.shape)
  mapped = f' ({entry.how}: {tuple(value.shape)})' if entry.how else ''
  raise PretrainedError(f"{name}: the checkpoint's {entry.origin} has shape "
                        f'{tuple(entry.from_shape or value.shape)}{mapped}, the model needs '
                        f'{tuple(shape)}.')


def empty_report() -> dict:
  return {c: ({} if c in ('loaded', 'inflated', 'transformed', 'resized') else []) for c in CATEGORIES}


def match(entries: dict[str, Entry], targets: dict[str, tuple[int, ...]], exclude: Iterable[str],
          report: dict) -> dict[str, np.ndarray]:
  """Fits entries to the model's shapes, filling `report`; returns the values by parameter name.

  Raises:
    PretrainedError: listing every parameter whose checkpoint shape cannot be mapped.
  """
  patterns = [re.compile(p) for p in exclude]
  values, errors = {}, []
  for name, shape in sorted(targets.items()):
    if any(p.search(name) for p in patterns):
      report['excluded'].append(name)
      continue
    if name not in entries:
      report['init'].append(name)
      continue
    try:
      entry = _fit(name, entries[name], shape)
    except PretrainedError as e:
      errors.append(str(e))
      continue
    values[name] = entry.value.astype(np.float32)
    if entry.category == 'loaded':
      report['loaded'][name] = entry.origin
    else:
      report[entry.category][name] = {'source': entry.origin, 'from': list(entry.from_shape),
                                      'to': list(shape), 'how': entry.how}
  report['unused'] += sorted(e.origin for n, e in entries.items() if n not in targets)
  if errors:
    raise PretrainedError(
        'Checkpoint parameters do not fit the model:\n  ' + '\n  '.join(errors) +
        '\nCheck model.size / num_heads / patch sizes against the checkpoint, or leave these '
        "parameters at their initialisation with --config.init.exclude, e.g. \"('classifier/',)\".")
  return values
