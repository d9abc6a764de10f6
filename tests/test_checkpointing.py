"""Tests for avt_jax.checkpointing (orbax CheckpointManager wrapper, preemption)."""

import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import struct

from avt_jax import checkpointing

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  opt_state: optax.OptState
  rng: jax.Array  # typed key, jax.random.key
  raw_rng: jax.Array  # raw uint32 key, jax.random.PRNGKey


def make_state(seed: int = 0) -> TrainState:
  """A small train state after one adam update (non-trivial mu / nu / count)."""
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  params = {
      'encoder': {'kernel': jax.random.normal(k1, (4, 6)),
                  'bias': jnp.arange(6, dtype=jnp.bfloat16)},
      'head': {'kernel': jax.random.normal(k2, (6, 3))},
  }
  tx = optax.adam(1e-2)
  opt_state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  return TrainState(step=jnp.array(1, jnp.int32), params=params,
                    opt_state=opt_state, rng=jax.random.key(seed + 10),
                    raw_rng=jax.random.PRNGKey(seed + 20))


def abstract(tree):
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def as_numpy(tree):
  """Leaves as numpy, typed PRNG keys as their key data."""
  def leaf(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    return np.asarray(x)
  return jax.tree.map(leaf, tree)


def assert_trees_equal(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    assert a.dtype == e.dtype
    assert a.shape == e.shape
  for a, e in zip(jax.tree.leaves(as_numpy(actual)),
                  jax.tree.leaves(as_numpy(expected))):
    np.testing.assert_array_equal(a, e)


def test_round_trip_nested_state_adam_and_both_key_kinds(tmp_path):
  state = make_state()
  meta = {'input_position': [3, 17], 'rng': [1, 2], 'config': {'lr': 0.01},
          'done': False, 'note': None}
  with checkpointing.Checkpointer(tmp_path) as ckpt:
    assert ckpt.save(7, state, meta, force=True)
    ckpt.wait()
    restored, restored_meta = ckpt.restore(abstract(make_state(seed=5)))
  assert_trees_equal(restored, state)
  assert restored.rng.dtype == jax.random.key(0).dtype  # still a typed key
  assert restored.raw_rng.dtype == jnp.uint32
  assert restored_meta == meta
  # The restored keys work as keys.
  np.testing.assert_array_equal(
      jax.random.normal(restored.rng, (3,)), jax.random.normal(state.rng, (3,)))


def test_typed_key_impl_is_preserved(tmp_path):
  state = {'rng': jax.random.key(3, impl='rbg'), 'x': jnp.ones(2)}
  with checkpointing.Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, state, {}, force=True)
    ckpt.wait()
    restored, _ = ckpt.restore(abstract(state))
  assert str(restored['rng'].dtype) == 'key<rbg>'
  assert_trees_equal(restored, state)


def test_periodic_saves_keep_n_and_final_save(tmp_path):
  ckpt = checkpointing.Checkpointer(tmp_path, keep=2, save_every=2)
  state = {'w': jnp.zeros(3)}
  saved = [step for step in range(1, 8)
           if ckpt.save(step, {'w': state['w'] + step}, {'step': step})]
  ckpt.wait()
  assert saved == [2, 4, 6]
  assert ckpt.all_steps() == [4, 6]
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == ['4', '6']
  assert ckpt.latest_step() == 6
  # Final save off the period, and a repeated final save that is skipped.
  assert ckpt.save(7, {'w': state['w'] + 7}, {'step': 7}, force=True)
  assert not ckpt.save(7, {'w': state['w'] + 70}, {'step': 70}, force=True)
  ckpt.close()

  reopened = checkpointing.Checkpointer(tmp_path, keep=2, save_every=2)
  assert reopened.all_steps() == [6, 7]
  assert reopened.latest_step() == 7
  latest, meta = reopened.restore(abstract(state))
  np.testing.assert_array_equal(latest['w'], np.full(3, 7.0))
  assert meta == {'step': 7}
  older, meta = reopened.restore(abstract(state), step=6)
  np.testing.assert_array_equal(older['w'], np.full(3, 6.0))
  assert meta == {'step': 6}
  reopened.close()


def test_without_save_every_only_forced_saves_write(tmp_path):
  with checkpointing.Checkpointer(tmp_path) as ckpt:
    assert not any(ckpt.save(s, {'w': jnp.ones(1)}, {}) for s in range(5))
    assert ckpt.latest_step() is None
    assert ckpt.save(5, {'w': jnp.ones(1)}, {}, force=True)
    assert ckpt.latest_step() == 5


def test_restore_without_checkpoint_or_step_is_a_clear_error(tmp_path):
  with checkpointing.Checkpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() is None
    with pytest.raises(FileNotFoundError, match='No checkpoint to restore in'):
      ckpt.restore({'w': jax.ShapeDtypeStruct((1,), jnp.float32)})
    ckpt.save(3, {'w': jnp.ones(1)}, {}, force=True)
    ckpt.wait()
    with pytest.raises(FileNotFoundError, match=r'step 4 .*available steps: \[3\]'):
      ckpt.restore({'w': jax.ShapeDtypeStruct((1,), jnp.float32)}, step=4)


def test_meta_that_is_not_json_names_the_field(tmp_path):
  with checkpointing.Checkpointer(tmp_path) as ckpt:
    with pytest.raises(TypeError, match="meta field 'position'.*int64"):
      ckpt.save(1, {'w': jnp.ones(1)}, {'ok': 1, 'position': np.int64(3)},
                force=True)
    assert ckpt.latest_step() is None


def test_bad_options_are_rejected(tmp_path):
  with pytest.raises(ValueError, match='keep'):
    checkpointing.Checkpointer(tmp_path, keep=0)
  with pytest.raises(ValueError, match='save_every'):
    checkpointing.Checkpointer(tmp_path, save_every=0)


def test_unfinished_save_never_becomes_latest(tmp_path):
  with checkpointing.Checkpointer(tmp_path) as ckpt:
    ckpt.save(2, {'w': jnp.full(2, 2.0)}, {'step': 2}, force=True)
  # What a save killed before its final rename leaves behind: orbax writes each
  # step into '<step>.orbax-checkpoint-tmp' and renames it when complete.
  ckpt_dir = tmp_path / 'checkpoints'
  shutil.copytree(ckpt_dir / '2', ckpt_dir / '9.orbax-checkpoint-tmp')
  with checkpointing.Checkpointer(tmp_path) as ckpt:
    assert ckpt.all_steps() == [2]
    _, meta = ckpt.restore({'w': jax.ShapeDtypeStruct((2,), jnp.float32)})
    assert meta == {'step': 2}


_RESHARD_SCRIPT = textwrap.dedent('''
    import sys
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from avt_jax import checkpointing

    assert jax.device_count() == 8, jax.device_count()
    devices = np.array(jax.devices())
    mesh_a = Mesh(devices.reshape(4, 2), ('data', 'model'))
    mesh_b = Mesh(devices[::-1].reshape(2, 4), ('data', 'model'))

    def put(tree, mesh, spec):
      return jax.tree.map(
          lambda x: jax.device_put(x, NamedSharding(mesh, spec(x))), tree)

    def target(tree, mesh, spec):
      return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
          x.shape, x.dtype, sharding=NamedSharding(mesh, spec(x))), tree)

    spec_a = lambda x: P('data', 'model') if x.ndim == 2 else P()
    spec_b = lambda x: P('model', None) if x.ndim == 2 else P()
    params = {'kernel': jnp.arange(64.0).reshape(8, 8), 'bias': jnp.arange(8.0)}
    state = {'params': params, 'opt_state': optax.adam(0.1).init(params),
             'rng': jax.random.key(4), 'raw_rng': jax.random.PRNGKey(5)}
    state = put(state, mesh_a, spec_a)
    with checkpointing.Checkpointer(sys.argv[1]) as ckpt:
      ckpt.save(1, state, {'mesh': 'a'}, force=True)
      ckpt.wait()
      for mesh, spec in ((mesh_b, spec_b), (mesh_a, lambda x: P())):
        template = target(state, mesh, spec)
        restored, meta = ckpt.restore(template)
        assert meta == {'mesh': 'a'}, meta
        for got, want, tmpl in zip(jax.tree.leaves(restored),
                                   jax.tree.leaves(state),
                                   jax.tree.leaves(template)):
          assert got.sharding == tmpl.sharding, (got.sharding, tmpl.sharding)
          assert got.dtype == want.dtype
          if jax.dtypes.issubdtype(got.dtype, jax.dtypes.prng_key):
            got, want = jax.random.key_data(got), jax.random.key_data(want)
          np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
      # Leaves without a sharding are replicated on all devices.
      bare = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
      restored, _ = ckpt.restore(bare)
      for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        assert got.sharding.is_fully_replicated and len(got.devices()) == 8
        if jax.dtypes.issubdtype(got.dtype, jax.dtypes.prng_key):
          got, want = jax.random.key_data(got), jax.random.key_data(want)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    print('RESHARD_OK')
''')


def _subprocess_env() -> dict[str, str]:
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(
      [str(REPO_ROOT)] + ([env['PYTHONPATH']] if env.get('PYTHONPATH') else []))
  env['TF_CPP_MIN_LOG_LEVEL'] = '2'
  env['JAX_PLATFORMS'] = 'cpu'
  env.pop('XLA_FLAGS', None)  # one CPU device per process unless a test says
  return env


def test_restore_onto_a_different_mesh_and_sharding(tmp_path):
  env = _subprocess_env()
  env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
  result = subprocess.run(
      [sys.executable, '-c', _RESHARD_SCRIPT, str(tmp_path)], env=env,
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'RESHARD_OK' in result.stdout


_PREEMPTED_LOOP_SCRIPT = textwrap.dedent('''
    # Arguments: workdir [coordinator_port num_processes process_id]
    import sys, time
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    if len(sys.argv) > 2:
      port, num_processes, process_id = map(int, sys.argv[2:])
      jax.distributed.initialize(f'localhost:{port}', num_processes, process_id)
    from avt_jax import checkpointing

    checkpointing.install_preemption_handler()
    ckpt = checkpointing.Checkpointer(sys.argv[1], save_every=1000)
    mesh = Mesh(np.array(jax.devices()), ('data',))
    w = jax.device_put(jnp.zeros(4), NamedSharding(mesh, P('data')))
    step = 0
    deadline = time.time() + 60
    while time.time() < deadline:
      step += 1
      w = w + 1.0  # the "train step"
      if step == 3:
        print('READY', flush=True)
      if checkpointing.preemption_requested(step):
        ckpt.save(step, {'w': w}, {'step': step}, force=True)
        ckpt.close()
        print('SAVED', step, flush=True)
        sys.exit(0)
      time.sleep(0.01)
    sys.exit(3)  # never told to stop
''')


def _start_loop(workdir, *distributed_args):
  return subprocess.Popen(
      [sys.executable, '-c', _PREEMPTED_LOOP_SCRIPT, str(workdir),
       *map(str, distributed_args)],
      env=_subprocess_env(), cwd=REPO_ROOT, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True)


def _wait_until_ready(proc):
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if line.strip() == 'READY':
      return
  raise AssertionError('loop did not start:\n' + ''.join(lines)[-3000:])


def _saved_step(proc) -> int:
  """Waits for the process; returns the step it reports saving at."""
  rest, _ = proc.communicate(timeout=60)
  assert proc.returncode == 0, rest[-3000:]
  return int(rest.split('SAVED')[1].split()[0])


def _assert_checkpoint_of(workdir, step):
  with checkpointing.Checkpointer(workdir) as ckpt:
    assert ckpt.latest_step() == step
    state, meta = ckpt.restore({'w': jax.ShapeDtypeStruct((4,), jnp.float32)})
  assert meta == {'step': step}
  np.testing.assert_array_equal(state['w'], np.full(4, float(step)))


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
  proc = _start_loop(tmp_path)
  try:
    _wait_until_ready(proc)
    proc.send_signal(signal.SIGTERM)
    step = _saved_step(proc)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert step >= 3
  _assert_checkpoint_of(tmp_path, step)


def test_sigterm_to_one_process_of_a_distributed_job(tmp_path):
  """JAX's preemption service makes every process save at the same step."""
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  procs = [_start_loop(tmp_path, port, 2, i) for i in range(2)]
  try:
    for proc in procs:
      _wait_until_ready(proc)
    procs[1].send_signal(signal.SIGTERM)
    steps = [_saved_step(proc) for proc in procs]
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  assert steps[0] == steps[1] >= 3
  _assert_checkpoint_of(tmp_path, steps[0])


def test_best_checkpointer_keeps_the_best_and_reads_it_back(tmp_path):
  params = lambda v: {'w': jnp.full(2, v)}
  template = {'w': jax.ShapeDtypeStruct((2,), jnp.float32)}
  with checkpointing.BestCheckpointer(tmp_path, 'top1', 'max') as best:
    assert best.summary() is None
    assert best.update(2, params(2.0), {'top1': 0.5, 'num_videos': 9})
    assert not best.update(4, params(4.0), {'top1': 0.5, 'num_videos': 9})  # a tie keeps step 2
    assert best.update(6, params(6.0), {'top1': 0.75, 'num_videos': 9})
    assert not best.update(8, params(8.0), {'top1': 0.25, 'num_videos': 9})
    with pytest.raises(ValueError, match=r"'top1': not among the evaluation metrics \['mAP'\]"):
      best.update(10, params(10.0), {'mAP': 1.0})
  assert sorted(p.name for p in (tmp_path / 'best').iterdir()) == ['6']
  # A resumed run starts from the value on disk: a worse or equal later step is not saved.
  with checkpointing.BestCheckpointer(tmp_path, 'top1', 'max') as best:
    assert best.summary() == {'metric': 'top1', 'mode': 'max', 'step': 6, 'value': 0.75}
    assert not best.update(8, params(8.0), {'top1': 0.5, 'num_videos': 9})
    assert not best.update(6, params(-1.0), {'top1': 1.0, 'num_videos': 9})  # already compared
    restored, meta = best.restore(template)
  np.testing.assert_array_equal(restored['w'], np.full(2, 6.0))
  assert meta == {'metric': 'top1', 'mode': 'max', 'step': 6, 'value': 0.75,
                  'metrics': {'top1': 0.75, 'num_videos': 9}}
  # 'min' compares the other way; another metric is read from the saved step's metrics.
  with checkpointing.BestCheckpointer(tmp_path, 'num_videos', 'min') as best:
    assert best.value == 9
    assert best.update(12, params(12.0), {'top1': 0.0, 'num_videos': 8})
  with pytest.raises(ValueError, match=r"best metric 'mAP'.*step 12.*\['num_videos', 'top1'\]"):
    checkpointing.BestCheckpointer(tmp_path, 'mAP', 'max')


def test_best_checkpoint_is_apart_from_the_latest_rotation(tmp_path):
  state = lambda v: {'w': jnp.full(2, v)}
  with checkpointing.Checkpointer(tmp_path, keep=1, save_every=1) as ckpt, \
       checkpointing.BestCheckpointer(tmp_path, 'loss', checkpointing.infer_best_mode('loss')) as best:
    assert best.mode == 'min'
    for step, loss in enumerate([3.0, 1.0, 2.0, 2.5], start=1):
      ckpt.save(step, state(step), {})
      best.update(step, state(step), {'loss': loss})
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == ['4']
  assert sorted(p.name for p in (tmp_path / 'best').iterdir()) == ['2']
  assert checkpointing.infer_best_mode('top1') == 'max'


def test_a_failed_background_write_is_one_line_and_keeps_the_previous_step(tmp_path):
  """A file-size limit stands in for a full disk (Python ignores SIGXFSZ: the write gets EFBIG)."""
  import resource  # pylint: disable=g-import-not-at-top
  small = {'w': jnp.ones(4)}
  ckpt = checkpointing.Checkpointer(tmp_path)
  ckpt.save(1, small, {'step': 1}, force=True)
  ckpt.wait()
  limits = resource.getrlimit(resource.RLIMIT_FSIZE)
  resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, limits[1]))
  try:
    noise = jax.random.normal(jax.random.PRNGKey(0), (256 * 1024,))  # 1 MB that does not compress
    ckpt.save(2, {'w': noise}, {'step': 2}, force=True)
    with pytest.raises(checkpointing.CheckpointWriteError) as error:
      for _ in range(600):  # the write ends within seconds; polling never blocks on it
        ckpt.check_for_errors()
        time.sleep(0.05)
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, limits)
  message = str(error.value)
  assert '\n' not in message and str(tmp_path / 'checkpoints' / '2') in message
  assert 'File too large' in message
  ckpt.close()
  with checkpointing.Checkpointer(tmp_path) as again:
    assert again.all_steps() == [1]
    state, meta = again.restore(abstract(small))
  assert meta == {'step': 1}
  np.testing.assert_array_equal(state['w'], np.ones(4))


