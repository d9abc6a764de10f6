"""Parallel, resumable preparation of clips into sharded TFRecord files plus dataset statistics.

Output folder layout (`out_dir`, local or any path `tf.io.gfile` can write):

* `{split}-{i:05d}-of-{n:05d}.tfrecord` (`data_format.shard_name`): records of `avt_jax.records`. A
  shard is written under `.incomplete/` and renamed into place when complete, so a shard file that
  exists is complete.
* `shard_stats/{shard name}.json`: per-shard counts (`num_clips` records), the file's size in bytes
  (`num_bytes`), log-mel sums and report lines, written just before the shard is renamed; a shard counts
  as finished only when both files exist and the shard is whole (`avt_jax.record_files`: its size as
  recorded; for folders prepared before sizes were recorded, its record framing and count). A rerun
  writes a damaged shard again (an interrupted copy of the folder, a file cut short), naming it.
* `prepare_plan.json`: settings and a fingerprint of the clip-to-shard assignment. A rerun with the same
  clips and settings keeps finished shards and only writes the missing ones; a rerun with different ones
  is refused instead of mixing two datasets in one folder.
* `stats.json`: dataset statistics (`avt_jax.data_format`), rewritten at the end of every run.
* `report.jsonl`: one JSON line per skipped or degraded clip: `clip_id`, `path`, `split`, `status`
  (`skipped` or `degraded`) and `reason`; and a line of status `note` for a clip whose file needed a
  choice (which of several audio/video streams, timestamps that restart mid-file, `media.DecodedClip.notes`).

The assignment of clips to shards is deterministic: within a split, clips are sorted by id, shuffled
with a fixed seed (so that shards mix classes even when the annotation file is sorted by class) and cut
into contiguous, nearly equal parts. Clips are decoded in worker processes started with 'spawn' (safe when
the parent has TensorFlow or JAX loaded); the workers import neither. A decoder that crashes its worker
process (SIGSEGV in FFmpeg, an abort, the OOM killer) costs only that clip: it is retried once in a fresh
process, then skipped and reported as `decoder crashed`, and the run goes on.
"""

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import re
import sys
import time
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from avt_jax import data_format
from avt_jax import record_files
from avt_jax.prep import annotations
from avt_jax.prep import logmel as logmel_lib
from avt_jax.prep import media

MISSING_AUDIO_POLICIES = ('silence', 'skip')
TARGET_CLIPS_PER_SHARD = 256
# `multihost_num_shards`: at least this many files per split, each of at least MIN_CLIPS_PER_SHARD
# clips (our choice: 64 files let 16 hosts read 4 each, or 64 hosts one).
MIN_SHARDS = 64
MIN_CLIPS_PER_SHARD = 8
SHUFFLE_SEED = 0
INCOMPLETE_DIR = '.incomplete'
SHARD_STATS_DIR = 'shard_stats'
PLAN_FILE = 'prepare_plan.json'
REPORT_FILE = 'report.jsonl'
_SPLIT_RE = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_.]*$')
_CRASH_RETRIES = 1  # a clip whose decoding process dies is decoded again once in a fresh process
_MAX_CONSECUTIVE_CRASHES = 8


@dataclasses.dataclass(frozen=True)
class RecordSettings:
  """Everything that changes the content of the records."""
  fps: float
  short_side: int
  n_mels: int
  clip_seconds: float | None
  missing_audio: str
  jpeg_quality: int


# Writes the unfinished shards (name -> clips in shard order) of a preparation: (pending, video_dir,
# out_dir, settings, label_names) -> None, each shard as `write_one_shard` does (see `prepare_dataset`).
ShardWriter = Callable[[Mapping[str, Sequence[annotations.ClipSpec]], str, str, RecordSettings,
                        Mapping[str, Sequence[str]]], None]


@dataclasses.dataclass
class _Task:
  spec: annotations.ClipSpec
  video_path: str
  settings: RecordSettings


@dataclasses.dataclass
class _Result:
  """What a worker sends back for one clip: the decoded data, or why it was skipped."""
  spec: annotations.ClipSpec
  error: str | None = None
  issues: list[str] = dataclasses.field(default_factory=list)
  start: float = 0.0
  end: float = 0.0
  jpeg_frames: list[bytes] = dataclasses.field(default_factory=list)
  height: int = 0
  width: int = 0
  logmel: np.ndarray | None = None  # [frames, n_mels] float32
  audio_missing: bool = False
  notes: list[str] = dataclasses.field(default_factory=list)  # `media.DecodedClip.notes`


