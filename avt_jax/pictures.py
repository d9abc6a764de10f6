"""Evaluation pictures for TensorBoard: confusion, per-class accuracy, bottleneck attention (our design).

Written at every evaluation of a training run (`config.train.eval_pictures`, on by default), as images
in the workdir's events next to the `eval/<metric>` scalars:

* `eval_pictures/confusion/<head>`: the confusion matrix of the view-averaged predictions (rows: true
  class, columns: predicted, counts; scikit-learn's `ConfusionMatrixDisplay`) for up to
  `MAX_MATRIX_CLASSES` classes; above that, the `TOP_PAIRS` most confused (true, predicted) pairs
  with their counts.
* `eval_pictures/per_class_accuracy/<head>`: the fraction of each class's videos predicted correctly
  (recall), classes sorted from worst to best.
* `eval_pictures/attention/clip_<i>`: for the first `ATTENTION_CLIPS` evaluation videos (first view
  of each), what the bottleneck tokens attend to in the last fused layer
  (`AVT.attention_maps`, mean over heads and bottleneck tokens): over the video token grid, drawn on
  the frame at the start of each tubelet, and over the spectrogram patches, drawn on the log-mel input.
* `eval_pictures/reconstruction/<video|audio>_clip_<i>`: when masked video / masked audio is trained,
  for the first `RECONSTRUCTION_CLIPS` evaluation videos (first view, a fixed mask): the masked input,
  the prediction (visible patches as they are, masked ones predicted, de-normalised per patch when
  `loss.normalize_target`) and the target; the video's first frame, the whole spectrogram.

Confusion and accuracy cover single-label heads (each head of EPIC-Kitchens' verb/noun); the attention
picture needs a bottleneck-fused audio-video model and one process (on several hosts it is left out).
"""

from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import matplotlib
import ml_collections
import numpy as np
from sklearn import metrics as sk_metrics

from avt_jax import input as input_lib
from avt_jax.losses import OBJECTIVE_TABLE
from avt_jax.metrics import MultiViewAccumulator

matplotlib.use('Agg')
from matplotlib import pyplot as plt  # noqa: E402  # pylint: disable=g-import-not-at-top

MAX_MATRIX_CLASSES = 30
TOP_PAIRS = 20
ATTENTION_CLIPS = 3
RECONSTRUCTION_CLIPS = 2
# The masked-modelling objectives (`losses.OBJECTIVE_TABLE`) -> the modality each reconstructs.
MASKED_MODALITIES = {o.name: o.modalities[0] for o in OBJECTIVE_TABLE.values()
                     if o.model_pass == 'masked'}


def figure_image(figure: matplotlib.figure.Figure) -> np.ndarray:
  """Renders and closes a matplotlib figure: [height, width, 3] uint8 RGB."""
  figure.canvas.draw()
  image = np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()
  plt.close(figure)
  return image


def confusion_image(labels: np.ndarray, predictions: np.ndarray, class_names: Sequence[str]
                    ) -> np.ndarray:
  """The confusion matrix, or its most confused pairs for many classes (see the module docstring).

  Args:
    labels: [N] true class ids.
    predictions: [N] predicted class ids.
    class_names: the C class names.

  Returns:
    [height, width, 3] uint8 picture.
  """
  num_classes = len(class_names)
  matrix = sk_metrics.confusion_matrix(labels, predictions, labels=np.arange(num_classes))
  if num_classes <= MAX_MATRIX_CLASSES:
    size = 3 + 0.35 * num_classes
    figure, axes = plt.subplots(figsize=(size + 1, size), dpi=80)
    sk_metrics.ConfusionMatrixDisplay(matrix, display_labels=list(class_names)).plot(
        ax=axes, xticks_rotation='vertical', colorbar=False, values_format='d')
    axes.set_title(f'Confusion matrix ({len(labels)} videos)')
    figure.tight_layout()
    return figure_image(figure)
  pairs = most_confused_pairs(matrix, TOP_PAIRS)
  figure, axes = plt.subplots(figsize=(9, 1.5 + 0.3 * max(len(pairs), 1)), dpi=80)
  axes.barh(np.arange(len(pairs)), [count for *_, count in pairs])
  axes.set_yticks(np.arange(len(pairs)),
                  [f'{class_names[i]} -> {class_names[j]}' for i, j, _ in pairs], fontsize=8)
  axes.invert_yaxis()
  axes.set_xlabel('videos (true -> predicted)')
  axes.set_title(f'{len(pairs)} most confused pairs of {num_classes} classes ({len(labels)} videos)')
  figure.tight_layout()
  return figure_image(figure)


def most_confused_pairs(matrix: np.ndarray, top: int) -> list[tuple[int, int, int]]:
  """The `top` largest off-diagonal cells of a [C, C] confusion matrix (rows true, columns predicted)
  that are non-zero, as (true class, predicted class, count), largest first (ties: row-major order)."""
  off_diagonal = matrix - np.diag(np.diag(matrix))
  order = np.argsort(-off_diagonal, axis=None, kind='stable')[:top]
  return [(int(i), int(j), int(off_diagonal[i, j]))
          for i, j in zip(*np.unravel_index(order, matrix.shape)) if off_diagonal[i, j]]