def test_read_only_leaves_writes_in_flight_alone(tmp_path):
  with checkpointing.Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, {'w': jnp.ones(4)}, {'step': 1}, force=True)
  in_flight = tmp_path / 'checkpoints' / '2.orbax-checkpoint-tmp'  # another process's write
  in_flight.mkdir()
  with checkpointing.Checkpointer(tmp_path, read_only=True) as reader:
    assert reader.all_steps() == [1]
    with pytest.raises(ValueError, match='read-only'):
      reader.save(3, {'w': jnp.ones(4)}, {'step': 3}, force=True)
  assert in_flight.exists()


def test_a_signal_inside_stop_on_preemption_abandons_the_work(monkeypatch):
  previous = signal.getsignal(signal.SIGTERM)
  monkeypatch.setattr(checkpointing, '_preemption_flag', threading.Event())
  checkpointing.install_preemption_handler()
  done = []
  try:
    with pytest.raises(checkpointing.Preempted):
      with checkpointing.stop_on_preemption():
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(100):  # work that never polls the flag
          time.sleep(0.05)
        done.append(True)
    assert not done and checkpointing.preemption_requested()
    with pytest.raises(checkpointing.Preempted):  # already requested: refused on entry
      with checkpointing.stop_on_preemption():
        done.append(True)
    assert not done
  finally:
    signal.signal(signal.SIGTERM, previous)


def test_a_save_that_waits_for_the_previous_write_prints_no_warning(tmp_path, monkeypatch, caplog):
  """Orbax warns when a save waited over 1 s for the write before it; ours wait by design."""
  from orbax.checkpoint import checkpoint_manager  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(checkpoint_manager, '_WAIT_FOR_PREV_SAVE_WARNING_THRESHOLD_SECS', -1.0)
  with caplog.at_level('WARNING'), checkpointing.Checkpointer(tmp_path) as ckpt:
    for step in (1, 2):
      assert ckpt.save(step, {'w': jnp.ones(3)}, {}, force=True)
  assert not [r for r in caplog.records if 'previous save' in r.getMessage()]
  assert ckpt.all_steps() == [1, 2]