def clip_window(spec: annotations.ClipSpec, clip_seconds: float | None) -> tuple[float | None, float | None]:
  """The [start, end) window to decode for `spec`.

  Without `clip_seconds`, the annotated segment (None = start/end of the video). With it, a window of
  exactly `clip_seconds`: centred on the annotated segment when both ends are known (clamped at 0),
  otherwise starting at the annotated start (or 0).
  """
  if clip_seconds is None:
    return spec.start, spec.end
  if spec.start is not None and spec.end is not None:
    start = max(0.0, (spec.start + spec.end - clip_seconds) / 2)
  else:
    start = spec.start or 0.0
  return start, start + clip_seconds


def _process_clip(task: _Task) -> _Result:
  """Decodes one clip and computes its log-mel spectrogram (runs in a worker process)."""
  settings = task.settings
  start, end = clip_window(task.spec, settings.clip_seconds)
  try:
    decoded = media.decode_clip(task.video_path, start, end, settings.fps, settings.short_side,
                                settings.jpeg_quality)
  except media.MediaError as e:
    return _Result(task.spec, error=e.reason)
  except Exception as e:  # pylint: disable=broad-except  # One bad file must not stop the job.
    return _Result(task.spec, error=f'unexpected {type(e).__name__}: {e}')
  issues = list(decoded.degraded)
  if decoded.waveform is None:  # no audio stream, or one that cannot be decoded (the video is kept)
    missing = decoded.audio_error or 'no audio stream'
    if settings.missing_audio == 'skip':
      return _Result(task.spec, error=missing)
    issues.append(f'{missing}; silence substituted')
  return _Result(task.spec, issues=issues, start=decoded.start, end=decoded.end,
                 jpeg_frames=decoded.jpeg_frames, height=decoded.height, width=decoded.width,
                 logmel=clip_log_mel(decoded, settings.n_mels), audio_missing=decoded.waveform is None,
                 notes=decoded.notes)


def clip_log_mel(decoded: media.DecodedClip, n_mels: int) -> np.ndarray:
  """[round(duration * AUDIO_FRAMES_PER_SECOND), n_mels] float32 log-mel (`data_format`) of a decoded
  clip's audio, or of silence (zeros) when it has none (`decoded.waveform` is None); see `prep.logmel`."""
  waveform = decoded.waveform
  if waveform is None:
    waveform = np.zeros(data_format.frame_count(decoded.start, decoded.end, decoded.sample_rate), np.float32)
  return logmel_lib.log_mel(waveform, sample_rate=decoded.sample_rate, n_mels=n_mels,
                            hop_s=1.0 / data_format.AUDIO_FRAMES_PER_SECOND)


