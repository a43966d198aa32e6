"""Data: record schema, video decoding, templates, grain pipelines, synthetic set."""
