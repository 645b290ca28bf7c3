"""The data stage: raw corpora -> clean, deduplicated, tokenized, packed Parquet shards.

Pure cores (``normalize``, ``quality``, ``pii``, ``minhash``, ``packing``, ...) never import Ray;
``ray_ops`` maps them over Ray Data and ``prepare`` orchestrates the stage.
"""
