"""Config keys of earlier evdm versions: refused in a config file with the new spelling named, translated
in the configs stored in old checkpoints (which must keep loading). Torch-free.

`translate(section, values, stored)` is the one place that knows them; evdm.config calls it per section.
"""

from __future__ import annotations

# Keys that are gone; they changed no weights, so a stored config simply drops them.
RETIRED = {
    ("train", "vis_every"): "use train.preview_every (a step count)",
    ("train", "amp"): 'use train.precision = "auto" | "bf16" | "fp16" | "fp32"',
    ("train", "amp_dtype"): 'use train.precision = "auto" | "bf16" | "fp16" | "fp32"',
    ("train", "amp_on_cpu"): 'use train.precision = "bf16" (auto is fp32 on CPU)',
    ("train", "compile_on_cpu"): 'use train.compile = "on" (auto compiles on CUDA only)',
    ("train", "channels_last"): "remove it: the model always runs channels-last (evdm.models.blocks says why)",
    ("sample", "dynamic_threshold_percentile"): "use sample.dynamic_threshold (the percentile itself; 0 = off)",
    ("model", "spacetime"): "remove it: the per-frame Conv2d form is the only one (checkpoints of either form load)",
}
# Keys that kept their name but changed type: an old value in a stored config maps to the new one; in a
# config file it is refused naming the new values. train.compile was a bool meaning "compile on CUDA".
RETYPED = {
    ("train", "compile"): ({True: "auto", False: "off"}, '"auto" | "on" | "off"'),
    ("sample", "dynamic_threshold"): ({True: 0.995, False: 0.0}, "a percentile in (0, 1], or 0 for off"),
}
# Keys added after checkpoints were written, with the value that rebuilds those checkpoints' models: a
# stored config without the key gets this, not the dataclass default (what new runs should use).
ADDED = {("model", "direct_input"): "none"}
# The context counts were three keys: endpoint_context (both ends) and context_start / context_end
# (0 meaning "endpoint_context"). Now one key, data.context = [start, end]; endpoint_context = K stays
# as the shorthand for [K, K].
SPLIT_CONTEXT_KEYS = ("context_start", "context_end")
OLD_ENDPOINT_DEFAULT = 2


def translate(section: str, values: dict, *, stored: bool) -> dict:
    """`values` of one config section with earlier versions' keys translated (stored configs) or refused
    (ValueError naming the key and its replacement, for config files)."""
    out = {}
    for key, value in values.items():
        if (section, key) in RETIRED:
            if not stored:
                raise ValueError(f"{section}.{key} is gone; {RETIRED[section, key]}")
            continue
        if (section, key) in RETYPED and isinstance(value, bool):
            old_to_new, spelled = RETYPED[section, key]
            if not stored:
                raise ValueError(f"{section}.{key} is now one of {spelled}, not a bool; {value!r} was {old_to_new[value]!r}")
            value = old_to_new[value]
        out[key] = value
    if stored:
        out.update({key: value for (sec, key), value in ADDED.items() if sec == section and key not in out})
    return _context(out, stored) if section == "data" else out


def _context(values: dict, stored: bool) -> dict:
    """data.context from the shorthand endpoint_context, or (stored configs) from context_start / context_end."""
    split = [k for k in SPLIT_CONTEXT_KEYS if k in values]
    if split and not stored:
        raise ValueError(f"data.{split[0]} is gone; use data.context = [start, end] (frames observed at each end)")
    if "endpoint_context" in values:
        if "context" in values:
            raise ValueError("data.context and data.endpoint_context (its shorthand) both given; keep one")
        K = values.pop("endpoint_context")
        if split:  # an old stored config: 0 meant "endpoint_context"
            values["context"] = [values.pop(k) or K for k in SPLIT_CONTEXT_KEYS]
        else:
            values["context"] = [K, K] if isinstance(K, int) and not isinstance(K, bool) else K
    elif split:
        values["context"] = [values.pop(k) or OLD_ENDPOINT_DEFAULT for k in SPLIT_CONTEXT_KEYS]
    return values
