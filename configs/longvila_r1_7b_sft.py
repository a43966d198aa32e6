"""LongVILA-R1-7B CoT-SFT: reasoning answers on long videos, LLM + projector trained.

    python -m lvr_jax.train --config=configs/longvila_r1_7b_sft.py:gpu8 --workdir=runs/r1_sft \
        --config.model.init=path/to/vila_checkpoint --config.data.records=data/sft.jsonl \
        --config.data.video_root=data/videos

The vision tower stays frozen, so its features are computed once per video (embedding
cache). `gpu8` / `tpu` meshes as in lvr_jax.config.RECIPE_MESHES.
"""

from lvr_jax.config import RECIPE_MESHES, RECIPE_MICRO_BATCH, base_config


def get_config(platform: str = "gpu8"):
    c = base_config()
    c.stage = "sft"
    c.model.update(preset="longvila_r1_7b", dtype="bfloat16", param_dtype="float32", remat=True)
    c.mesh.update(RECIPE_MESHES[platform])
    c.optim.micro_batch_size = RECIPE_MICRO_BATCH[platform]  # gradients summed in the step
    c.data.update(num_frames=256, batch_size=8, max_length=4096, num_workers=8)
    c.optim.update(lr=1e-5, schedule="cosine", warmup_steps=100, decay_steps=5000,
                   weight_decay=0.0, grad_clip=1.0, grad_accum_steps=16)  # 128 per update
    # 64 GiB of video embeddings in host memory: on the GPUs they would take 8-16 GiB each
    c.cache.update(budget_mb=65536, on_host=True)
    c.train.update(num_steps=5000, checkpoint_every=200)
    return c
