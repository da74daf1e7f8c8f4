"""The data side of evdm: shards in, the trainer's batches and everyone's clips out (docs/ARCHITECTURE.md, "Data").
Kept import-free: preprocess imports the torch-free modules (schema, manifest) without loading torch."""
