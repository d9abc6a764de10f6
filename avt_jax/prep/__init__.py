"""Offline preparation: raw video files and annotations -> sharded records of JPEG frames and log-mels.

Modules: `annotations` (clip lists from annotation files), `media` (PyAV decoding), `logmel` (librosa
spectrograms), `shards` (parallel, resumable record writer and dataset statistics), `demo_data` (the
synthetic demo dataset).
"""
