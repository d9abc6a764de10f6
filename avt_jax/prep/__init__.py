"""Offline preparation: raw video files and annotations -> sharded records of JPEG frames and log-mels.

Modules: `registry` (`--dataset` name -> dataset entry) over `datasets/` (one module per dataset: its
annotation parser, defaults, TFDS builder description and smoke writer), `annotations` (what the
parsers share: `ClipSpec`, safe paths, the video index), `preparation` (annotations -> records, what
`python -m avt_jax.prepare` runs), `media` (PyAV decoding), `logmel` (librosa spectrograms), `shards`
(parallel, resumable record writer and dataset statistics), `beam_runner` (the same on Apache Beam),
`cache` (generated datasets built once), `demo_data` and `voice_digits` (generated datasets, written
as manifests), `smoke_data` and `smoke_clips` (tiny copies in each real dataset's format).
"""
