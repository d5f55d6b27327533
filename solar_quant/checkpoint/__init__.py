"""Checkpoint I/O: `reader` reads a Hugging Face folder tensor by tensor from headers and
memory-mapped shards; `writer` streams shards into a staged folder that appears atomically;
`manifest` hashes every file. Kept import-light so `inspect` never loads torch."""
