"""LongVideo-Reason generation: long videos -> clip captions -> reasoning QA with chains of thought.

    python -m lvr_jax.datagen --config=lvr_jax/datagen/config.py \\
        --config.videos_dir=DIR --config.out_dir=OUT

clips.py splits videos into clips and samples frames; captioners.py captions them (this
project's LongVILA, or any OpenAI-compatible VLM); prompts.py asks a reasoning LLM for
four-category questions; parse.py validates the replies; records.py writes training
records, per-video state (resumption) and rejections; pipeline.py runs it all.
"""
