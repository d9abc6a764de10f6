"""One training run per workdir: a lock file naming the run that uses it (our design).

`<workdir>/run.lock` holds JSON `{host, pid, started}` of the training run that owns the workdir. It
is created atomically (exclusive create on local disks), refreshed every `HEARTBEAT_SECONDS` by a
background thread, and deleted when the run ends (also on errors and preemption). A second training
run on the same workdir stops with `WorkdirInUseError`, one line naming the workdir and the owner.

A lock left by a run that was killed (SIGKILL, a lost machine) does not block forever: it is stale,
and taken over with a note, when its process no longer exists on this host, or, for a run on another
host (whose process cannot be checked), when it was not refreshed for `STALE_SECONDS`.

Only training takes the lock; reading a workdir (`eval_only`, `predict`, `export`) never does, and
opens checkpoints read-only (`checkpointing.Checkpointer(read_only=True)`), so it can run while the
workdir trains. In a multi-process job process 0 holds the lock for the whole job.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Any

from etils import epath

LOCK_FILE = 'run.lock'
HEARTBEAT_SECONDS = 60.0
STALE_SECONDS = 600.0  # a lock of another host not refreshed for this long is stale


class WorkdirInUseError(RuntimeError):
  """Another live run trains in the workdir; the message is one line naming it."""


def _owner_alive(owner: dict[str, Any], age: float) -> bool:
  """Whether the run that wrote `owner` (a lock refreshed `age` seconds ago) may still run."""
  if owner.get('host') == socket.gethostname() and isinstance(owner.get('pid'), int):
    if owner['pid'] == os.getpid():  # an earlier process with our pid (e.g. a restarted container)
      return False
    try:
      os.kill(owner['pid'], 0)
    except ProcessLookupError:
      return False
    except PermissionError:  # exists, run by another user
      pass
    return True
  return age < STALE_SECONDS


def _read(path: epath.Path) -> tuple[dict[str, Any], float] | None:
  """(owner, seconds since its last refresh), or None when there is no lock."""
  try:
    text, mtime = path.read_text(), path.stat().mtime
  except FileNotFoundError:
    return None
  try:
    owner = json.loads(text)
  except json.JSONDecodeError:  # a lock being written, or cut short by a crash
    owner = {}
  return owner, max(time.time() - mtime, 0.0)


def _create(path: epath.Path, content: str) -> bool:
  """Creates `path` with `content` unless it exists; atomic on local file systems."""
  if '://' in str(path):  # object stores have no exclusive create: check, then write
    if path.exists():
      return False
    path.write_text(content)
    return True
  try:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, 'w') as f:
    f.write(content)
  return True


class WorkdirLock:
  """Holds `<workdir>/run.lock` while a training run uses the workdir.

      with WorkdirLock(workdir):
        train(...)

  Raises (on entry):
    WorkdirInUseError: a live run holds the lock (naming workdir, host, pid and start time).
  """

  def __init__(self, workdir: epath.PathLike):
    self.workdir = epath.Path(workdir)
    self.path = self.workdir / LOCK_FILE
    self.took_over: dict[str, Any] | None = None  # the stale owner replaced, if any
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def acquire(self) -> None:
    """Takes the lock (see the class docstring); creates the workdir if needed."""
    self.workdir.mkdir(parents=True, exist_ok=True)
    content = json.dumps({'host': socket.gethostname(), 'pid': os.getpid(),
                          'started': time.strftime('%Y-%m-%d %H:%M:%S %Z')})
    for _ in range(3):
      if _create(self.path, content):
        break
      found = _read(self.path)
      if found is None:  # released meanwhile
        continue
      owner, age = found
      if _owner_alive(owner, age):
        raise WorkdirInUseError(
            f'{self.workdir} is in use by another training run (host {owner.get("host", "?")}, pid '
            f'{owner.get("pid", "?")}, started {owner.get("started", "?")}, lock {self.path} '
            f'refreshed {age:.0f} s ago): wait for it to end or use another --workdir (a lock not '
            f'refreshed for {STALE_SECONDS:.0f} s, or whose process is gone, is taken over).')
      self.took_over = owner
      self.path.unlink(missing_ok=True)
    else:
      raise WorkdirInUseError(f'{self.workdir}: could not take {self.path}: other runs keep '
                              'starting on this workdir.')
    self._thread = threading.Thread(target=self._heartbeat, name='workdir_lock', daemon=True)
    self._thread.start()

  def _heartbeat(self) -> None:
    while not self._stop.wait(HEARTBEAT_SECONDS):
      try:
        if '://' in str(self.path):
          self.path.write_text(self.path.read_text())
        else:
          os.utime(self.path)
      except OSError:  # a full disk must not kill the run; the lock just ages
        pass

  def release(self) -> None:
    """Stops refreshing and deletes the lock file."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
      self.path.unlink(missing_ok=True)

  def __enter__(self) -> WorkdirLock:
    self.acquire()
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.release()
