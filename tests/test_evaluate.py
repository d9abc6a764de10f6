"""avt_jax.evaluate on real records and a real (tiny, random) AVT, against a hand computation from
the model's outputs: fused and per-modality scores of two label heads not called verb/noun, the
training subset, and audio-video retrieval on the centre views."""

import jax
import numpy as np
import pytest

from avt_jax import calibration, evaluate, input as input_lib, sharding, train, workdir as workdir_lib
from avt_jax.benchmark import synthetic_data
from avt_jax.models import build_model
from avt_jax.train_step import setup
from conftest import random_params, tiny_config

HEADS = {'colour': 3, 'shape': 4}
CLIPS = 10
SUBSET = 4


def eval_config():
  """Two label heads, classification + contrastive, 3 clips per video: 30 views in batches of 8,
  so a video's views span two batches and the last batch is padded."""
  c = tiny_config(**{'data.num_classes': HEADS, 'data.eval_split': 'train',
                     'input.eval_clips': 3, 'input.eval_crops': 1,
                     'train.eval_pictures': False, 'eval.train_subset_size': SUBSET})
  c.data.label_heads = tuple(HEADS)
  for name in c.loss.weights:
    c.loss.weights[name] = 1.0 if name in ('classification', 'contrastive') else 0.0
  return c


@pytest.fixture(scope='module')
def setting(tmp_path_factory):
  config = eval_config()
  data_dir = synthetic_data.write_synthetic_records(config, str(tmp_path_factory.mktemp('records')),
                                                    CLIPS)
  model = build_model(config)
  *_, init = setup(config)
  params = random_params(jax.eval_shape(init, jax.random.PRNGKey(0)).params, seed=1)
  return config, data_dir, model, params


def model_rows(config, data_dir, model, params, view_config=None):
  """Every unmasked view of the 'train' split in stream order: (index, model outputs, labels)."""
  apply = jax.jit(lambda p, x: model.apply({'params': p}, x, train=False,
                                           objectives=('classification', 'contrastive')))
  rows = []
  for batch in input_lib.make_eval_iterator(view_config or config, data_dir, 'train'):
    out = jax.device_get(apply(params, {k: batch[k] for k in ('video', 'audio', 'mask')}))
    for r in np.flatnonzero(batch['mask']):
      take = lambda tree: jax.tree.map(lambda x: x[r], tree)  # pylint: disable=cell-var-from-loop
      labels = {h: int(np.argmax(batch[f'labels/{h}'][r])) for h in HEADS}
      rows.append((int(batch['index'][r]), take({'fused': out['logits'],
                                                 **out['modality_logits']}),
                   labels, take({m: out['contrastive'][m] for m in ('video', 'audio')})))
  return rows


def hand_scores(rows, videos=None):
  """Top-1 per head and all-heads-right of the view-averaged logits, for the fused and each
  modality's logits, on the first `videos` videos (all by default)."""
  order = list(dict.fromkeys(index for index, *_ in rows))[:videos]
  results = {'num_videos': len(order)}
  for source in ('fused', 'video', 'audio'):
    right = {h: [] for h in HEADS}
    for video in order:
      views = [(logits[source], labels) for index, logits, labels, _ in rows if index == video]
      for h in HEADS:
        mean = np.mean([logits[h] for logits, _ in views], axis=0)
        right[h].append(np.argmax(mean) == views[0][1][h])
    action = np.mean(np.logical_and(*right.values()))
    scores = {'action_top1': action, **{f'{h}_top1': np.mean(r) for h, r in right.items()}}
    if source == 'fused':
      results.update(scores)
    else:
      results.update({f'modality_{k}/{source}': v for k, v in scores.items()})
  return results


def hand_retrieval(rows):
  """R@k from one row per clip (single-view rows), ranks counted by hand."""
  embeddings = sorted((index, e) for index, _, _, e in rows)
  video = np.stack([e['video'] for _, e in embeddings])
  audio = np.stack([e['audio'] for _, e in embeddings])
  results = {}
  for name, (q, g) in (('v2a', (video, audio)), ('a2v', (audio, video))):
    similarity = q @ g.T
    ranks = [sum(similarity[i, j] >= similarity[i, i] for j in range(len(g)) if j != i)
             for i in range(len(q))]
    results.update({f'retrieval/{name}_R@{k}': np.mean(np.array(ranks) < k)
                    for k in evaluate.RECALL_KS})
  return results


