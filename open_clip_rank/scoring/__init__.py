"""Scoring at scale: partitioned inputs, streamed decoding, Parquet score folders, curation (``select``)."""