def per_class_accuracy(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
  """[num_classes] fraction of each class's videos predicted correctly; NaN for absent classes."""
  matrix = sk_metrics.confusion_matrix(labels, predictions, labels=np.arange(num_classes))
  totals = matrix.sum(axis=1)
  return np.where(totals > 0, np.diag(matrix) / np.maximum(totals, 1), np.nan)


def per_class_accuracy_image(labels: np.ndarray, predictions: np.ndarray,
                             class_names: Sequence[str]) -> np.ndarray:
  """Bars of `per_class_accuracy`, worst first (classes without videos left out): [H, W, 3] uint8."""
  accuracy = per_class_accuracy(labels, predictions, len(class_names))
  present = np.flatnonzero(~np.isnan(accuracy))
  order = present[np.argsort(accuracy[present], kind='stable')]
  figure, axes = plt.subplots(figsize=(min(3 + 0.25 * len(order), 40), 4), dpi=80)
  axes.bar(np.arange(len(order)), accuracy[order])
  axes.set_ylim(0, 1)
  axes.set_ylabel('accuracy')
  if len(order) <= 2 * MAX_MATRIX_CLASSES:
    axes.set_xticks(np.arange(len(order)), [class_names[i] for i in order], rotation=90, fontsize=8)
  axes.set_title(f'Per-class accuracy, worst first (mean {np.mean(accuracy[order]):.3f})')
  figure.tight_layout()
  return figure_image(figure)


def attention_image(video: np.ndarray, audio: np.ndarray, video_map: np.ndarray,
                    audio_map: np.ndarray) -> np.ndarray:
  """One clip's bottleneck attention over its video tokens and spectrogram patches.

  Args:
    video: [T, H, W, 3] model input in [-1, 1].
    audio: [time, mels] model input (normalised log-mel).
    video_map: [t, h, w] attention over the video token grid (t tubelets in time).
    audio_map: [time patches, mel patches] attention over the spectrogram patches.

  Returns:
    [height, width, 3] uint8 picture: one panel per tubelet time step, then the spectrogram.
  """
  steps = video_map.shape[0]
  figure, axes = plt.subplots(1, steps + 1, figsize=(2.2 * steps + 5, 2.6), dpi=80,
                              gridspec_kw={'width_ratios': [1] * steps + [2.5]})
  frames_per_step = video.shape[0] // steps
  top = video_map.max()
  for t, ax in enumerate(axes[:steps]):
    ax.imshow((video[t * frames_per_step] + 1) / 2)
    ax.imshow(video_map[t], cmap='inferno', alpha=0.55, vmin=0, vmax=top, interpolation='nearest',
              extent=(-0.5, video.shape[2] - 0.5, video.shape[1] - 0.5, -0.5))
    ax.set_title(f'frame {t * frames_per_step}', fontsize=8)
    ax.axis('off')
  ax = axes[-1]
  ax.imshow(audio.T, origin='lower', aspect='auto', cmap='gray')
  ax.imshow(audio_map.T, origin='lower', aspect='auto', cmap='inferno', alpha=0.55,
            interpolation='nearest', extent=(-0.5, audio.shape[0] - 0.5, -0.5, audio.shape[1] - 0.5))
  ax.set_xlabel('spectrogram frame')
  ax.set_ylabel('mel bin')
  figure.suptitle('Bottleneck attention, last fused layer (mean over heads and tokens)', fontsize=9)
  figure.tight_layout()
  return figure_image(figure)


def unpatchify(patches: np.ndarray, grid: Sequence[int], patch: Sequence[int],
               channels: int) -> np.ndarray:
  """Inverse of `tokenizers.patchify` for one example: [prod(grid), prod(patch) * channels] ->
  [*(grid * patch), channels]."""
  n = len(patch)
  x = patches.reshape(*grid, *patch, channels)
  order = [i // 2 if i % 2 == 0 else n + i // 2 for i in range(2 * n)] + [2 * n]
  x = np.transpose(x, order)  # (g0, p0, g1, p1, ..., channels)
  return x.reshape(*[g * p for g, p in zip(grid, patch)], channels)


def reconstruction_panels(pred: np.ndarray, target: np.ndarray, mask: np.ndarray,
                          normalized: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(masked input, prediction, target) patches [N, P] of one example, in input units: masked
  patches of the input are 0, the prediction shows the visible patches as they are and the masked
  ones predicted (de-normalised with each target patch's mean and std when `normalized`, as MAE
  papers show them)."""
  masked = mask[:, None] > 0
  if normalized:
    pred = pred * np.sqrt(target.var(axis=-1, keepdims=True) + 1e-6) + target.mean(-1, keepdims=True)
  return np.where(masked, 0.0, target), np.where(masked, pred, target), target


def reconstruction_image(modality: str, panels: Sequence[np.ndarray]) -> np.ndarray:
  """[height, width, 3] uint8 picture of (masked input, prediction, target): `video` [T, H, W, 3]
  in [-1, 1] (its first frame) or `audio` [time, mels]."""
  figure, axes = plt.subplots(1, 3, figsize=(9, 2.8), dpi=80)
  for ax, panel, title in zip(axes, panels, ('masked input', 'prediction', 'target')):
    if modality == 'video':
      ax.imshow(np.clip((panel[0] + 1) / 2, 0, 1))
    else:
      ax.imshow(panel[..., 0].T if panel.ndim == 3 else panel.T, origin='lower', aspect='auto',
                cmap='magma', vmin=float(panels[2].min()), vmax=float(panels[2].max()))
    ax.set_title(title, fontsize=8)
    ax.axis('off')
  figure.suptitle(f'Masked {modality} reconstruction (held-out clip)', fontsize=9)
  figure.tight_layout()
  return figure_image(figure)


def first_views(batches: Iterator[dict[str, np.ndarray]], count: int) -> dict[str, np.ndarray]:
  """`video` and `audio` of the first view of the first `count` videos of evaluation `batches`."""
  rows, seen = {'video': [], 'audio': []}, set()
  for batch in batches:
    for row in np.flatnonzero(batch['mask'] > 0):
      if len(seen) < count and batch['index'][row] not in seen:
        seen.add(batch['index'][row])
        for key, values in rows.items():
          values.append(batch[key][row])
    if len(seen) == count:
      break
  return {key: np.stack(values) for key, values in rows.items()}


def make_eval_pictures(config: ml_collections.ConfigDict, model, data_dir: str, split: str,
                       class_names: Mapping[str, Sequence[str]]
                       ) -> Callable[[Any, MultiViewAccumulator], dict[str, np.ndarray]]:
  """Returns pictures(params, evaluated videos) -> name -> [1, H, W, 3] uint8 images.

  The attention maps are compiled once, on first use, for all later calls.

  Args:
    config: the run's config.
    model: the AVT.
    data_dir: the records (the attention clips are read from `split`).
    split: the evaluation split.
    class_names: head -> class names (`dataset_stats.class_names`).
  """
  heads = tuple(config.data.label_heads)
  with_attention = model.has_bottleneck_layers and jax.process_count() == 1
  attention_maps = jax.jit(model.attention_maps)
  masked = tuple(o for o in MASKED_MODALITIES if config.loss.weights.get(o, 0.0)
                 and MASKED_MODALITIES[o] in model.modalities) if jax.process_count() == 1 else ()
  reconstruct = jax.jit(lambda params, inputs: model.apply(
      {'params': params}, inputs, objectives=masked, rngs={'masking': jax.random.key(0)}))

  def pictures(params: Any, videos: MultiViewAccumulator) -> dict[str, np.ndarray]:
    images = {}
    if not config.data.multi_label:
      _, logits, labels = videos.videos()
      for head in heads:
        labelled = labels[head].sum(axis=1) > 0
        true, predicted = (np.argmax(x[labelled], axis=1) for x in (labels[head], logits[head]))
        if len(true):
          images[f'confusion/{head}'] = confusion_image(true, predicted, class_names[head])
          images[f'per_class_accuracy/{head}'] = per_class_accuracy_image(true, predicted,
                                                                          class_names[head])
    if with_attention:
      inputs = first_views(input_lib.make_eval_iterator(config, data_dir, split), ATTENTION_CLIPS)
      maps = jax.device_get(attention_maps(params, inputs))
      for i in range(len(inputs['video'])):
        images[f'attention/clip_{i}'] = attention_image(
            inputs['video'][i], inputs['audio'][i],
            *(maps[m]['grid'][i, -1].mean(axis=(0, 1)) for m in ('video', 'audio')))
    if masked:
      images.update(reconstruction_images(params))
    return {f'eval_pictures/{name}': image[None] for name, image in images.items()}

  def reconstruction_images(params: Any) -> dict[str, np.ndarray]:
    inputs = first_views(input_lib.make_eval_iterator(config, data_dir, split), RECONSTRUCTION_CLIPS)
    out = jax.device_get(reconstruct(params, {m: inputs[m] for m in model.modalities}))
    images = {}
    for objective in masked:
      m = MASKED_MODALITIES[objective]
      shape = inputs[m].shape[1:] if m == 'video' else (*inputs[m].shape[1:], 1)
      patch = model.video_patch if m == 'video' else model.audio_patch
      grid = [s // p for s, p in zip(shape[:-1], patch)]
      for i in range(len(inputs[m])):
        o = {k: np.asarray(out[objective][k][i], np.float64) for k in ('pred', 'target', 'mask')}
        panels = reconstruction_panels(o['pred'], o['target'], o['mask'],
                                       bool(config.loss.normalize_target))
        images[f'reconstruction/{m}_clip_{i}'] = reconstruction_image(
            m, [unpatchify(p, grid, patch, shape[-1]) for p in panels])
    return images

  return pictures
