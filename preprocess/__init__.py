"""Offline data tools: videos (or BAIR TFRecords) -> WebDataset tar shards. Never imports torch."""
