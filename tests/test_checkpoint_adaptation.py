"""Tests for avt_jax.checkpoint_adaptation: restoring a checkpoint into a changed config."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avt_jax import checkpoint_adaptation, checkpointing
from avt_jax.models import scan
from avt_jax.models.tokenizers import resize_posemb
from avt_jax.train_step import setup
from conftest import tiny_config

@functools.lru_cache
def _abstract_avt_state(overrides=()):
  *_, init = setup(tiny_config(**dict(overrides)))
  return jax.eval_shape(init, jax.random.PRNGKey(0))


@functools.lru_cache
def _avt_state(overrides, seed):
  """A tiny AVT train state with random values everywhere (no compilation): the values tell where
  each restored array came from. `overrides`: (config field, value) pairs for `tiny_config`."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda x: jnp.asarray(rng.integers(1, 9, x.shape).astype(x.dtype) if
                            jnp.issubdtype(x.dtype, jnp.integer) else rng.normal(size=x.shape), x.dtype),
      _abstract_avt_state(overrides))


def _save_avt(workdir, overrides=(), with_config=True):
  state = _avt_state(overrides, seed=0)
  config = tiny_config(**dict(overrides))
  snapshot = checkpoint_adaptation.config_snapshot(config)
  meta = {'step': 3, **({'config': snapshot} if with_config else {})}
  with checkpointing.Checkpointer(workdir) as ckpt:
    ckpt.save(3, state, meta, force=True)
  return state


def _restore_avt(workdir, overrides=(), **kwargs):
  with checkpointing.Checkpointer(workdir) as ckpt:
    return checkpoint_adaptation.restore_adapted(ckpt, _abstract_avt_state(overrides),
                                                 init=lambda: _avt_state(overrides, seed=1),
                                                 config=tiny_config(**dict(overrides)), **kwargs)


def _leaves(tree):
  return {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _assert_same(actual, expected, skip=()):
  actual, expected = _leaves(actual), _leaves(expected)
  assert sorted(actual) == sorted(expected)
  for key, value in expected.items():
    if not any(s in key for s in skip):
      np.testing.assert_array_equal(actual[key], value, err_msg=key)


def test_restore_with_the_same_config_adapts_nothing(tmp_path):
  saved = _save_avt(tmp_path)
  state, meta, notes = _restore_avt(tmp_path)
  assert notes == [] and meta['step'] == 3
  _assert_same(state, saved)


@pytest.mark.parametrize('saved_scanned', [False, True])
def test_restore_converts_between_scanned_and_unrolled_layers(tmp_path, saved_scanned):
  saved = _save_avt(tmp_path, (('model.scan_layers', saved_scanned),))
  state, _, notes = _restore_avt(tmp_path, (('model.scan_layers', not saved_scanned),))
  layout = 'scanned' if saved_scanned else 'unrolled'
  assert notes == [f'converted the encoder layers from the {layout} layout']
  expected = (scan.scanned_to_unrolled(saved) if saved_scanned
              else scan.unrolled_to_scanned(saved, fusion_start=1))  # params and Adam moments
  _assert_same(state, expected)


def test_restore_resizes_position_embeddings_to_a_new_token_grid(tmp_path):
  saved = _save_avt(tmp_path)  # 64 audio frames: a 4 x 2 patch grid
  longer = (('input.audio_frames', 128),)  # 8 x 2
  state, _, notes = _restore_avt(tmp_path, longer)
  resized = ['posembed_audio', 'decoder_audio', 'segment_decoder']
  assert len(notes) == 3 and all('token grid' in note for note in notes)
  for name in ('posembed_audio',):
    np.testing.assert_array_equal(state.params[name]['posembed_input'],
                                  resize_posemb(saved.params[name]['posembed_input'], (8, 2)))
  assert state.params['decoder_audio']['decoder_posembed']['posembed_input'].shape == (1, 8, 2, 16)
  fresh = _avt_state(longer, seed=1)  # the Adam moments of the resized arrays start afresh
  np.testing.assert_array_equal(state.opt_state[1][0].mu['posembed_audio']['posembed_input'],
                                fresh.opt_state[1][0].mu['posembed_audio']['posembed_input'])
  _assert_same(state, saved, skip=resized)


def test_restore_drops_or_initialises_the_branches_of_objectives_switched_off_or_on(tmp_path):
  without = (('loss.weights.masked_video', 0.0),)
  saved = _save_avt(tmp_path / 'all')
  state, _, notes = _restore_avt(tmp_path / 'all', without)
  assert notes == ['dropped the parameters not in the config: decoder_video']
  assert 'decoder_video' not in state.params
  _assert_same(state.params, {k: v for k, v in saved.params.items() if k != 'decoder_video'})

  _save_avt(tmp_path / 'without', without)
  state, _, notes = _restore_avt(tmp_path / 'without')
  assert notes == ['initialised the parameters not in the checkpoint: decoder_video']
  _assert_same(state.params['decoder_video'], _avt_state((), seed=1).params['decoder_video'])


def test_restore_that_cannot_adapt_names_the_config_field_in_one_line(tmp_path):
  _save_avt(tmp_path)
  with pytest.raises(checkpoint_adaptation.IncompatibleCheckpointError) as error:
    _restore_avt(tmp_path, (('model.hidden_size', 64), ('model.scan_layers', True)))
  message = str(error.value)
  assert '\n' not in message and len(message) < 400, message
  assert 'config.model.hidden_size is 32 in the checkpoint and 64 now' in message
  assert 'scan_layers' not in message  # adapted, so not the cause


def test_restore_after_an_optimizer_change_needs_fresh_optimizer_state(tmp_path):
  saved = _save_avt(tmp_path)
  sgd = (('optim.name', 'sgd'),)
  with pytest.raises(checkpoint_adaptation.IncompatibleCheckpointError,
                     match="config.optim.name is 'adamw' in the checkpoint and 'sgd' now"):
    _restore_avt(tmp_path, sgd)  # training would go on with another optimizer's state
  state, _, notes = _restore_avt(tmp_path, sgd, fresh_ok=('opt_state',))  # e.g. evaluating
  assert notes == ['initialised opt_state afresh']
  _assert_same(state.params, saved.params)


def test_restore_of_a_checkpoint_without_its_config_names_the_array(tmp_path):
  _save_avt(tmp_path, with_config=False)
  with pytest.raises(checkpoint_adaptation.IncompatibleCheckpointError,
                     match=r'the saved state differs \(\d+ arrays differ, e.g. \w+/.*: \(.*\) in the '
                           r'checkpoint, \(.*\) now\)'):
    _restore_avt(tmp_path, (('model.mlp_dim', 48),))