def test_scores_of_two_heads_each_modality_and_retrieval_match_a_hand_computation(setting):
  config, data_dir, model, params = setting
  mesh = sharding.make_mesh(config.mesh)
  score = evaluate.make_scorer(config, model, mesh, data_dir)
  scored = score(params, 'train')
  names = evaluate.score_names(config)
  assert set(scored.metrics) == {*names, 'num_videos'}
  assert names[:5] == ('action_top1', 'colour_top1', 'colour_top5', 'shape_top1', 'shape_top5')
  assert {'modality_action_top1/video', 'modality_colour_top1/audio', 'modality_shape_top1/video',
          'retrieval/v2a_R@1', 'retrieval/a2v_R@10'} <= set(names)

  rows = model_rows(config, data_dir, model, params)
  assert len(rows) == CLIPS * 3
  expected = hand_scores(rows)
  assert {k: scored.metrics[k] for k in expected} == pytest.approx(expected, abs=1e-9)
  assert scored.metrics['colour_top5'] == scored.metrics['shape_top5'] == 1.0  # <= 5 classes
  # Retrieval: one view per clip, the centre one (what eval_clips = eval_crops = 1 reads).
  centre = model_rows(config, data_dir, model, params, evaluate._single_view(config))
  assert len(centre) == CLIPS
  retrieval = hand_retrieval(centre)
  assert {k: scored.metrics[k] for k in retrieval} == pytest.approx(retrieval, abs=1e-9)

  # The training subset: the first SUBSET videos of the split in the reader's order.
  subset = score(params, 'train', SUBSET).metrics
  assert subset['num_videos'] == SUBSET
  expected = hand_scores(rows, SUBSET)
  assert {k: subset[k] for k in expected} == pytest.approx(expected, abs=1e-9)
  first = sorted(index for index, *_ in centre)[:SUBSET]
  assert {k: subset[k] for k in retrieval} == pytest.approx(
      hand_retrieval([r for r in centre if r[0] in first]), abs=1e-9)

  # Training's evaluator reports both, and checks its best metric against the same names.
  evaluation = train.make_evaluator(config, model, mesh, data_dir)(params)
  assert evaluation.metrics == pytest.approx(scored.metrics)
  assert evaluation.train_metrics == pytest.approx(subset)
  assert workdir_lib.check_eval_config(config) == ('action_top1', 'max')


def test_retrieval_only_without_a_classifier(setting):
  """Contrastive-only runs (no classifier) are evaluated by retrieval, headline v2a R@1."""
  config, data_dir, model, _ = setting
  config = config.copy_and_resolve_references()
  config.loss.weights.classification = 0.0
  config.input.eval_clips = 1
  *_, init = setup(config)
  params = random_params(jax.eval_shape(init, jax.random.PRNGKey(0)).params, seed=2)
  names = evaluate.score_names(config)
  assert names == tuple(f'retrieval/{d}_R@{k}' for d in ('v2a', 'a2v') for k in (1, 5, 10))
  assert workdir_lib.check_eval_config(config) == ('retrieval/v2a_R@1', 'max')
  scored = evaluate.make_scorer(config, build_model(config), sharding.make_mesh(config.mesh),
                                data_dir)(params, 'train')
  assert scored.videos is None and set(scored.metrics) == {*names, 'num_videos'}
  assert scored.metrics['num_videos'] == CLIPS
  for k in (1, 5, 10):  # R@k grows with k
    assert scored.metrics['retrieval/v2a_R@1'] <= scored.metrics[f'retrieval/v2a_R@{k}']



def test_calibration_scorer_gives_each_modality_s_view_averaged_logits(setting):
  """What the fusion calibration fits on (`calibration.modality_scorer`): per video, each modality's
  own logits averaged over its views, and the labels, in the reader's order."""
  config, data_dir, model, params = setting
  mesh = sharding.make_mesh(config.mesh)
  logits, labels = calibration.modality_scorer(config, model, mesh, data_dir, 'train')(params)
  assert set(logits) == {f'{m}/{h}' for m in ('video', 'audio') for h in HEADS}
  rows = model_rows(config, data_dir, model, params)
  order = list(dict.fromkeys(index for index, *_ in rows))
  for m in ('video', 'audio'):
    for h in HEADS:
      expected = [np.mean([out[m][h] for index, out, *_ in rows if index == video], axis=0)
                  for video in order]
      np.testing.assert_allclose(logits[f'{m}/{h}'], expected, atol=1e-5)
  for h in HEADS:
    expected = [next(lab[h] for index, _, lab, _ in rows if index == video) for video in order]
    np.testing.assert_array_equal(np.argmax(labels[h], -1), expected)


def test_held_out_reconstruction_starts_at_the_patch_mean_baseline(setting):
  """The decoders' zero-initialised prediction layer predicts 0 = the normalised patch mean, so
  an initialised model's held-out masked losses equal their baselines, each about 1."""
  config, data_dir, *_ = setting
  config = config.copy_and_resolve_references()
  for name in config.loss.weights:
    config.loss.weights[name] = 1.0 if name.startswith('masked') else 0.0
  config.input.eval_clips = 1
  names = evaluate.score_names(config)
  assert names[0] == 'reconstruction/masked_video'
  assert workdir_lib.check_eval_config(config) == ('reconstruction/masked_video', 'min')
  *_, init = setup(config)
  params = jax.jit(init)(jax.random.PRNGKey(0)).params
  scored = evaluate.make_scorer(config, build_model(config), sharding.make_mesh(config.mesh),
                                data_dir)(params, 'train')
  assert set(scored.metrics) == set(names)
  for name in ('masked_video', 'masked_audio', 'masked_audio_segment'):
    loss = scored.metrics[f'reconstruction/{name}']
    np.testing.assert_allclose(loss, scored.metrics[f'reconstruction/{name}_patch_mean'], rtol=1e-5)
    assert 0.9 < loss <= 1.0
