"""Start AVT from public pretrained weights or this project's own checkpoints (`config.init.*`).

    from avt_jax import pretrained
    prepared = pretrained.prepare(config, abstract_state.params)  # None without config.init
    params = pretrained.load_into(config, host_params)  # the same, unsharded (probes, notebooks)
    state = pretrained.apply(prepared, state, state_shardings, tx)
    print(pretrained.format_report(prepared.report))

`files.py` reads containers (npz, safetensors, flax msgpack, orbax; never pickle), `layouts.py`
detects and converts each format's key layout, `mapping.py` maps them onto AVT's parameters and
builds the report, `loader.py` ties them to the config and to the sharded train state.
"""

from avt_jax.pretrained.files import PretrainedError, read
from avt_jax.pretrained.layouts import FORMATS, Source, convert, detect
from avt_jax.pretrained.loader import (REPORT_FILE, Prepared, apply, format_report,
                                       load_into, map_params, plan, prepare, read_source, requested,
                                       save_report, saved_report, target_layout, validate)
