"""Classifies video files with a trained workdir.

    python -m avt_jax.predict --workdir=/tmp/avt_demo clip.mp4 more_videos/
    python -m avt_jax.predict --workdir=DIR --checkpoint=best --top_k=3 --output=predictions.jsonl DIR2

Each file is decoded whole with the code `python -m avt_jax.prepare` uses (`avt_jax.prep.media`, at the
frame rate, frame size and mel bins of the training data, read from `<workdir>/stats.json`), turned
into a record and cut into the evaluation views of the run's config (`input.eval_clips` x
`input.eval_crops`, `avt_jax.input.pipeline.ClipDecoder`): the model sees exactly what `evaluate`
feeds it for the same clip. The views' logits are averaged (as in evaluation), then turned into
probabilities (softmax; sigmoid for multi-label data). Class names come from `<workdir>/stats.json`,
the config from `<workdir>/config.json` (both written by training, `avt_jax.workdir.save_run`).

Every file gets one outcome, never a crash of the run:
  `ok`        predicted.
  `degraded`  predicted, with `issues`: `no_audio` (no audio stream, or one that cannot be decoded:
              silence is fed, as preparation does), `too_short` (shorter than a view: the last frame
              is repeated and the audio padded with silence, as in evaluation), `silent_audio` (the
              audio is digital silence), `damaged` (corrupt packets skipped, reading stopped early);
              `notes` says what happened.
  `failed`    no prediction; `error` says why (file not found, unreadable or corrupt, no video, or only
              a cover image: `media.COVER_ONLY`).
Folders are searched recursively for video files (`annotations.VIDEO_EXTENSIONS`), following symbolic
links to files and sub-folders (a folder reached twice is listed once); macOS metadata files (`._*`),
other extensions and broken links are left out, each named on stderr with the reason (`video_files`).
A file with several video or audio streams is read from the ones `prepare` chooses (`avt_jax.prep.media`);
`notes` names them, and says when timestamps that restart mid-file (joined recordings) were followed.

Output: a table on stdout, one row per file as it is done (progress on stderr), and with `--output`
one JSON line per file: `path`, `status`, `issues`, `notes`, `views`, `seconds` (decoded duration),
`top_k` (label head -> [{`label`, `probability`}], best first) or `error`.

With `--embeddings=FILE.npz`, also each file's per-modality embeddings (contrastive projections and
pooled features, averaged over its views; `avt_jax/embeddings.py` says what each array is).
"""

import dataclasses
import json
import os
import sys
from typing import Any, Iterator, Sequence

from avt_jax import command_line  # before TensorFlow and JAX load

command_line.quiet_native_logs()

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from avt_jax import data_format, dataset_stats, embeddings, evaluate, records  # noqa: E402
from avt_jax import workdir as workdir_lib  # noqa: E402
from avt_jax.input import pipeline  # noqa: E402
from avt_jax.models import build_model  # noqa: E402
from avt_jax.prep import annotations, media, shards  # noqa: E402


