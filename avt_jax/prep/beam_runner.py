"""Data preparation as an Apache Beam pipeline (`python -m avt_jax.prepare --runner=beam`).

Our design: the plan (clips -> shards, `prepare_plan.json`) is made by the launching process, as for
the local runner. The pipeline holds one element per unfinished shard; each element is decoded clip
by clip in a worker process of the Beam worker (`shards.write_one_shard`: a decoder crash costs only
its clip) and written with the local runner's code: the shard under `.incomplete/`, its statistics
in `shard_stats/`, then renamed into place. A rerun therefore skips finished shards, and a shard
that Beam retries is simply written again. After the pipeline the launching process combines the
per-shard statistics into `stats.json` and `report.jsonl`.

Without options the embedded DirectRunner runs the pipeline on this machine. Larger-than-one-machine
runs use standard Beam options, e.g. Dataflow. The workers need this package
(`--setup_file=./setup.py`), the videos as files at the same path as on the launching machine (a
file system mounted on all of them: NFS / Filestore, Cloud Storage FUSE; PyAV opens local paths)
and an output folder they can write (`gs://` works through `tf.io.gfile`):

    --beam_options="--runner=DataflowRunner --project=P --region=us-central1
                    --temp_location=gs://B/tmp --setup_file=./setup.py"
"""

import shlex
from typing import Mapping, Sequence

try:
  import apache_beam as beam
  from apache_beam.options import pipeline_options
except ImportError as e:
  raise ImportError("--runner=beam needs Apache Beam: pip install -e '.[beam]'") from e

from avt_jax.prep import annotations
from avt_jax.prep import shards


def parse_options(beam_options: str) -> pipeline_options.PipelineOptions:
  """Beam pipeline options from one command-line string ('' for the DirectRunner).

  Raises:
    ValueError: `beam_options` cannot be split like a shell command line (naming it).
  """
  try:
    return pipeline_options.PipelineOptions(shlex.split(beam_options))
  except ValueError as e:
    raise ValueError(f'--beam_options: {e}: {beam_options!r}') from None


def write_shards(pending: Mapping[str, Sequence[annotations.ClipSpec]], video_dir: str,
                 out_dir: str, settings: shards.RecordSettings,
                 label_names: Mapping[str, Sequence[str]],
                 options: pipeline_options.PipelineOptions) -> None:
  """Decodes and writes the shards `pending` (shard name -> its clips) with Apache Beam (with
  `options` bound, a `shards.ShardWriter`).

  Args:
    pending: the shards to write, with their clips in shard order.
    video_dir: folder the clip paths are relative to (readable by the Beam workers).
    out_dir: the output folder (writable by the Beam workers).
    settings: decoding settings of the preparation.
    label_names: label head -> class names.
    options: pipeline options (`parse_options`).
  """
  if not pending:
    return
  with beam.Pipeline(options=options) as pipeline:
    _ = (pipeline
         | 'Shards' >> beam.Create(sorted((name, list(clips)) for name, clips in pending.items()))
         | 'Spread over workers' >> beam.Reshuffle()
         | 'Decode and write' >> beam.Map(_write_shard, video_dir=video_dir, out_dir=out_dir,
                                          settings=settings, label_names=dict(label_names)))


def _write_shard(shard: tuple[str, list[annotations.ClipSpec]], video_dir: str, out_dir: str,
                 settings: shards.RecordSettings, label_names: dict[str, list[str]]) -> None:
  name, clips = shard
  shards.write_one_shard(name, clips, video_dir, out_dir, settings, label_names)