def assign_shards(specs: Sequence[annotations.ClipSpec],
                  num_shards: int | None = None) -> list[list[annotations.ClipSpec]]:
  """Deterministically splits the clips of one split into shards (see the module docstring).

  Args:
    specs: clips of one split.
    num_shards: number of shards; None for about `TARGET_CLIPS_PER_SHARD` clips per shard. Capped at
      the number of clips.

  Returns:
    One list of clips per shard.
  """
  if num_shards is None:
    num_shards = round(len(specs) / TARGET_CLIPS_PER_SHARD)
  num_shards = max(1, min(num_shards, len(specs)))
  ordered = sorted(specs, key=lambda spec: spec.clip_id)
  permutation = np.random.default_rng(SHUFFLE_SEED).permutation(len(ordered))
  shuffled = [ordered[i] for i in permutation]
  bounds = np.linspace(0, len(shuffled), num_shards + 1).round().astype(int)
  return [shuffled[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]


def multihost_num_shards(num_clips: int) -> int:
  """Shards for a split of `num_clips` clips that many hosts can read by files (our design).

  About `TARGET_CLIPS_PER_SHARD` clips per shard, but at least `MIN_SHARDS` shards where that
  leaves `MIN_CLIPS_PER_SHARD` clips in each (1,000 clips: 64 shards; 200,000: 781; 20: 2).
  """
  return max(1, round(num_clips / TARGET_CLIPS_PER_SHARD),
             min(MIN_SHARDS, num_clips // MIN_CLIPS_PER_SHARD))


def prepare_dataset(
    specs: Sequence[annotations.ClipSpec],
    video_dir: str,
    out_dir: str,
    *,
    fps: float,
    short_side: int,
    label_names: Mapping[str, Sequence[str]],
    n_mels: int = 128,
    clip_seconds: float | None = None,
    num_shards_per_split: int | Mapping[str, int] | None = None,
    num_workers: int | None = None,
    missing_audio: str = 'silence',
    jpeg_quality: int = 90,
    progress: bool = True,
    write_shards: ShardWriter | None = None,
) -> dict[str, Any]:
  """Decodes clips into sharded records and writes `stats.json` and `report.jsonl` (resumable).

  Missing, unreadable or corrupt videos, and videos whose decoder crashes the worker process, are
  skipped and reported, never fatal. Clips shorter than their window are padded (see
  `avt_jax.prep.media`) and reported as degraded. A video without an audio stream, or whose audio
  stream cannot be decoded, is kept with silence and `audio/missing` set (`missing_audio='silence'`,
  reported as degraded with the reason) or skipped (`'skip'`).

  Args:
    specs: clips to prepare (all splits).
    video_dir: folder the `ClipSpec.path`s are relative to.
    out_dir: output folder (created).
    fps: frame rate of the stored frames.
    short_side: short side of the stored frames in pixels (even).
    label_names: label head -> class names; every head used by `specs` must be present.
    n_mels: mel bins of the stored spectrograms.
    clip_seconds: fixed clip duration (see `clip_window`); None keeps the annotated segments.
    num_shards_per_split: shards per split (one number for all splits, or per split); None for about
      `TARGET_CLIPS_PER_SHARD` clips per shard.
    num_workers: decoding processes; None for `os.cpu_count()`, 0 to decode in this process.
    missing_audio: 'silence' or 'skip' for clips without usable audio (see above).
    jpeg_quality: JPEG quality of the stored frames.
    progress: print a progress line (clips done / total, clips/s, ETA) on stderr.
    write_shards: None to write the unfinished shards with `num_workers` processes on this
      machine, or another runner that writes each with `write_one_shard` (e.g. Apache Beam,
      `avt_jax.prep.beam_runner`, chosen by `avt_jax.prep.preparation.shard_writer`); this process
      then combines the per-shard statistics. Same output either way.

  Returns:
    The statistics written to `stats.json`: `logmel_mean` and `logmel_std` (over all values of the
    stored float16 spectrograms of the train split, or of all splits when there is no train split;
    `logmel_stats_splits` names them), `num_clips`, `num_skipped`, `num_degraded` and `num_shards`
    {split: n}, `class_counts` {head: {split: [count per class]}}, `num_classes` {head: C},
    `label_names`, `fps`, `short_side`, `n_mels`, `audio_frames_per_second`, `audio_sample_rate`,
    `logmel_log_offset`, `clip_seconds`, `jpeg_quality`, `missing_audio`.

  Raises:
    ValueError: bad arguments or specs (unknown label head, index out of range, duplicate clip id
      within a split, a path leaving `video_dir`), or `out_dir` holds a different preparation.
  """
  if missing_audio not in MISSING_AUDIO_POLICIES:
    raise ValueError(f'missing_audio must be one of {MISSING_AUDIO_POLICIES}, got {missing_audio!r}.')
  if fps <= 0 or short_side <= 0 or short_side % 2 or (clip_seconds is not None and clip_seconds <= 0):
    raise ValueError(f'Expected fps > 0, an even short_side > 0 and clip_seconds > 0 or None; got '
                     f'fps={fps}, short_side={short_side}, clip_seconds={clip_seconds}.')
  settings = RecordSettings(fps=float(fps), short_side=int(short_side), n_mels=int(n_mels),
                       clip_seconds=None if clip_seconds is None else float(clip_seconds),
                       missing_audio=missing_audio, jpeg_quality=int(jpeg_quality))
  label_names = {head: list(names) for head, names in label_names.items()}
  if not specs:
    raise ValueError('No clips to prepare.')
  _check_specs(specs, video_dir, label_names)
  plan = _plan_shards(specs, num_shards_per_split)

  gfile = _tf().io.gfile
  gfile.makedirs(os.path.join(out_dir, INCOMPLETE_DIR))
  gfile.makedirs(os.path.join(out_dir, SHARD_STATS_DIR))
  _check_plan(out_dir, settings, label_names, plan)
  pending = {name: plan[name] for name in plan if not _is_finished(out_dir, name)}
  if write_shards is not None:
    write_shards(pending, video_dir, out_dir, settings, label_names)
  else:
    meter = _Progress(sum(len(clips) for clips in pending.values()), enabled=progress)
    results = _run_tasks(_tasks(pending, video_dir, settings), num_workers)
    for name, clips in pending.items():
      _write_shard(out_dir, name, clips, results, settings, label_names, meter)
    meter.finish()
  gfile.rmtree(os.path.join(out_dir, INCOMPLETE_DIR))
  stats = _write_summary(out_dir, settings, label_names, plan)
  if progress:
    sys.stderr.write(f'prepare: {out_dir} holds {stats["num_clips"]} clips in {len(plan)} shards; skipped '
                     f'{stats["num_skipped"]}, degraded {stats["num_degraded"]} (see {REPORT_FILE}).\n')
  return stats


def _plan_shards(specs: Sequence[annotations.ClipSpec],
                 num_shards_per_split: int | Mapping[str, int] | None
                 ) -> dict[str, list[annotations.ClipSpec]]:
  """Shard name -> clips, splits in sorted order, each cut by `assign_shards`."""
  by_split = collections.defaultdict(list)
  for spec in specs:
    by_split[spec.split].append(spec)
  plan = {}
  for split in sorted(by_split):
    wanted = (num_shards_per_split.get(split) if isinstance(num_shards_per_split, Mapping)
              else num_shards_per_split)
    parts = assign_shards(by_split[split], wanted)
    for index, clips in enumerate(parts):
      plan[data_format.shard_name(split, index, len(parts))] = clips
  return plan


def _tasks(shards: Mapping[str, Sequence[annotations.ClipSpec]], video_dir: str,
           settings: RecordSettings) -> Iterator[_Task]:
  """The clips of `shards` in shard order, as decoding tasks."""
  for clips in shards.values():
    for spec in clips:
      yield _Task(spec, annotations.safe_join(video_dir, spec.path), settings)


def write_one_shard(name: str, clips: Sequence[annotations.ClipSpec], video_dir: str, out_dir: str,
                    settings: RecordSettings, label_names: Mapping[str, Sequence[str]]) -> None:
  """Decodes the clips of shard `name` in one worker process (a decoder crash costs only its clip)
  and writes the shard and its statistics, as the local runner does (used by the Beam runner)."""
  results = _run_tasks(_tasks({name: clips}, video_dir, settings), num_workers=1)
  _write_shard(out_dir, name, clips, results, settings, label_names,
               _Progress(len(clips), enabled=False))


def _check_specs(specs: Sequence[annotations.ClipSpec], video_dir: str,
                 label_names: Mapping[str, Sequence[str]]) -> None:
  seen = set()
  for spec in specs:
    if not _SPLIT_RE.match(spec.split):
      raise ValueError(f'Clip {spec.clip_id!r}: split name {spec.split!r} must match {_SPLIT_RE.pattern} '
                       '(it becomes part of the shard file names).')
    key = (spec.split, spec.clip_id)
    if key in seen:
      raise ValueError(f'Duplicate clip id {spec.clip_id!r} in split {spec.split!r}.')
    seen.add(key)
    annotations.safe_join(video_dir, spec.path)
    for head, indices in spec.labels.items():
      if head not in label_names:
        raise ValueError(f'Clip {spec.clip_id!r}: label head {head!r} not in label_names '
                         f'{sorted(label_names)}.')
      for index in indices:
        if not 0 <= index < len(label_names[head]):
          raise ValueError(f'Clip {spec.clip_id!r}: {head} index {index} out of range '
                           f'[0, {len(label_names[head])}).')


def _check_plan(out_dir: str, settings: RecordSettings, label_names: Mapping[str, Sequence[str]],
                plan: Mapping[str, Sequence[annotations.ClipSpec]]) -> None:
  """Records the plan, or refuses to continue a folder prepared with another plan."""
  gfile = _tf().io.gfile
  content = {
      'settings': dataclasses.asdict(settings),
      'label_names': label_names,
      'shards': {name: [dataclasses.asdict(spec) for spec in clips] for name, clips in plan.items()},
  }
  fingerprint = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
  summary = {'fingerprint': fingerprint, 'settings': content['settings'],
             'num_shards': len(plan), 'num_clips': sum(len(clips) for clips in plan.values())}
  path = os.path.join(out_dir, PLAN_FILE)
  if gfile.exists(path):
    with gfile.GFile(path) as f:
      previous = json.load(f)
    if previous.get('fingerprint') != fingerprint:
      raise ValueError(f'{out_dir} holds records prepared from other clips or settings '
                       f'({path}: {previous.get("settings")}); use a new output folder or delete it.')
  else:
    data_format.write_json(path, summary)


def _tf():
  """TensorFlow, imported on first use: worker processes import this module but never need it."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf


def _is_finished(out_dir: str, name: str) -> bool:
  """Whether shard `name` and its stats exist and the shard is whole; a damaged shard is deleted
  (with a line on stderr naming it) so that it is written again."""
  gfile = _tf().io.gfile
  path = os.path.join(out_dir, name)
  if not (gfile.exists(path) and gfile.exists(_shard_stats_path(out_dir, name))):
    return False
  stats = _read_json(_shard_stats_path(out_dir, name))
  reason = record_files.damage(path, stats.get('num_bytes'), stats.get('num_clips'))
  if reason is None:
    return True
  sys.stderr.write(f'prepare: {path} is damaged ({reason}); writing it again.\n')
  gfile.remove(_shard_stats_path(out_dir, name))
  gfile.remove(path)
  return False


def _shard_stats_path(out_dir: str, name: str) -> str:
  return record_files.shard_stats_path(out_dir, name)


def _run_tasks(tasks: Iterable[_Task], num_workers: int | None,
               process: Callable[[_Task], _Result] = _process_clip) -> Iterator[_Result]:
  """Yields `process(task)` in task order, keeping a bounded number of tasks in flight.

  With worker processes, a decoder crash (a worker killed by SIGSEGV, an abort, the OOM killer) costs
  only the clip being decoded: it is retried once in a fresh process and then reported as
  `decoder crashed` (see `_Lanes`). `num_workers=0` decodes in this process, without that protection.
  """
  num_workers = os.cpu_count() if num_workers is None else num_workers
  if num_workers == 0:
    yield from map(process, tasks)
    return
  lanes = _Lanes(num_workers, process)
  try:
    in_flight = collections.deque()
    for task in tasks:
      in_flight.append(lanes.submit(task))
      if len(in_flight) >= 4 * num_workers:
        yield lanes.result(in_flight.popleft())
    while in_flight:
      yield lanes.result(in_flight.popleft())
  finally:
    lanes.shutdown()


@dataclasses.dataclass(eq=False)
class _Job:
  task: _Task
  future: concurrent.futures.Future | None = None
  lane: int = 0
  crashes: int = 0
  result: _Result | None = None


class _Lanes:
  """`n` single-worker process pools ('spawn'), so that a crashing decoder can be told apart.

  A worker that dies breaks only its own pool (lane). Its one process runs the lane's tasks in
  submission order, so the task it died on is the lane's oldest one without a result. That task is
  retried once in a fresh process and then reported as crashed (`_Result.error` `decoder crashed
  ...`); the lane's other unfinished tasks are resubmitted. Workers that keep dying whatever they
  decode (`_MAX_CONSECUTIVE_CRASHES` clips in a row) are an environment problem, not bad files: that
  stops the run (finished shards are kept).
  """

  def __init__(self, n: int, process: Callable[[_Task], _Result]):
    self._context = multiprocessing.get_context('spawn')
    self._process = process
    self._pools = [self._new_pool() for _ in range(n)]
    self._jobs = [collections.deque() for _ in range(n)]  # per lane, submission order, uncollected
    self._consecutive_crashes = 0

  def _new_pool(self) -> concurrent.futures.ProcessPoolExecutor:
    return concurrent.futures.ProcessPoolExecutor(1, mp_context=self._context)

  def submit(self, task: _Task) -> _Job:
    return self._submit(_Job(task))

  def _submit(self, job: _Job) -> _Job:
    job.lane = min(range(len(self._pools)), key=lambda lane: len(self._jobs[lane]))
    job.future = self._pools[job.lane].submit(self._process, job.task)
    self._jobs[job.lane].append(job)
    return job

  def result(self, job: _Job) -> _Result:
    """Waits for `job`; recovers its lane if its worker died."""
    while job.result is None:
      try:
        result = job.future.result()
      except concurrent.futures.process.BrokenProcessPool:
        self._recover(job.lane)
        continue
      self._jobs[job.lane].remove(job)
      job.result = result
      self._consecutive_crashes = 0
    return job.result

  def _recover(self, lane: int) -> None:
    jobs = list(self._jobs[lane])
    concurrent.futures.wait([job.future for job in jobs])  # all of the broken pool's futures settle
    self._pools[lane].shutdown(wait=False)
    self._pools[lane], self._jobs[lane] = self._new_pool(), collections.deque()
    crashed = next(job for job in jobs if isinstance(
        job.future.exception(), concurrent.futures.process.BrokenProcessPool))
    for job in jobs:
      if job.future.exception() is None:
        job.result = job.future.result()  # finished before the crash
      elif job is crashed and job.crashes >= _CRASH_RETRIES:
        job.crashes += 1
        self._consecutive_crashes += 1
        if self._consecutive_crashes >= _MAX_CONSECUTIVE_CRASHES:
          raise RuntimeError(
              f'Decoding worker processes died on {self._consecutive_crashes} clips in a row (the last '
              f'{job.task.video_path}); this looks like a problem of the environment, not of the files. '
              'Finished shards are kept: rerun to resume.')
        job.result = _Result(job.task.spec, error=f'decoder crashed (the decoding process died '
                             f'{job.crashes} times on this file)')
      else:
        job.crashes += job is crashed
        self._submit(job)

  def shutdown(self) -> None:
    for pool in self._pools:
      pool.shutdown(wait=True, cancel_futures=True)


def _write_shard(out_dir: str, name: str, clips: Sequence[annotations.ClipSpec],
                 results: Iterator[_Result], settings: RecordSettings,
                 label_names: Mapping[str, Sequence[str]], meter: '_Progress') -> None:
  """Writes one shard from the next `len(clips)` results, then its stats, then renames it into place."""
  from avt_jax import records  # pylint: disable=g-import-not-at-top  # imports TensorFlow
  tf = _tf()
  counts = {head: [0] * len(names) for head, names in label_names.items()}
  total, total_sq, num_values, num_written = 0.0, 0.0, 0, 0
  report = []
  temporary = os.path.join(out_dir, INCOMPLETE_DIR, name)
  with tf.io.TFRecordWriter(temporary) as writer:
    for expected in clips:
      result = next(results)
      assert result.spec.clip_id == expected.clip_id, 'results out of order'
      spec = result.spec
      entry = {'clip_id': spec.clip_id, 'path': spec.path, 'split': spec.split}
      if result.error is not None:
        report.append(dict(entry, status='skipped', reason=result.error))
        meter.update(skipped=True)
        continue
      if result.issues:
        report.append(dict(entry, status='degraded', reason='; '.join(result.issues)))
      if result.notes:
        report.append(dict(entry, status='note', reason='; '.join(result.notes)))
      stored = result.logmel.astype(np.float16).astype(np.float64)  # what readers will see
      total += stored.sum()
      total_sq += np.square(stored).sum()
      num_values += stored.size
      for head, indices in spec.labels.items():
        for index in indices:
          counts[head][index] += 1
      writer.write(records.encode_clip(records.Clip(
          clip_id=spec.clip_id, source=spec.path, start=result.start, end=result.end,
          labels=spec.labels, jpeg_frames=result.jpeg_frames, fps=settings.fps,
          height=result.height, width=result.width, logmel=result.logmel,
          audio_fps=data_format.AUDIO_FRAMES_PER_SECOND, audio_missing=result.audio_missing)))
      num_written += 1
      meter.update(skipped=False)
  data_format.write_json(_shard_stats_path(out_dir, name), {
      'num_clips': num_written, 'num_bytes': tf.io.gfile.stat(temporary).length, 'class_counts': counts, 'logmel_sum': total, 'logmel_sum_sq': total_sq,
      'logmel_count': num_values, 'report': report})
  tf.io.gfile.rename(temporary, os.path.join(out_dir, name), overwrite=True)


def _read_json(path: str) -> Any:
  with _tf().io.gfile.GFile(path) as f:
    return json.load(f)


def _write_summary(out_dir: str, settings: RecordSettings, label_names: Mapping[str, list[str]],
                   plan: Mapping[str, Sequence[annotations.ClipSpec]]) -> dict[str, Any]:
  """Aggregates the per-shard stats into `stats.json` and `report.jsonl`."""
  shard_stats = collections.defaultdict(list)  # split -> per-shard stats
  for name in plan:
    shard_stats[data_format.parse_shard_name(name).split].append(_read_json(_shard_stats_path(out_dir, name)))
  splits = sorted(shard_stats)
  stats_splits = ['train'] if 'train' in shard_stats else splits
  moments = np.array([[s['logmel_sum'], s['logmel_sum_sq'], s['logmel_count']]
                      for split in stats_splits for s in shard_stats[split]]).sum(axis=0)
  mean = moments[0] / max(moments[2], 1)
  variance = max(moments[1] / max(moments[2], 1) - mean ** 2, 0.0)
  report = [entry for split in splits for s in shard_stats[split] for entry in s['report']]
  stats = {
      'logmel_mean': float(mean),
      'logmel_std': float(math.sqrt(variance)),
      'logmel_stats_splits': stats_splits,
      'num_clips': {split: sum(s['num_clips'] for s in shard_stats[split]) for split in splits},
      'num_skipped': {split: sum(e['status'] == 'skipped' for s in shard_stats[split] for e in s['report'])
                      for split in splits},
      'num_degraded': {split: sum(e['status'] == 'degraded' for s in shard_stats[split]
                                  for e in s['report']) for split in splits},
      'num_shards': {split: len(shard_stats[split]) for split in splits},
      'class_counts': {head: {split: np.sum([s['class_counts'][head] for s in shard_stats[split]],
                                            axis=0).astype(int).tolist() for split in splits}
                       for head in label_names},
      'num_classes': {head: len(names) for head, names in label_names.items()},
      'label_names': dict(label_names),
      'fps': settings.fps,
      'short_side': settings.short_side,
      'n_mels': settings.n_mels,
      'audio_frames_per_second': data_format.AUDIO_FRAMES_PER_SECOND,
      'audio_sample_rate': media.AUDIO_SAMPLE_RATE,
      'logmel_log_offset': logmel_lib.LOG_OFFSET,
      'clip_seconds': settings.clip_seconds,
      'jpeg_quality': settings.jpeg_quality,
      'missing_audio': settings.missing_audio,
  }
  data_format.write_stats(out_dir, stats)
  gfile = _tf().io.gfile
  temporary = os.path.join(out_dir, REPORT_FILE + '.tmp')
  with gfile.GFile(temporary, 'w') as f:
    f.write(''.join(json.dumps(entry) + '\n' for entry in report))
  gfile.rename(temporary, os.path.join(out_dir, REPORT_FILE), overwrite=True)
  return stats


class _Progress:
  """Progress on stderr: clips done / total, clips/s and ETA (one line per 10 s when not a terminal)."""

  def __init__(self, total: int, enabled: bool):
    self._total = total
    self._enabled = enabled and total > 0
    self._done = self._skipped = 0
    self._start = self._last = time.monotonic()
    self._interactive = sys.stderr.isatty()

  def update(self, skipped: bool) -> None:
    self._done += 1
    self._skipped += skipped
    now = time.monotonic()
    if self._enabled and now - self._last >= (0.5 if self._interactive else 10.0):
      self._last = now
      self._print(end='\r' if self._interactive else '\n')

  def finish(self) -> None:
    if self._enabled:
      self._print(end='\n')

  def _print(self, end: str) -> None:
    elapsed = time.monotonic() - self._start
    rate = self._done / max(elapsed, 1e-9)
    eta = (self._total - self._done) / rate if rate > 0 else float('inf')
    eta_text = time.strftime('%H:%M:%S', time.gmtime(eta)) if math.isfinite(eta) else '?'
    sys.stderr.write(f'prepare: {self._done}/{self._total} clips, {rate:.1f} clips/s, ETA {eta_text}, '
                     f'{self._skipped} skipped{end}')
    sys.stderr.flush()
