"""Multi-host training with real processes: `python -m avt_jax.main --multihost` as 2 processes x 2
simulated CPU devices (gloo collectives, coordinator on 127.0.0.1, cluster given by flags) against
1 process x 4 devices.

The training split is one record file (fewer files than processes: sharded by examples, so the
global batches equal the single process's); the test split is two files (sharded by files). One
module-scoped set of runs, two at a time (the 2-core CI machine compiles each program once):

- `reference`: 1 process, 12 steps, checkpoints every 2 steps, evaluation at step 12;
- `preempted`: the same on 2 processes, SIGTERM to process 1 after step 2: all save the same step
  and exit 0;
- `resumed_on_one`: the preempted workdir resumed by 1 process to step 12;
- `resumed_on_two`: the reference workdir cut back to step 4, resumed by 2 processes to step 12.

Losses, final parameters and evaluation metrics must equal the reference's. Tolerances: losses
rtol 1e-5 and parameters atol 1e-5 (the processes sum the batch in another order: float32
round-off; measured <= 1e-6 and 4e-6 after 10 steps); evaluation metrics rtol 1e-5. The runs train
with SGD: AdamW's first steps turn the round-off in near-zero gradients into full +-learning-rate
updates (6e-5 apart after one step, measured), which would test the optimizer's sensitivity rather
than the processes.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tensorflow as tf

from avt_jax import workdir as workdir_lib
from avt_jax.losses import SELF_SUPERVISED
from avt_jax.prep import demo_data
from conftest import TINY_MAIN_FLAGS, demo_main_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = 4  # in all, whatever the number of processes
STEPS = 12  # a few more than the steps SIGTERM takes to reach all processes
FLAGS = [f'--config.train.steps={STEPS}', '--config.optim.name=sgd',
         '--config.optim.learning_rate=0.05', '--config.train.log_every=1',
         '--config.train.checkpoint_every=2',
         '--config.train.keep_checkpoints=20', f'--config.train.eval_every={STEPS}',
         '--config.input.num_frames=4', '--config.input.image_size=32',
         '--config.input.min_resize=36', '--config.input.audio_frames=64',
         # 2 processes take the first 4 of their (interleaved) shares: the first 8 clips, like 1.
         '--config.eval.train_subset_size=8',
         *[f'--config.loss.weights.{o}=0' for o in SELF_SUPERVISED]]
TIMEOUT = 600


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  """Demo records: 18 training clips in one file, 9 test clips split over two files."""
  source = demo_data.ensure_demo_data(str(tmp_path_factory.mktemp('cache')), train_per_class=2,
                                      test_per_class=1, progress=False)
  folder = tmp_path_factory.mktemp('records')
  for name in ('stats.json', 'train-00000-of-00001.tfrecord'):
    shutil.copy(os.path.join(source, name), folder / name)
  test = list(tf.data.TFRecordDataset(os.path.join(source, 'test-00000-of-00001.tfrecord'))
              .as_numpy_iterator())
  for index, part in enumerate((test[:5], test[5:])):
    with tf.io.TFRecordWriter(str(folder / f'test-{index:05d}-of-00002.tfrecord')) as writer:
      for record in part:
        writer.write(record)
  return str(folder)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class Job:
  """`python -m avt_jax.main` as `num_processes` processes on one machine, logs in `workdir/..`."""

  def __init__(self, name: str, workdir, data_dir: str, num_processes: int):
    self.workdir = workdir
    # The pictures (drawn by process 0) only where there are several processes: a single process
    # drawing them is tested in tests/test_main.py.
    pictures = [] if num_processes > 1 else ['--config.train.eval_pictures=False']
    env = dict(os.environ, XLA_FLAGS=os.environ['XLA_FLAGS'].replace(
        'device_count=8', f'device_count={DEVICES // num_processes}'))
    cluster = []
    if num_processes > 1:
      cluster = ['--multihost', f'--coordinator_address=127.0.0.1:{_free_port()}',
                 f'--num_processes={num_processes}']
    self.logs = [workdir.parent / f'{name}-{i}.log' for i in range(num_processes)]
    self.processes = []
    for i, log in enumerate(self.logs):
      command = [sys.executable, '-m', 'avt_jax.main', '--config=configs/demo.py',
                 f'--workdir={workdir}', f'--config.data.data_dir={data_dir}', *TINY_MAIN_FLAGS,
                 *FLAGS, *pictures, *(cluster + [f'--process_id={i}'] if cluster else [])]
      with open(log, 'w') as out:
        self.processes.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=out,
                                               stderr=subprocess.STDOUT))

  def wait_for(self, pattern: str, process: int = 0) -> None:
    deadline = time.time() + TIMEOUT
    while not re.search(pattern, self.logs[process].read_text(), re.MULTILINE):
      assert self.processes[process].poll() is None, self.logs[process].read_text()[-3000:]
      assert time.time() < deadline, f'no {pattern!r} in {self.logs[process]}'
      time.sleep(0.2)

  def finish(self) -> list[str]:
    """Waits for every process; their outputs (each must exit with status 0)."""
    outputs = []
    for process, log in zip(self.processes, self.logs):
      code = process.wait(timeout=TIMEOUT)
      outputs.append(log.read_text())
      assert code == 0, f'{log} exited with {code}:\n{outputs[-1][-3000:]}'
    return outputs


@pytest.fixture(scope='module')
def runs(data_dir, tmp_path_factory):
  base = tmp_path_factory.mktemp('multihost')
  start = time.time()
  reference = Job('reference', base / 'reference', data_dir, 1)
  preempted = Job('preempted', base / 'preempted', data_dir, 2)
  preempted.wait_for(r'^step 2/')
  preempted.processes[1].send_signal(signal.SIGTERM)
  outputs = {'reference': reference.finish(), 'preempted': preempted.finish()}

  shutil.copytree(base / 'preempted', base / 'resumed_on_one')
  shutil.copytree(base / 'reference', base / 'resumed_on_two',
                  ignore=shutil.ignore_patterns('events.out.*', 'best', 'results.json'))
  for step in range(6, STEPS + 1, 2):
    shutil.rmtree(base / 'resumed_on_two' / 'checkpoints' / str(step))
  jobs = {'resumed_on_one': Job('resumed_on_one', base / 'resumed_on_one', data_dir, 1),
          'resumed_on_two': Job('resumed_on_two', base / 'resumed_on_two', data_dir, 2)}
  outputs.update({name: job.finish() for name, job in jobs.items()})
  print(f'multihost runs: {time.time() - start:.0f} s')
  return base, outputs


def _losses(workdir) -> dict[int, float]:
  """Step -> logged loss from the TensorBoard events (the latest write of a step wins)."""
  events = [event for path in tf.io.gfile.glob(str(workdir / 'events.out.tfevents.*'))
            for event in tf.compat.v1.train.summary_iterator(path)]
  losses = {}
  for event in sorted(events, key=lambda e: e.wall_time):
    for value in event.summary.value:
      if value.tag == 'loss':
        losses[event.step] = float(tf.make_ndarray(value.tensor))
  return losses


def _saved_step(output: str) -> int:
  return int(re.search(r'Preemption requested: saved step (\d+), exiting', output).group(1))


def _eval_line(output: str) -> str:
  line = re.search(rf'^eval step {STEPS}/{STEPS} \| (.*) \(9 videos\)', output, re.MULTILINE)
  return line.group(1)


def test_sigterm_to_one_process_saves_the_same_step_on_all(runs):
  base, outputs = runs
  saved = [_saved_step(output) for output in outputs['preempted']]
  assert saved[0] == saved[1] and 2 <= saved[0] < STEPS, saved
  steps = sorted(int(p.name) for p in (base / 'preempted' / 'checkpoints').iterdir())
  assert steps[-1] == saved[0]


def test_two_processes_train_like_one_with_four_devices(runs):
  base, outputs = runs
  reference = _losses(base / 'reference')
  assert sorted(reference) == list(range(1, STEPS + 1))
  saved = _saved_step(outputs['preempted'][0])
  for name, steps in [('preempted', range(1, saved + 1)), ('resumed_on_one', range(1, STEPS + 1)),
                      ('resumed_on_two', range(5, STEPS + 1))]:
    losses = _losses(base / name)
    assert sorted(losses) == list(steps), name
    np.testing.assert_allclose([losses[s] for s in sorted(losses)],
                               [reference[s] for s in sorted(losses)], rtol=1e-5, err_msg=name)


def test_resumed_on_another_process_count_ends_with_the_same_parameters(runs):
  base, outputs = runs
  config = demo_main_config(*FLAGS)
  reference = workdir_lib.restore_params(config, str(base / 'reference'))
  for name in ('resumed_on_one', 'resumed_on_two'):
    assert 'Resumed from' in outputs[name][0]
    params = workdir_lib.restore_params(config, str(base / name))
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0), params,
                           reference)


def test_evaluation_counts_every_video_once_and_agrees_on_all_processes(runs):
  base, outputs = runs
  for split, videos in (('eval', 9), ('train_eval', 8)):  # train_eval: the training subset
    reference = json.loads((base / 'reference' / 'results.json').read_text())[split]
    assert reference['num_videos'] == videos
    for name in ('resumed_on_one', 'resumed_on_two'):
      results = json.loads((base / name / 'results.json').read_text())[split]
      assert results.keys() == reference.keys()
      np.testing.assert_allclose([results[k] for k in reference], list(reference.values()),
                                 rtol=1e-5, err_msg=f'{name} {split}')
  lines = [_eval_line(output) for output in outputs['resumed_on_two']]
  assert lines[0] == lines[1] == _eval_line(outputs['reference'][0])


def test_cluster_flags_need_multihost_and_valid_values():
  from avt_jax import main  # pylint: disable=g-import-not-at-top
  unset = dict(coordinator_address=None, num_processes=None, process_id=None,
               local_device_ids=None)
  assert main.distributed_args(multihost=False, **unset) is None
  assert main.distributed_args(multihost=True, **unset) == {}  # JAX detects the cluster
  assert main.distributed_args(
      multihost=True, **dict(unset, coordinator_address='10.0.0.1:1234', num_processes=2,
                             process_id=1, local_device_ids=['0', '1'])) == dict(
                                 coordinator_address='10.0.0.1:1234', num_processes=2,
                                 process_id=1, local_device_ids=[0, 1])
  for multihost, given, message in [
      (False, dict(num_processes=2, process_id=0), '--num_processes, --process_id given without '
                                                  '--multihost'),
      (True, dict(num_processes=0), '--num_processes must be >= 1, got 0'),
      (True, dict(num_processes=2, process_id=2), r'--process_id must be in \[0, '
                                                  r'--num_processes=2\), got 2'),
      (True, dict(local_device_ids=['gpu0']), "--local_device_ids: expected comma-separated "
                                              "integers, got 'gpu0'")]:
    with pytest.raises(ValueError, match=message):
      main.distributed_args(multihost=multihost, **dict(unset, **given))
