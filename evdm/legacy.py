"""What earlier evdm versions wrote (checkpoint configs and stream records, Conv3d weights and AdamW
state, preprocess progress records), upgraded to today's form in one place; old keys in a config file
are refused. Each rule names the commit that stopped writing the old form (tests/test_legacy.py). Torch-free."""

import json
from typing import Any

# Keys that are gone; they changed no weights, so a stored config drops them.
RETIRED = {
    ("train", "vis_every"): "use train.preview_every (a step count)",  # 61faa91
    ("train", "amp"): 'use train.precision = "auto" | "bf16" | "fp16" | "fp32"',  # fd07e8f
    ("train", "amp_dtype"): 'use train.precision = "auto" | "bf16" | "fp16" | "fp32"',  # fd07e8f
    ("train", "amp_on_cpu"): 'use train.precision = "bf16" (auto is fp32 on CPU)',  # fd07e8f
    ("train", "compile_on_cpu"): 'use train.compile = "on" (auto compiles on CUDA only)',  # fd07e8f
    ("sample", "dynamic_threshold_percentile"): "use sample.dynamic_threshold (the percentile itself; 0 = off)",  # d93e26e
    ("train", "channels_last"): "remove it: the model always runs channels-last",  # 6ab7df0
    ("model", "spacetime"): "remove it: the per-frame Conv2d form is the only one (checkpoints of either form load)",  # 6ab7df0
}
# Keys that kept their name but changed type: old value -> new value, and the new values spelled out.
RETYPED = {
    ("train", "compile"): ({True: "auto", False: "off"}, '"auto" | "on" | "off"'),  # a bool before fd07e8f
    ("sample", "dynamic_threshold"): ({True: 0.995, False: 0.0}, "a percentile in (0, 1], or 0 for off"),  # d93e26e
}
# Keys added since, with the value that rebuilds the old checkpoints' models (not today's default).
ADDED = {("model", "direct_input"): "none"}  # 15ca32d
# The context counts were data.endpoint_context (both ends; default 2), then from fe93d46 to 6ab7df0 data.context_start
# / context_end (0: endpoint_context); now data.context = [start, end], endpoint_context = K the shorthand for [K, K].
SPLIT_CONTEXT_KEYS = ("context_start", "context_end")
OLD_ENDPOINT_DEFAULT = 2
# What the data stream depended on, recorded in checkpoints since 110d600 (evdm.data.resume.Stream).
STREAM_CONFIG_KEYS = {"batch_size": "train", "grad_accum_steps": "train", "num_workers": "data",
                      "shuffle_buffer": "data"}
# Options of preprocess.shard added since ba76329; a progress record without them ran as today's defaults do.
PREPROCESS_OPTIONS_ADDED = ("fps", "extensions", "split_lists", "split_column", "max_clips_per_video", "max_videos",
                            "scene_cut")


def refuse_old_keys(section: str, values: dict) -> None:
    """ValueError naming the first key of an earlier version in a config file's section, and its replacement."""
    for key, value in values.items():
        if (section, key) in RETIRED:
            raise ValueError(f"{section}.{key} is gone; {RETIRED[section, key]}")
        if (section, key) in RETYPED and isinstance(value, bool):
            old_to_new, spelled = RETYPED[section, key]
            raise ValueError(f"{section}.{key} is now one of {spelled}, not a bool; {value!r} was {old_to_new[value]!r}")
        if section == "data" and key in SPLIT_CONTEXT_KEYS:
            raise ValueError(f"data.{key} is gone; use data.context = [start, end] (frames observed at each end)")


def upgrade_config(raw: dict) -> dict:
    """A stored config (a checkpoint's, as a plain dict) in today's keys; `raw` is not changed."""
    out = {}
    for section, values in raw.items():
        if isinstance(values, dict):
            values = {key: value for key, value in values.items() if (section, key) not in RETIRED}
            for (sec, key), (old_to_new, _) in RETYPED.items():
                if sec == section and isinstance(values.get(key), bool):
                    values[key] = old_to_new[values[key]]
            values.update({key: v for (sec, key), v in ADDED.items() if sec == section and key not in values})
            if section == "data":
                values = _stored_context(values)
        out[section] = values
    return out


def _stored_context(values: dict) -> dict:
    """data.context from a stored config's context_start / context_end, whichever spelling it has."""
    if "context" in values or not any(k in values for k in SPLIT_CONTEXT_KEYS):
        return values
    K = values.pop("endpoint_context", OLD_ENDPOINT_DEFAULT)
    values["context"] = [values.pop(k) or K for k in SPLIT_CONTEXT_KEYS]  # 0 meant endpoint_context
    return values


def upgrade_checkpoint(ckpt: dict) -> dict:
    """A loaded checkpoint with its stored config and stream record in today's form (in place; returned)."""
    ckpt["config"] = upgrade_config(ckpt["config"])
    ckpt.setdefault("best", None)  # before best.pt: the run's best starts over at its next validation
    if ckpt.get("stream") is None:  # before the record: what the stored config says, the rest unknown
        cfg = ckpt["config"]
        ckpt["stream"] = {key: cfg.get(section, {}).get(key) for key, section in STREAM_CONFIG_KEYS.items()}
        ckpt["stream"].update(world_size=None, shard_list=None, train_clips=None, start_step=0, start_epoch=None)
    return ckpt


def _reshaped(value: Any, shape: Any) -> Any:
    """A tensor `value` reshaped to `shape` where the two differ only by singleton dimensions, else `value`."""
    shape, squeezed = tuple(shape), lambda dims: [d for d in dims if d != 1]  # noqa: E731
    if getattr(value, "ndim", 0) > 0 and tuple(value.shape) != shape and squeezed(value.shape) == squeezed(shape):
        return value.reshape(shape)
    return value


def upgrade_weights(state: dict, expected: dict) -> dict:
    """`state` with the Conv3d kernels written before 6ab7df0 reshaped to their Conv2d twins in `expected`
    (a model's state dict); other mismatches are left for evdm.checkpoint.load_weights to report."""
    return {key: _reshaped(value, expected[key].shape) if key in expected else value for key, value in state.items()}


def upgrade_optimizer_state(optimizer_state: dict, shapes: list) -> dict:
    """An AdamW state dict with its tensors reshaped as `upgrade_weights` does (`shapes`: in the optimizer's order)."""
    state = {index: {k: _reshaped(v, shapes[int(index)]) for k, v in per_param.items()}
             for index, per_param in optimizer_state["state"].items()}
    return {**optimizer_state, "state": state}


def upgrade_progress_identity(identity: dict, defaults: dict) -> dict:
    """A preprocess progress record's identity with the options it predates filled in from `defaults` (JSON-shaped;
    a writer without such an option, preprocess.bair, passes none)."""
    options = identity.get("options")
    if not isinstance(options, dict):
        return identity
    missing = {k: json.loads(json.dumps(defaults[k])) for k in PREPROCESS_OPTIONS_ADDED
               if k in defaults and k not in options}
    return {**identity, "options": {**options, **missing}}
