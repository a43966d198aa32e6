"""A 3B-class long-video GRPO recipe: Qwen2.5-3B with SigLIP and the 3x3 projector, 61 tokens
per frame, thousands of frames on one node of 8 GPUs (the paper's 3B reaches 3,600 frames,
about 256K tokens, at 60 tokens per frame).

    python -m lvr_jax.train --config=configs/longvila_3b_grpo.py --workdir=runs/3b_grpo \
        --config.model.init=runs/3b_sft/model --config.data.records=data/rl.jsonl \
        --config.data.video_root=data/videos

Tokens per frame: the 3x3 projector gives 11 x 11 = 121 per frame, NVILA's temporal
pooling (the tsp video encoder, pool [2, 1, 1]) averages consecutive pairs of frames,
and each pooled frame ends with "\\n": 122 tokens per 2 frames. The mesh: all 8 devices
split the sequence (Ulysses: 16 heads give 2 to each device). The paper's GRPO settings
(REFERENCE.md §6) otherwise; `python -m benchmarks.recipe_memory --recipe longvila_3b_grpo`
gives the ceiling of frames.
"""

from lvr_jax.config import base_config, paper_grpo

TSP_PAIRS = '{"_target_": "llava.model.encoders.TSPVideoEncoder", "pool_sizes": [[2, 1, 1]]}'


def get_config(platform: str = "gpu8"):
    if platform != "gpu8":
        raise ValueError(f"longvila_3b_grpo has one platform, gpu8 (got {platform!r})")
    c = base_config()
    c.stage = "grpo"
    paper_grpo(c)
    c.model.update(preset="longvila_3b", dtype="bfloat16", param_dtype="float32", remat=True,
                   projector_type="mlp_downsample_3x3_fix", video_encoder=TSP_PAIRS)
    c.mesh.update(shape=dict(data=1, fsdp=-1, sp=8, tp=1), attention="ulysses")
    c.optim.micro_batch_size = 1  # a pass per sequence, its prompt copied from host memory
    c.data.update(num_frames=3600, batch_size=128, max_length=2048, num_workers=8)
    c.rl.offload_prompts = True  # prompts in host memory; update and log-probs streamed
    c.rl.rollout.prompts_per_chunk = 1
    c.model.remat_group = 4
    c.cache.update(budget_mb=65536, on_host=True)
    return c
