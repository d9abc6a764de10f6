"""Train-step benchmark (step time, FLOPs, MFU, memory, compile time) and the fusion scaling study.

    python -m avt_jax.benchmark [--configs=tiny,small,base] [--steps=5] [--repeats=3]
        [--batch_size=N] [--dtype=float32|bfloat16] [--attention=xla|chunked|cudnn]
        [--attention_chunk_size=128] [--remat_policy=none|dots|full] [--scan_layers]
        [--objectives=classification|all] [--output_dir=benchmark_results]
    python -m avt_jax.benchmark --mode=fusion [--fusion_size=small] [--paper_scale] ...

`--mode=train` (default) first measures the machine's matmul peak for the dtype in use (the best
of square matmuls of a few sizes), then for each benchmark config (`configs.BENCHMARKS`) compiles
the train step (`avt_jax.train_step.make_train_step`: forward, backward, AdamW update) and reports

  - step time: median over `--steps` timed steps after compilation and one warm-up step, in each of
    `--repeats` rounds;
  - model FLOPs per step: `avt_jax.models.summary.model_flops` (XLA's cost analysis of the lowered
    program) of the *plain* step (xla attention, no remat, no scan), so recomputation does not count
    as useful work, loops are not under-counted, and the count is the same on every backend;
  - achieved FLOP/s = model FLOPs / step time, and MFU = achieved / matmul peak, where the peak is
    the best sustained matmul throughput measured in the whole run: at the start and after every
    timed step (one block of products), so that a moment when the machine was busy with other work
    can only lower the MFU, never raise it. For bfloat16 the float32 peak is measured as well and
    `mfu_vs_float32_peak` uses it. `cores_used` (process CPU time / wall time during the steps) shows
    how much of the machine the step had;
  - peak memory of the compiled step (arguments + outputs - donated + temporaries, XLA's memory
    analysis), for the configured controls and for the plain step;
  - trace (lowering) and compile time, with the persistent compilation cache off.

`--mode=fusion` measures bottleneck vs concat vs late fusion as the number of video tokens grows
(`configs.FUSION_STUDY_VIDEO`: 8 -> 32 frames, 112 -> 224 pixels) at fixed audio (800 x 128): FLOPs,
peak memory and step time per fusion, and with `--paper_scale` the base model at 32 x 224 (paper
scale).

`--mode=input --config=configs/demo.py [--data_dir=... | --synthetic_clips=N]` compares the
examples per second the training input pipeline (`avt_jax.input.make_train_iterator`) delivers with
what the train step of that config consumes (`--step_batch_size` and the control flags apply to the
step). `--synthetic_clips` writes random clips at the config's scale first (e.g. for the paper-scale
configs without their datasets). `--config_file=PATH [--config_arg=ARG]` is `--config=PATH:ARG`.

Each mode writes `<mode>.json`, `<mode>.md` (a markdown table) and `<mode>.png` to `--output_dir`.
The benchmark runs on one device (the first of `jax.devices()`).

Modules: `peak` (matmul peak), `configs` (benchmark configs, controls), `measure` (FLOPs, memory,
timing), `modes` (the three modes), `synthetic_data`, `report` (JSON, markdown, figure), `cli`.
"""
