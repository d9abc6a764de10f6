"""Tests for avt_jax.workdir_lock: one training run per workdir, stale locks taken over."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from avt_jax import workdir_lock


def _write_lock(workdir, host, pid, age=0.0):
  path = workdir / workdir_lock.LOCK_FILE
  path.write_text(json.dumps({'host': host, 'pid': pid, 'started': 'earlier'}))
  os.utime(path, (time.time() - age, time.time() - age))
  return path


@pytest.fixture
def other_process():
  """A live process on this host (stands in for a run training in the workdir)."""
  proc = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
  yield proc.pid
  proc.kill()
  proc.wait()


def test_a_live_run_on_this_host_blocks_naming_host_and_pid(tmp_path, other_process):
  _write_lock(tmp_path, socket.gethostname(), other_process)
  with pytest.raises(workdir_lock.WorkdirInUseError) as error:
    workdir_lock.WorkdirLock(tmp_path).acquire()
  message = str(error.value)
  assert str(tmp_path) in message and f'pid {other_process}' in message
  assert socket.gethostname() in message and '\n' not in message


def test_a_lock_of_a_process_that_is_gone_is_taken_over(tmp_path):
  dead = subprocess.Popen([sys.executable, '-c', 'pass'])
  dead.wait()
  _write_lock(tmp_path, socket.gethostname(), dead.pid)
  with workdir_lock.WorkdirLock(tmp_path) as lock:
    assert lock.took_over['pid'] == dead.pid
    assert json.loads(lock.path.read_text())['pid'] == os.getpid()
  assert not lock.path.exists()  # released


@pytest.mark.parametrize('age, blocks', [(10.0, True), (workdir_lock.STALE_SECONDS + 10, False)])
def test_a_lock_of_another_host_is_stale_when_not_refreshed(tmp_path, age, blocks):
  _write_lock(tmp_path, 'another-host', 1234, age=age)
  lock = workdir_lock.WorkdirLock(tmp_path)
  if blocks:
    with pytest.raises(workdir_lock.WorkdirInUseError, match='another-host'):
      lock.acquire()
  else:
    lock.acquire()
    assert lock.took_over['host'] == 'another-host'
    lock.release()


def test_the_holder_refreshes_its_lock(tmp_path, monkeypatch):
  monkeypatch.setattr(workdir_lock, 'HEARTBEAT_SECONDS', 0.05)
  with workdir_lock.WorkdirLock(tmp_path) as lock:
    os.utime(lock.path, (1.0, 1.0))
    time.sleep(0.5)
    assert time.time() - os.stat(lock.path).st_mtime < 5
