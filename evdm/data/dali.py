"""NVIDIA DALI variant of the training loader (data.loader = "dali"): `fn.readers.webdataset` reads the same shards
(index inferred at start-up), `fn.decoders.numpy` decodes each clip, ranks read disjoint parts (shard_id / num_shards).
`device_id=None` runs DALI's CPU-only mode (the equivalence test, the benchmark). No exact resume (the reader cannot
fast-forward); damaged shards are left to DALI's reader."""

import os
from typing import Iterator

import torch

from evdm.config import ConfigError, RunConfig
from evdm.data.schema import CLIP_EXT


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def dali_batches(urls: list[str], *, batch_size: int, device_id: int | None, shard_id: int = 0, num_shards: int = 1,
                 shuffle_buffer: int = 0, seed: int = 0, num_threads: int = 2) -> Iterator[torch.Tensor]:
    """Infinite uint8 [B, C, T, H, W] batches (views of [B, T, H, W, C]) on GPU `device_id` (None: the CPU)."""
    from nvidia.dali import fn, pipeline_def
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    if remote := [u for u in urls if "://" in u or u.startswith("pipe:")]:
        raise ConfigError(f"data.loader = 'dali' reads local shard files only, got {remote[0]!r}; "
                          "use data.loader = 'webdataset' for pipe: or remote URLs")

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                  prefetch_queue_depth=2)
    def clips_pipeline():
        raw = fn.readers.webdataset(paths=urls, ext=[CLIP_EXT], missing_component_behavior="error",
                                    name="shards", shard_id=shard_id, num_shards=num_shards,
                                    random_shuffle=shuffle_buffer > 1, initial_fill=max(shuffle_buffer, 1))
        clip = fn.decoders.numpy(raw)
        return clip.gpu() if device_id is not None else clip

    pipe = clips_pipeline()
    pipe.build()
    # size=-1 and no reader_name: the iterator never ends; the reader wraps around its shard.
    for out in DALIGenericIterator([pipe], ["clip"]):
        yield out[0]["clip"].permute(0, 4, 1, 2, 3)


def make_dali_train_loader(cfg: RunConfig, urls: list[str], *, rank: int = 0, world_size: int = 1,
                           seed: int = 0) -> Iterator[torch.Tensor]:
    """The trainer's DALI loader: infinite uint8 [B, C, T, H, W] batches on this rank's GPU."""
    if not dali_available():
        raise ConfigError("data.loader = 'dali' needs NVIDIA DALI, which is not installed: pip install 'evdm[dali]' "
                          "(the nvidia-dali-cuda120 package), or set data.loader = 'webdataset'")
    if not torch.cuda.is_available():
        raise ConfigError("data.loader = 'dali' needs a CUDA GPU, and none is available here; "
                          "set data.loader = 'webdataset'")
    return dali_batches(urls, batch_size=cfg.train.batch_size, device_id=int(os.environ.get("LOCAL_RANK", "0")),
                        shard_id=rank, num_shards=world_size, shuffle_buffer=cfg.data.shuffle_buffer,
                        seed=seed % 2**31, num_threads=max(cfg.data.num_workers, 1))
