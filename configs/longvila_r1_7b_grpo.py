"""LongVILA-R1-7B GRPO: the paper's RL recipe (REFERENCE.md §6).

    python -m lvr_jax.train --config=configs/longvila_r1_7b_grpo.py:gpu8 --workdir=runs/r1_grpo \
        --config.model.init=runs/r1_sft/model --config.data.records=data/rl.jsonl \
        --config.data.video_root=data/videos

`gpu8`: one node of 8 GPUs (FSDP x 2, Ulysses sequence parallelism x 4, as the paper);
`tpu`: a TPU slice (FSDP over the rest, ring attention over 8 chips of sequence);
`hour`: an hour of video (4,096 frames, about 1.05M tokens per sequence) on one node of
8 GPUs: ring attention over all 8 (28 heads do not split 8 ways for Ulysses), four prompts
per rollout chunk (the 5 samples of each decoding against its one KV cache), one group (a
prompt, run once, and its 5 samples) per micro-batch and log-prob pass, the LLM's backward
keeping one layer input in 4. Each rollout prompt's embeddings take 7.5 GB of host memory
between the passes: the 128 of a rollout batch about 1 TB (lower data.batch_size and
rl.update_batch_size together on a smaller host).
"""

from lvr_jax.config import RECIPE_MESHES, RECIPE_MICRO_BATCH, base_config, paper_grpo


def get_config(platform: str = "gpu8"):
    hour = platform == "hour"
    c = base_config()
    c.stage = "grpo"
    paper_grpo(c)
    c.model.update(preset="longvila_r1_7b", dtype="bfloat16", param_dtype="float32", remat=True)
    c.mesh.update(RECIPE_MESHES["tpu" if hour else platform])
    # sequences per micro-batch: whole groups, one per group of devices that splits the
    # batch, each prompt's forward shared by its 5 samples; each micro-batch a pass of its
    # own, its prompts copied from host memory (rl.offload_prompts), the gradients summed
    c.optim.micro_batch_size = RECIPE_MICRO_BATCH["tpu" if hour else platform] * 5
    c.data.update(num_frames=256, batch_size=512, max_length=2048, num_workers=8)
    # the 512 prompts' embeddings (233 GB in bf16) wait in host memory; the update and the
    # old/reference log-probs go micro-batch by micro-batch
    c.rl.offload_prompts = True
    # 8 prompts' 40 samples at a time: each holds a KV cache of ~70K slots (4 GB in bf16)
    c.rl.rollout.prompts_per_chunk = 8
    # 64 GiB of video embeddings in host memory: on the GPUs they would take 8-16 GiB each
    c.cache.update(budget_mb=65536, on_host=True)
    if hour:
        c.data.update(num_frames=4096, batch_size=128)
        # a prompt's KV cache is 7.6 GiB per device, one per group (its 5 samples share it)
        c.rl.rollout.prompts_per_chunk = 4
        c.model.remat_group = 4  # 7 layer inputs kept instead of 28 (0.9 GiB each per device)
    return c
