"""`python -m avt_jax.predict --embeddings=FILE`: each file's embeddings, equal to those of the same
clip's evaluation views from the prepared records (issue 22)."""

import os

import jax
import numpy as np
import pytest

from avt_jax import embeddings, input as input_lib, predict
from avt_jax.models import build_model
from test_use_workdir import CLIP, record_ids, setting  # noqa: F401  (module fixture)


def test_embeddings_file_equals_the_records_path(setting, tmp_path):  # noqa: F811
  config, params = setting['config'], setting['params']
  out = str(tmp_path / 'emb.npz')
  clip = os.path.join(setting['videos'], CLIP)
  assert predict.main(['--workdir', setting['workdir'], f'--embeddings={out}', clip,
                       str(tmp_path / 'missing.mp4')]) == 0
  saved = np.load(out)
  assert list(saved['paths']) == [clip]  # the failed file is left out

  position = record_ids(setting['data_dir']).index(CLIP)
  views = {m: [] for m in ('video', 'audio')}
  for batch in input_lib.make_eval_iterator(config, setting['data_dir'], 'test'):
    for m in views:
      views[m].extend(batch[m][batch['index'] == position])
  views = {m: np.stack(v) for m, v in views.items()}
  model = build_model(config)
  out = jax.device_get(model.apply({'params': params}, views, objectives=('contrastive', 'classification')))
  expected = {f'pre_fusion_{m}': out['features']['pre_fusion'][m].mean(0) for m in views}
  expected.update({f'final_{m}': out['features']['final'][m].mean(0) for m in views})
  for m in views:
    c = out['contrastive'][m].mean(0)
    expected[f'contrastive_{m}'] = c / np.linalg.norm(c)
  assert sorted(k for k in saved.files if k != 'paths') == sorted(expected)
  for key, value in expected.items():
    np.testing.assert_allclose(saved[key][0], value, rtol=1e-4, atol=1e-6, err_msg=key)
  assert saved['contrastive_video'].shape == (1, config.model.contrastive_dim)


def test_clip_embedding_ignores_padded_views():
  views = {'contrastive_video': np.array([[3.0, 0.0], [0.0, 4.0], [9.0, 9.0]]),
           'pre_fusion_video': np.array([[1.0, 2.0], [3.0, 4.0], [9.0, 9.0]])}
  got = embeddings.clip_embedding(views, np.array([1.0, 1.0, 0.0]))
  np.testing.assert_allclose(got['contrastive_video'], [0.6, 0.8], rtol=1e-6)  # (1.5, 2) / 2.5
  np.testing.assert_allclose(got['pre_fusion_video'], [2.0, 3.0])


def test_model_without_heads_is_refused():
  with pytest.raises(ValueError, match='neither contrastive projections nor a classifier'):
    embeddings.make_embed_step(None, ('video',), {'encoder': {}})
