"""Data: record schema, prompt template, video decoding, grain pipelines, synthetic set.

schema (records and their validation), templates (the chat prompt), video (frames; decord, then
PyAV), frame_cache, pipeline (`sft_dataset`, `rl_dataset`, `eval_dataset`, `DataConfig`),
synthetic (`python -m lvr_jax.data.synthetic`), tfds_builder (optional). Nothing here imports
the model or the learners.
"""
