"""On-disk formats with exact pack/unpack inverses: gptq_v1, bnb."""
