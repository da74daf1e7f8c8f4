"""The data side of evdm: shards in, the trainer's batches and everyone's clips out.

- schema.py     the shard format: samples, shard names, shard patterns -> files and the (rank,
                worker) partition of a pass (torch-free; preprocess writes it)
- manifest.py   manifest.json as a type (torch-free; preprocess writes it, everyone else reads it)
- tar.py        tar and .npy parsing: clip references, damage detection
- shardset.py   a shard list and its manifest, read once: checks, counts, digests, identity
- stream.py     the resumable per-reader stream (shuffle buffer, batches, damaged shards skipped)
- loader.py     the trainer's loader (DataLoader workers, shared-memory batch ring), and clips in
                order: the val subset, sample.py's and evaluate's inputs
- dali.py       the NVIDIA DALI loader (data.loader = "dali")

Kept import-free: preprocess imports the torch-free modules without loading torch.
"""
