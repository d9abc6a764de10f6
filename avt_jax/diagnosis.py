"""End-of-run diagnosis: has the model fit its training data, and which modality's branch fails.

Reads the metrics of an evaluation (`avt_jax.evaluate`'s keys) on the eval split and on the
fixed training subset (`config.eval.train_subset_size`), and returns plain sentences, each with
what to try. The thresholds are our design (rules of thumb, not tuned):

- not fit: the training subset's headline score (top1, mAP or action_top1) under `FIT_THRESHOLD`
  after at least `MOST_OF_SCHEDULE` of the steps. 0.9, not lower: a run that stops at 0.8 usually
  gains on both splits from a longer schedule (VoiceDigits, video only, `configs/manifest.py`: 60
  epochs train 0.80 / test 0.61, 150 epochs 1.00 / 0.80; README "VoiceDigits"), and the recipe fits
  0.93-1.00 of its training clips wherever the modalities carry the class;
- does not generalise: the model fits (the score above) and the training subset's score is over the
  eval split's by more than `GAP`;
- a weak branch: a modality's own score under the fused one by more than `GAP`;
- fusion that loses: the fused score under one modality's own score by more than `FUSION_LOSS`.
"""

from typing import Mapping

import ml_collections

from avt_jax import evaluate

FIT_THRESHOLD = 0.9
MOST_OF_SCHEDULE = 0.75
GAP = 0.15
FUSION_LOSS = 0.02

_UNDERFIT_ADVICE = (
    'try a longer schedule (config.train.steps or config.train.epochs), another learning rate '
    '(config.optim.learning_rate 3x higher or lower) or warm-up (config.optim.warmup_steps), '
    'smaller patches or tubelets for small frames or spectrograms (config.model.video_patch, '
    'config.model.audio_patch), or weaker augmentation and regularisation; a single-modality run '
    'may also stay here because its modality does not carry the class')
_OVERFIT_ADVICE = (
    'try stronger augmentation (mixup, SpecAugment), stochastic depth or weight decay, fewer '
    'steps (config.train.eval_every keeps the best checkpoint), a smaller model, or {start}')
_START_ADVICE = {  # by whether the run started from a checkpoint
    False: 'a pretrained start (config.init.checkpoint; configs/manifest.py:pretrained)',
    True: 'fewer trained blocks of the pretrained encoder (config.optim.frozen)'}


def diagnose(config: ml_collections.ConfigDict, eval_metrics: Mapping[str, float],
             train_metrics: Mapping[str, float], step: int) -> list[str]:
  """Sentences on what the run's final evaluation shows ([] when nothing stands out).

  Args:
    config: the run's config (`train.steps`, `model.modalities`, labels).
    eval_metrics: `evaluate` metrics on `data.eval_split` ({} when there is nothing to evaluate).
    train_metrics: the same on the training subset ({} when `config.eval.train_subset_size` is 0).
    step: the evaluated step (out of `config.train.steps`).
  """
  if not evaluate.has_classifier(config):
    return []
  score = evaluate.score_names(config)[0]
  notes = []
  fraction = step / max(int(config.train.steps), 1)
  fitted = train_metrics.get(score)
  fits = fitted is not None and fitted >= FIT_THRESHOLD
  if fitted is not None and not fits and fraction >= MOST_OF_SCHEDULE:
    notes.append(f'The model has not fit its training data: {score} {fitted:.3f} on the first '
                 f'{int(train_metrics["num_videos"])} training clips after {fraction:.0%} of the '
                 f'schedule (step {step}/{config.train.steps}); {_UNDERFIT_ADVICE}.')
  if fits and score in eval_metrics and fitted - eval_metrics[score] > GAP:
    notes.append(f'The model fits its training data but does not generalise: {score} '
                 f'{fitted:.3f} on training clips, {eval_metrics[score]:.3f} on '
                 f'{config.data.eval_split}; '
                 f'{_OVERFIT_ADVICE.format(start=_START_ADVICE[bool(config.init.checkpoint)])}.')
  for where, results in ((config.data.eval_split, eval_metrics), ('the training subset',
                                                                   train_metrics)):
    notes += _modality_notes(config, score, results, where)
  return notes


def _modality_notes(config: ml_collections.ConfigDict, score: str, results: Mapping[str, float],
                    where: str) -> list[str]:
  """A weak modality branch, or fusion below a single modality, on one split."""
  modalities = tuple(config.model.modalities)
  own = {m: results.get(f'modality_{score}/{m}') for m in modalities}
  if len(modalities) < 2 or score not in results or None in own.values():
    return []
  fused, notes = results[score], []
  for m, value in own.items():
    if fused - value > GAP:
      notes.append(
          f"On {where}, the {m} branch's own predictions ({score} {value:.3f}) are far below the "
          f'fused ones ({fused:.3f}): it learns little by itself; check its input (run '
          f'config.model.modalities=({m!r},) alone), and try a per-modality loss on it, smaller '
          f'{m} patches, or modality dropout so that fusion cannot lean on the other branch.')
  best = max(own, key=own.get)
  if own[best] - fused > FUSION_LOSS:
    notes.append(
        f'On {where}, fusion loses to {best} alone: fused {score} {fused:.3f}, {best} '
        f'{own[best]:.3f}; the weaker modality drags the averaged logits down: try late fusion '
        "(config.model.fusion='late'), weighting the modalities, modality dropout, or training "
        f'{best} alone.')
  return notes
