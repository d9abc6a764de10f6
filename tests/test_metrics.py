"""Tests for avt_jax.metrics against scikit-learn and hand-computed cases."""

import numpy as np
import pytest
from sklearn import metrics as skm

from avt_jax import metrics


def softmax(x):
  e = np.exp(x - x.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


# ----------------------------------------------------------------------------
# top_k_accuracy


@pytest.mark.parametrize('k', [1, 3, 5])
def test_top_k_accuracy_matches_sklearn(k):
  rng = np.random.default_rng(k)
  logits = rng.normal(size=(300, 10))
  labels = rng.integers(0, 10, size=300)
  expected = skm.top_k_accuracy_score(labels, logits, k=k, labels=np.arange(10))
  assert metrics.top_k_accuracy(logits, labels, k) == pytest.approx(expected)


def test_top_k_accuracy_hand_computed():
  logits = np.array([[0.1, 0.5, 0.4],
                     [1.0, 0.0, 0.0],
                     [0.2, 0.3, 0.5]])
  labels = np.array([2, 0, 0])
  assert metrics.top_k_accuracy(logits, labels, 1) == pytest.approx(1 / 3)
  assert metrics.top_k_accuracy(logits, labels, 2) == pytest.approx(2 / 3)
  assert metrics.top_k_accuracy(logits, labels, 3) == 1.0
  assert metrics.top_k_accuracy(logits, labels, 5) == 1.0  # k > classes


def test_top_k_ties_count_against_the_label():
  logits = np.array([[1.0, 1.0, 0.0],   # label tied with class 1
                     [0.0, 0.0, 0.0]])  # constant row
  labels = np.array([0, 2])
  assert metrics.top_k_accuracy(logits, labels, 1) == 0.0
  assert metrics.top_k_accuracy(logits, labels, 2) == 0.5
  assert metrics.top_k_accuracy(logits, labels, 3) == 1.0


@pytest.mark.parametrize('logits, labels, k, match', [
    (np.zeros((2, 3)), np.array([0, 3]), 1, r'class ids in \[0, 3\)'),
    (np.zeros((2, 3)), np.array([0, -1]), 1, r'class ids in \[0, 3\)'),
    (np.zeros((2, 3)), np.array([0, 1, 2]), 1, r'labels: expected shape \[2\]'),
    (np.zeros((2, 3)), np.array([0.0, 1.0]), 1, 'integer class ids'),
    (np.zeros(3), np.array([0]), 1, r'logits: expected shape \[N, C\]'),
    (np.zeros((0, 3)), np.zeros(0, int), 1, 'at least one sample'),
    (np.zeros((2, 3)), np.array([0, 1]), 0, 'k: expected >= 1'),
])
def test_top_k_accuracy_rejects_bad_input(logits, labels, k, match):
  with pytest.raises(ValueError, match=match):
    metrics.top_k_accuracy(logits, labels, k)


# ----------------------------------------------------------------------------
# average precision


@pytest.mark.parametrize('quantize', [False, True])
def test_mean_average_precision_matches_sklearn(quantize):
  rng = np.random.default_rng(7)
  scores = rng.normal(size=(80, 6))
  if quantize:  # many tied scores
    scores = np.round(scores)
  targets = (rng.random((80, 6)) < 0.3).astype(np.int32)
  targets[0] = 1  # every class has a positive
  expected = skm.average_precision_score(targets, scores, average='macro')
  assert metrics.mean_average_precision(scores, targets) == pytest.approx(expected)


def test_mean_average_precision_skips_classes_without_positives():
  rng = np.random.default_rng(8)
  scores = rng.normal(size=(50, 5))
  targets = (rng.random((50, 5)) < 0.4).astype(np.int32)
  targets[0] = 1
  targets[:, 2] = 0
  expected = np.mean([skm.average_precision_score(targets[:, c], scores[:, c])
                      for c in (0, 1, 3, 4)])
  assert metrics.mean_average_precision(scores, targets) == pytest.approx(expected)


def test_average_precision_hand_computed():
  # Ranked: +, -, +, -  ->  precision at the positives: 1/1 and 2/3.
  scores = np.array([0.9, 0.8, 0.7, 0.6])
  assert metrics.average_precision(scores, np.array([1, 0, 1, 0])) == (
      pytest.approx((1 + 2 / 3) / 2))
  # A tie of one positive and one negative is a single threshold: P = 1/2.
  assert metrics.average_precision(np.array([0.5, 0.5]), np.array([1, 0])) == 0.5
  # Two classes: AP 1 and AP 1/2 (the positive ranked second).
  scores2 = np.array([[0.9, 0.9], [0.1, 0.1]])
  targets2 = np.array([[1, 0], [0, 1]])
  assert metrics.mean_average_precision(scores2, targets2) == pytest.approx(0.75)


def test_mean_average_precision_rejects_bad_input():
  with pytest.raises(ValueError, match='no class has a positive'):
    metrics.mean_average_precision(np.zeros((3, 2)), np.zeros((3, 2)))
  with pytest.raises(ValueError, match=r'targets: expected shape \(3, 2\)'):
    metrics.mean_average_precision(np.zeros((3, 2)), np.zeros((3, 3)))
  with pytest.raises(ValueError, match='multi-hot'):
    metrics.mean_average_precision(np.zeros((2, 2)), np.full((2, 2), 0.5))


# ----------------------------------------------------------------------------
# Several label heads (EPIC-Kitchens verb + noun, or any others)


def test_multi_head_accuracies_hand_computed():
  eye6 = np.eye(6)
  logits = {'verb': eye6[[0, 1, 2, 3]],  # predicts 0, 1, 2, 3
            'noun': eye6[[4, 4, 5, 5]]}  # predicts 4, 4, 5, 5
  labels = {'verb': np.array([0, 1, 2, 0]),  # right, right, right, wrong
            'noun': np.array([0, 4, 5, 5])}  # wrong, right, right, right
  result = metrics.multi_head_accuracies(logits, labels)
  assert result == pytest.approx({
      'verb_top1': 0.75, 'noun_top1': 0.75,
      'action_top1': 0.5,  # samples 1 and 2
      # Top-5 of 6 with one-hot logits: ties at 0 count against, so a wrong
      # top-1 with the label among five zeros is still outside the top 5.
      'verb_top5': 0.75, 'noun_top5': 0.75})
  assert list(result) == list(metrics.score_names('multi_head', ('verb', 'noun')))


def test_multi_head_accuracies_any_heads_hand_computed():
  """Three heads not called verb/noun: the joint score needs all three right."""
  eye3 = np.eye(3)
  logits = {'colour': eye3[[0, 1, 2, 0]], 'shape': eye3[[1, 1, 1, 1]], 'size': eye3[[2, 2, 0, 0]]}
  labels = {'colour': np.array([0, 1, 2, 1]),  # right, right, right, wrong
            'shape': np.array([1, 1, 0, 1]),  # right, right, wrong, right
            'size': np.array([2, 0, 0, 0])}  # right, wrong, right, right
  result = metrics.multi_head_accuracies(logits, labels)
  assert result == pytest.approx({
      'action_top1': 0.25,  # only sample 0
      'colour_top1': 0.75, 'shape_top1': 0.75, 'size_top1': 0.75,
      'colour_top5': 1.0, 'shape_top5': 1.0, 'size_top5': 1.0})  # 5 >= 3 classes
  assert metrics.score_names('multi_head', ('colour', 'shape', 'size')) == (
      'action_top1', 'colour_top1', 'colour_top5', 'shape_top1', 'shape_top5', 'size_top1',
      'size_top5')
  assert metrics.modality_score_names('multi_head', ('colour', 'shape')) == (
      'action_top1', 'colour_top1', 'shape_top1')


def test_multi_head_accuracies_match_sklearn_on_random_data():
  rng = np.random.default_rng(3)
  logits = {'verb': rng.normal(size=(100, 8)), 'noun': rng.normal(size=(100, 12))}
  labels = {'verb': rng.integers(0, 8, 100), 'noun': rng.integers(0, 12, 100)}
  result = metrics.multi_head_accuracies(logits, labels)
  both = (logits['verb'].argmax(1) == labels['verb']) & (logits['noun'].argmax(1) == labels['noun'])
  assert result['action_top1'] == pytest.approx(both.mean())
  assert result['verb_top5'] == pytest.approx(
      skm.top_k_accuracy_score(labels['verb'], logits['verb'], k=5))
  assert result['noun_top1'] == pytest.approx(
      skm.top_k_accuracy_score(labels['noun'], logits['noun'], k=1))


def test_multi_head_accuracies_rejects_bad_input():
  with pytest.raises(ValueError, match=r"logits\['noun'\]: expected 3 rows"):
    metrics.multi_head_accuracies({'verb': np.zeros((3, 5)), 'noun': np.zeros((2, 5))},
                                  {'verb': np.zeros(3, int), 'noun': np.zeros(2, int)})
  with pytest.raises(ValueError, match=r"labels\['noun'\]: expected class ids in \[0, 5\)"):
    metrics.multi_head_accuracies({'verb': np.zeros((2, 5)), 'noun': np.zeros((2, 5))},
                                  {'verb': np.zeros(2, int), 'noun': np.array([0, 5])})
  with pytest.raises(ValueError, match='two or more heads'):
    metrics.multi_head_accuracies({'verb': np.zeros((2, 5))}, {'verb': np.zeros(2, int)})


# ----------------------------------------------------------------------------
# retrieval_recall


def test_retrieval_recall_hand_computed_with_ties():
  # Similarities (queries x gallery), partner on the diagonal:
  #   q0: [0.9, 0.1, 0.0, 0.0]  partner best                -> rank 0
  #   q1: [0.5, 0.5, 0.2, 0.0]  tie with g0 counts against  -> rank 1
  #   q2: [0.3, 0.4, 0.2, 0.1]  g0 and g1 higher             -> rank 2
  #   q3: [0.0, 0.0, 0.0, 0.0]  all tied: 3 others >= it     -> rank 3
  similarity = np.array([[0.9, 0.1, 0.0, 0.0], [0.5, 0.5, 0.2, 0.0],
                         [0.3, 0.4, 0.2, 0.1], [0.0, 0.0, 0.0, 0.0]])
  queries, gallery = similarity, np.eye(4)  # queries @ gallery.T == similarity
  result = metrics.retrieval_recall(queries, gallery, ks=(1, 2, 3, 4, 10))
  assert result == pytest.approx({'R@1': 0.25, 'R@2': 0.5, 'R@3': 0.75, 'R@4': 1.0, 'R@10': 1.0})


def test_retrieval_recall_matches_a_sorting_reference_in_chunks(monkeypatch):
  monkeypatch.setattr(metrics, '_RETRIEVAL_CHUNK', 7)  # several chunks
  rng = np.random.default_rng(4)
  queries, gallery = rng.normal(size=(30, 5)), rng.normal(size=(30, 5))
  order = np.argsort(-(queries @ gallery.T), axis=1)  # no ties in random data
  ranks = np.array([list(row).index(i) for i, row in enumerate(order)])
  result = metrics.retrieval_recall(queries, gallery)
  assert result == pytest.approx({f'R@{k}': np.mean(ranks < k) for k in (1, 5, 10)})


def test_retrieval_recall_rejects_bad_input():
  with pytest.raises(ValueError, match=r'gallery: expected shape \(3, 4\)'):
    metrics.retrieval_recall(np.zeros((3, 4)), np.zeros((2, 4)))
  with pytest.raises(ValueError, match='ks: expected values >= 1'):
    metrics.retrieval_recall(np.zeros((3, 4)), np.zeros((3, 4)), ks=(0,))


# ----------------------------------------------------------------------------
# MultiViewAccumulator


def make_views(rng, num_videos, num_views, heads, multi_hot=False):
  """Random logits of 1..num_views views per video, views in shuffled order."""
  rows = np.repeat(np.arange(num_videos),
                   rng.integers(1, num_views + 1, num_videos))
  rows = rows[rng.permutation(len(rows))]
  index = rows * 10 + 3  # video ids need not be contiguous
  logits, labels = {}, {}
  for head, classes in heads.items():
    logits[head] = rng.normal(size=(len(rows), classes))
    if multi_hot:
      video_labels = (rng.random((num_videos, classes)) < 0.3).astype(np.float32)
      video_labels[0] = 1
    else:
      video_labels = np.eye(classes, dtype=np.float32)[
          rng.integers(0, classes, num_videos)]
    labels[head] = video_labels[rows]
  mean_logits = {h: np.stack([l[rows == v].mean(0) for v in range(num_videos)])
                 for h, l in logits.items()}
  video_labels = {h: np.stack([l[rows == v][0] for v in range(num_videos)])
                  for h, l in labels.items()}
  return index, logits, labels, mean_logits, video_labels


def feed(acc, index, logits, labels, batch, rng):
  """Adds rows in batches of `batch`, padding the last; padding is garbage."""
  for start in range(0, len(index), batch):
    part = slice(start, start + batch)
    size = len(index[part])
    pad = batch - size
    # Padding rows reuse a real video id and carry huge logits and other labels.
    pad_index = np.full(pad, index[0])
    acc.add({h: np.concatenate([l[part], 1e6 * rng.normal(size=(pad, l.shape[1]))])
             for h, l in logits.items()},
            {h: np.concatenate([l[part], np.ones((pad, l.shape[1]))])
             for h, l in labels.items()},
            np.concatenate([index[part], pad_index]),
            np.concatenate([np.ones(size), np.zeros(pad)]))


def test_single_label_averages_view_logits_and_ignores_padding():
  rng = np.random.default_rng(0)
  index, logits, labels, mean_logits, video_labels = make_views(
      rng, num_videos=40, num_views=3, heads={'label': 7})
  acc = metrics.MultiViewAccumulator()
  feed(acc, index, logits, labels, batch=16, rng=rng)
  result = acc.result('single_label')
  assert set(result) == {*metrics.score_names('single_label'), 'num_videos'}
  ids = video_labels['label'].argmax(1)
  assert result['num_videos'] == 40
  assert result['top1'] == pytest.approx(
      skm.top_k_accuracy_score(ids, mean_logits['label'], k=1,
                               labels=np.arange(7)))
  assert result['top5'] == pytest.approx(
      skm.top_k_accuracy_score(ids, mean_logits['label'], k=5,
                               labels=np.arange(7)))
  assert result['mAP'] == pytest.approx(skm.average_precision_score(
      video_labels['label'], mean_logits['label'], average='macro'))


def test_views_are_averaged_as_logits_hand_computed():
  # Mean logits [-4, 0.5, -5] pick class 1; mean softmax probabilities would
  # pick class 0 ([0.44, 0.43, 0.13]).
  logits = np.array([[2.0, 0.0, -10.0],
                     [-10.0, 1.0, 0.0]])
  assert softmax(logits).mean(0).argmax() == 0
  acc = metrics.MultiViewAccumulator()
  one_hot = np.array([[0, 1, 0], [0, 1, 0]])
  acc.add({'label': logits[:1]}, {'label': one_hot[:1]}, np.array([5]),
          np.array([1]))
  acc.add({'label': logits[1:]}, {'label': one_hot[1:]}, np.array([5]),
          np.array([1]))
  assert acc.result('single_label') == {'top1': 1.0, 'top5': 1.0, 'mAP': 1.0,
                                        'num_videos': 1}


def test_multi_label_map_matches_sklearn_on_averaged_logits():
  rng = np.random.default_rng(1)
  index, logits, labels, mean_logits, video_labels = make_views(
      rng, num_videos=30, num_views=4, heads={'labels': 5}, multi_hot=True)
  acc = metrics.MultiViewAccumulator()
  feed(acc, index, logits, labels, batch=7, rng=rng)
  result = acc.result('multi_label')
  assert set(result) == {*metrics.score_names('multi_label'), 'num_videos'}
  assert result['num_videos'] == 30
  assert result['mAP'] == pytest.approx(skm.average_precision_score(
      video_labels['labels'], mean_logits['labels'], average='macro'))


def test_multi_head_matches_multi_head_accuracies_on_averaged_logits():
  rng = np.random.default_rng(2)
  index, logits, labels, mean_logits, video_labels = make_views(
      rng, num_videos=25, num_views=2, heads={'verb': 6, 'noun': 9})
  acc = metrics.MultiViewAccumulator()
  feed(acc, index, logits, labels, batch=8, rng=rng)
  result = acc.result('multi_head')
  assert set(result) == {*metrics.score_names('multi_head', ('verb', 'noun')), 'num_videos'}
  expected = metrics.multi_head_accuracies(
      mean_logits, {h: video_labels[h].argmax(1) for h in ('verb', 'noun')})
  assert result == pytest.approx({**expected, 'num_videos': 25})
  both = ((mean_logits['verb'].argmax(1) == video_labels['verb'].argmax(1))
          & (mean_logits['noun'].argmax(1) == video_labels['noun'].argmax(1)))
  assert result['action_top1'] == pytest.approx(both.mean())


def test_same_video_twice_in_one_batch_and_across_batches():
  acc = metrics.MultiViewAccumulator()
  labels = np.array([[1, 0], [1, 0], [0, 1]])
  acc.add({'x': np.array([[1.0, 0.0], [0.0, 3.0], [0.0, 1.0]])}, {'x': labels},
          np.array([4, 4, 9]), np.array([1, 1, 1]))
  # Video 4: mean of [1, 0], [0, 3], [2, 0] = [1, 1] -> tie, counted wrong.
  acc.add({'x': np.array([[2.0, 0.0]])}, {'x': labels[:1]}, np.array([4]),
          np.array([True]))
  # mAP: class 0 ranks video 4 first (AP 1); class 1 ties videos 4 and 9 (AP 1/2).
  assert acc.result('single_label') == {'top1': 0.5, 'top5': 1.0, 'mAP': 0.75,
                                        'num_videos': 2}


def test_views_with_different_labels_are_rejected_without_side_effects():
  acc = metrics.MultiViewAccumulator()
  acc.add({'x': np.zeros((1, 3))}, {'x': np.array([[0, 1, 0]])}, np.array([2]),
          np.array([1]))
  with pytest.raises(ValueError, match=r"labels\['x'\]: video 2 has views"):
    acc.add({'x': np.ones((2, 3))}, {'x': np.array([[1, 0, 0], [0, 0, 1]])},
            np.array([7, 2]), np.array([1, 1]))
  with pytest.raises(ValueError, match=r"labels\['x'\]: video 8 has views"):
    acc.add({'x': np.ones((2, 3))}, {'x': np.array([[1, 0, 0], [0, 0, 1]])},
            np.array([8, 8]), np.array([1, 1]))
  # Neither rejected batch left anything behind.
  assert acc.num_videos == 1
  assert acc.result('single_label')['top1'] == 0.0  # zero logits: a tie


def test_accumulator_rejects_bad_input():
  acc = metrics.MultiViewAccumulator()
  with pytest.raises(ValueError, match='no \\(unmasked\\) views'):
    acc.result('single_label')
  acc.add({'x': np.zeros((2, 3))}, {'x': np.eye(3)[:2]}, np.array([0, 1]),
          np.array([0, 0]))
  assert acc.num_videos == 0  # all padding
  with pytest.raises(ValueError, match="kind: expected one of"):
    acc.result('top1')
  with pytest.raises(ValueError, match=r"labels\['x'\]: expected shape \(2, 3\)"):
    acc.add({'x': np.zeros((2, 3))}, {'x': np.zeros(2)}, np.array([0, 1]),
            np.array([1, 1]))
  with pytest.raises(ValueError, match='labels: expected the heads'):
    acc.add({'x': np.zeros((2, 3))}, {'y': np.eye(3)[:2]}, np.array([0, 1]),
            np.array([1, 1]))
  with pytest.raises(ValueError, match='index, mask: expected two'):
    acc.add({'x': np.zeros((2, 3))}, {'x': np.eye(3)[:2]}, np.array([0, 1]),
            np.array([1]))
  with pytest.raises(ValueError, match='as in earlier batches'):
    acc.add({'x': np.zeros((2, 4))}, {'x': np.eye(4)[:2]}, np.array([0, 1]),
            np.array([1, 1]))
  acc.add({'x': np.zeros((1, 3))}, {'x': np.array([[1, 1, 0]])}, np.array([0]),
          np.array([1]))
  with pytest.raises(ValueError, match=r"labels\['x'\]: expected one-hot"):
    acc.result('single_label')
  with pytest.raises(ValueError, match="kind 'multi_head': expected two or more heads"):
    acc.result('multi_head')


def test_single_label_kinds_need_exactly_one_head():
  acc = metrics.MultiViewAccumulator()
  acc.add({'verb': np.zeros((1, 2)), 'noun': np.zeros((1, 2))},
          {'verb': np.eye(2)[:1], 'noun': np.eye(2)[:1]}, np.array([0]),
          np.array([1]))
  with pytest.raises(ValueError, match="kind 'single_label': expected one head"):
    acc.result('single_label')