def video_files(paths: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
  """The files to predict and the folder entries left out, with why.

  Files named in `paths` are kept as they are (a missing one gets the outcome `failed: file not
  found`). Folders are searched recursively, sorted per folder, following symbolic links to files and
  sub-folders; a folder reached a second time (a link loop, or two links to one folder) is listed once.
  A folder entry is left out when its extension is not in `annotations.VIDEO_EXTENSIONS`, when it is a
  macOS metadata file (`._name`, `.DS_Store`), or a broken link.

  Returns:
    (files, [(entry, reason)] for every entry left out).
  """
  files, skipped = [], []
  for path in paths:
    if os.path.isdir(path):
      _walk(path, files, skipped, visited=set())
    else:
      files.append(path)
  return files, skipped


def _walk(folder: str, files: list[str], skipped: list[tuple[str, str]], visited: set[str]) -> None:
  """Adds the videos under `folder` to `files`, and the entries left out to `skipped`."""
  real = os.path.realpath(folder)
  if real in visited:
    skipped.append((folder, f'folder already listed (link to {real})'))
    return
  visited.add(real)
  try:
    names = sorted(os.listdir(folder))
  except OSError as e:
    skipped.append((folder, f'cannot list the folder ({e.strerror})'))
    return
  subfolders = []
  for name in names:
    entry = os.path.join(folder, name)
    if name.startswith('._') or name == '.DS_Store':
      skipped.append((entry, 'macOS metadata file, not a video'))
    elif os.path.isdir(entry):
      subfolders.append(entry)
    elif not os.path.exists(entry):
      skipped.append((entry, 'broken link'))
    elif os.path.splitext(name)[1].lower() not in annotations.VIDEO_EXTENSIONS:
      skipped.append((entry, 'not a video file extension'))
    else:
      files.append(entry)
  for subfolder in sorted(subfolders, key=os.path.islink):  # a folder's own path before a link's
    _walk(subfolder, files, skipped, visited)


@dataclasses.dataclass
class Decoded:
  """A video file decoded as preparation decodes it, serialized as a record.

  Attributes:
    record: the serialized `avt_jax.records` clip (no labels).
    seconds: decoded duration.
    issues: named degradations (see the module docstring).
    notes: what happened, in words.
  """
  record: bytes
  seconds: float
  issues: list[str]
  notes: list[str]


class Predictor:
  """A trained workdir's model and input processing, for one video file at a time.

  Args:
    workdir: training workdir (checkpoints, `config.json`, `stats.json`).
    checkpoint: 'latest', 'best' (`<workdir>/best`, kept with `train.eval_every` > 0) or a step.

  Raises:
    FileNotFoundError: a missing workdir file or checkpoint, named.
    ValueError: a bad `checkpoint`.
  """

  def __init__(self, workdir: str, checkpoint: str = 'latest'):
    self.config, self.stats = workdir_lib.load_run(workdir)
    self.model = build_model(self.config)
    self.params = restore(self.config, workdir, checkpoint)
    self.label_names = dataset_stats.class_names(self.config, self.stats)
    self.views = pipeline.record_views(self.config, self.stats, data_format.stats_path(workdir))
    self.modalities = tuple(self.config.model.modalities)
    self._step = jax.jit(evaluate.make_eval_step(self.model, self.modalities))
    self._embed = None  # built on first use of `embeddings`
    self.keep_embeddings, self.last_embeddings = False, None  # set by --embeddings
    inp = self.config.input
    # What one view covers: stored video frames and spectrogram frames.
    window = (int(inp.num_frames), int(inp.frame_stride))
    self.view_frames = data_format.window_frames(*window)
    self.view_seconds = data_format.view_seconds(*window, float(self.stats['fps']),
                                                 int(inp.audio_frames))

  def decode(self, path: str) -> Decoded:
    """Decodes a whole file as `prepare` does (see the module docstring).

    Raises:
      media.MediaError: the file is missing, unreadable or corrupt, or has no video.
    """
    stats = self.stats
    decoded = media.decode_clip(path, None, None, float(stats['fps']), int(stats['short_side']),
                                int(stats.get('jpeg_quality', 90)))
    logmel = shards.clip_log_mel(decoded, int(stats['n_mels']))
    issues, notes = [], []
    if decoded.waveform is None and 'audio' in self.modalities:
      issues.append('no_audio')
      notes.append(f'{decoded.audio_error or "no audio stream"}; silence substituted')
    seconds = decoded.end - decoded.start
    if len(decoded.jpeg_frames) < self.view_frames or seconds < self.view_seconds - 1e-6:
      issues.append('too_short')
      notes.append(f'{seconds:.2f} s is shorter than the {self.view_seconds:.2f} s a view covers; '
                   'padded as in evaluation')
    notes.extend(decoded.notes)  # streams chosen, timestamp jumps followed: information, not damage
    for note in decoded.degraded:
      issue = 'silent_audio' if note == media.SILENCE_NOTE else 'damaged'
      if issue not in issues:
        issues.append(issue)
      notes.append(note)
    clip = records.Clip(
        clip_id=path, source=path, start=decoded.start, end=decoded.end, labels={},
        jpeg_frames=decoded.jpeg_frames, fps=decoded.fps, height=decoded.height, width=decoded.width,
        logmel=logmel, audio_fps=data_format.AUDIO_FRAMES_PER_SECOND,
        audio_missing=decoded.waveform is None)
    return Decoded(records.encode_clip(clip), seconds, issues, notes)

  def inputs(self, decoded: Decoded) -> dict[str, np.ndarray]:
    """The model inputs of all views: `video` [V, T, S, S, 3], `audio` [V, A, M], `mask` [V]."""
    views = self.views(decoded.record)
    return {k: views[k] for k in (*self.modalities, 'mask')}

  def probabilities(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Label head -> [C] probabilities of the view-averaged logits (sigmoid if multi-label)."""
    logits = jax.device_get(self._step(self.params, inputs))
    mean = {head: np.mean(np.asarray(v, np.float64), axis=0) for head, v in logits.items()}
    if self.config.data.multi_label:
      return {head: 1.0 / (1.0 + np.exp(-v)) for head, v in mean.items()}
    return {head: np.exp(v - v.max()) / np.exp(v - v.max()).sum() for head, v in mean.items()}

  def embeddings(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The clip's embeddings (`avt_jax/embeddings.py`): key -> [dim] float32."""
    if self._embed is None:
      self._embed = jax.jit(embeddings.make_embed_step(self.model, self.modalities, self.params))
    views = jax.device_get(self._embed(self.params, inputs))
    return embeddings.clip_embedding(views, inputs['mask'])

  def predict(self, path: str, top_k: int = 5) -> dict[str, Any]:
    """The outcome for one file (see the module docstring); never raises for a bad file."""
    try:
      decoded = self.decode(path)
    except media.MediaError as e:
      return {'path': path, 'status': 'failed', 'error': e.reason}
    except Exception as e:  # pylint: disable=broad-except  # one bad file must not stop the run
      return {'path': path, 'status': 'failed', 'error': f'unexpected {type(e).__name__}: {e}'}
    inputs = self.inputs(decoded)
    probabilities = self.probabilities(inputs)
    if self.keep_embeddings:  # read by `main` for --embeddings
      self.last_embeddings = self.embeddings(inputs)
    best = {head: [{'label': self.label_names[head][i], 'probability': float(p[i])}
                   for i in np.argsort(-p, kind='stable')[:top_k]]
            for head, p in probabilities.items()}
    return {'path': path, 'status': 'degraded' if decoded.issues else 'ok', 'issues': decoded.issues,
            'notes': decoded.notes, 'views': int(len(inputs['mask'])),
            'seconds': round(decoded.seconds, 3), 'top_k': best}


def restore(config: ml_collections.ConfigDict, workdir: str, checkpoint: str):
  """Parameters of `workdir`'s checkpoint `checkpoint` ('latest', 'best' or a step number)."""
  if checkpoint in ('latest', 'best'):
    return workdir_lib.restore_params(config, workdir, checkpoint=checkpoint)
  if not checkpoint.isdigit():
    raise ValueError(f"--checkpoint: expected 'latest', 'best' or a step number, got {checkpoint!r}.")
  return workdir_lib.restore_params(config, workdir, step=int(checkpoint))


def table_row(outcome: dict[str, Any]) -> str:
  """One line of the table: status, best label and probability per head, path, issues or error."""
  if outcome['status'] == 'failed':
    return f'{"failed":<9} {"-":<32} {outcome["path"]}  ({outcome["error"]})'
  best = ', '.join(f'{top[0]["label"]} {top[0]["probability"]:.1%}' for top in outcome['top_k'].values())
  issues = f'  [{", ".join(outcome["issues"])}]' if outcome['issues'] else ''
  return f'{outcome["status"]:<9} {best:<32} {outcome["path"]}{issues}'


def predict_files(predictor: Predictor, paths: Sequence[str], top_k: int = 5,
                  progress: bool = True) -> Iterator[dict[str, Any]]:
  """Yields the outcome of every file in `paths` (folders expanded), printing progress and the
  folder entries left out on stderr."""
  files, skipped = video_files(paths)
  for entry, reason in skipped:
    sys.stderr.write(f'predict: skipped {entry} ({reason})\n')
  for number, path in enumerate(files, 1):
    if progress:
      sys.stderr.write(f'predict: [{number}/{len(files)}] {path}\n')
    yield predictor.predict(path, top_k)


PROG = 'python -m avt_jax.predict'
USAGE = ('Classify video files (or folders of them) with a trained workdir: decodes them as '
         '`prepare` does, evaluates the evaluation views, prints a table and writes JSON lines.')


def define_flags(fv: flags.FlagValues) -> None:
  """The command's flags (`avt_jax.command_line`); the video files or folders are positional."""
  flags.DEFINE_string('workdir', None, 'Training workdir.', flag_values=fv)
  flags.DEFINE_string('checkpoint', 'latest', "'latest', 'best' (kept with train.eval_every > 0) "
                      'or a step.', flag_values=fv)
  flags.DEFINE_integer('top_k', 5, 'Classes listed per file.', flag_values=fv)
  flags.DEFINE_string('output', None, 'Also write one JSON line per file here (FILE.jsonl).',
                      flag_values=fv)
  flags.DEFINE_string('embeddings', None, "Also write each file's embeddings here (FILE.npz, "
                      'avt_jax/embeddings.py).', flag_values=fv)
  flags.mark_flag_as_required('workdir', flag_values=fv)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the command line (default: sys.argv[1:]); returns the exit status (2 for a bad workdir or
  argument)."""
  args, paths = command_line.parse(PROG, USAGE, define_flags,
                                   sys.argv[1:] if argv is None else argv, 'FILE_OR_FOLDER')
  if args.top_k < 1:
    sys.stderr.write(f'predict: error: --top_k must be >= 1, got {args.top_k}.\n')
    return 2
  try:
    predictor = Predictor(args.workdir, args.checkpoint)
  except (ValueError, FileNotFoundError) as e:
    sys.stderr.write(f'predict: error: {e}\n')
    return 2
  counts = {'ok': 0, 'degraded': 0, 'failed': 0}
  predictor.keep_embeddings = bool(args.embeddings)
  embedded_paths, embedded = [], []
  print(f'{"status":<9} {"prediction":<32} file', flush=True)
  with open(args.output or os.devnull, 'w', encoding='utf-8') as output:
    for outcome in predict_files(predictor, paths, args.top_k):
      counts[outcome['status']] += 1
      if predictor.keep_embeddings and outcome['status'] != 'failed':
        embedded_paths.append(outcome['path'])
        embedded.append(predictor.last_embeddings)
      print(table_row(outcome), flush=True)
      output.write(json.dumps(outcome) + '\n')
      output.flush()
  print(f'{sum(counts.values())} files: ' + ', '.join(f'{n} {status}' for status, n in counts.items()),
        flush=True)
  if args.embeddings:
    embeddings.save(args.embeddings, embedded_paths, embedded)
    print(f'Embeddings of {len(embedded)} files written to {args.embeddings}', flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
