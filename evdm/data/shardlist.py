"""Shard lists: URL patterns expanded to shard files, and the disjoint (rank, worker) partition of a pass."""

from __future__ import annotations

import glob
import os

import braceexpand
import numpy as np

from evdm.config import ConfigError

REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://")


def expand_urls(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """Shard URLs from a glob, a brace pattern ("train-{000000..000009}.tar"), a list, or pipe: URLs.

    Local globs are sorted; a local pattern that matches nothing raises ConfigError naming it.
    Remote URLs (pipe:, http(s)://, s3://, gs://) are brace-expanded only.
    """
    specs = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for item in specs:
        for url in braceexpand.braceexpand(item):
            if url.startswith(REMOTE_PREFIXES):
                urls.append(url)
                continue
            if glob.has_magic(url):
                matched = sorted(glob.glob(url))
                if not matched:
                    raise ConfigError(f"shard pattern {url!r} matches no file")
                urls.extend(matched)
            elif os.path.isfile(url):
                urls.append(url)
            else:
                raise ConfigError(f"shard file {url!r} not found")
    if not urls:
        raise ConfigError(f"shard spec {spec!r} names no shard")
    return urls


def shard_slice(
    urls: list[str], rank: int, world_size: int, worker: int, num_workers: int,
    epoch: int, seed: int, *, shuffle: bool = True,
) -> list[str]:
    """The shards that (rank, worker) reads in pass `epoch`: disjoint across all ranks and workers.

    The list is permuted with (seed, epoch) -- the same on every rank -- when `shuffle`, then dealt
    round-robin over the world_size * num_workers readers, so one pass reads every shard exactly once.
    """
    order = list(urls)
    if shuffle:
        perm = np.random.default_rng([seed, epoch]).permutation(len(order))
        order = [order[i] for i in perm]
    slot = rank * num_workers + worker
    return order[slot :: world_size * num_workers]
