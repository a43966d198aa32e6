"""GRPO as a stage (`lvr_jax.stages.Stage`): every process reads every prompt of a rollout
batch, the rollout engine a recipe names samples the policy, and a step holds the reference
policy beside the update; its rollout and log-prob passes are phases of their own."""

from __future__ import annotations

import jax
from flax import nnx

from lvr_jax.config import ConfigError
from lvr_jax.data.pipeline import rl_dataset
from lvr_jax.model.sampler import trace_generate
from lvr_jax.rl import learner as grpo_learner
from lvr_jax.rl.engines import make_engine
from lvr_jax.rl.passes import groups_per_micro_batch, logprob_prompts
from lvr_jax.rl.rollout import prompts_per_chunk, sampling_params
from lvr_jax.sharding import forwards, hosts, prompts


class GRPO:
    name = "grpo"
    curves = ("val_accuracy", "reward", "accuracy", "pass_at_g", "mixed_groups", "reward_std",
              "update_alignment", "kl", "entropy", "clip_fraction", "response_length",
              "logprob_mismatch")
    batch_layout = prompts.LAYOUT
    trainable_filter = staticmethod(grpo_learner.trainable_filter)
    loss_fn = staticmethod(grpo_learner.make_loss_fn)
    micro_batches = staticmethod(grpo_learner.micro_batches)
    streams_update = staticmethod(grpo_learner.streams_update)
    abstract_batch = staticmethod(grpo_learner.abstract_batch)

    def check(self, config) -> None:
        if config.rl.num_generations < 2:
            raise ConfigError(f"rl.num_generations must be at least 2 for GRPO, got "
                              f"{config.rl.num_generations}: a group of one sample has no "
                              "advantage, so it carries no signal")
        check_model_init(config)
        check_sampling(config)
        check_off_policy(config)

    def prepare(self, config, workdir: str) -> None:
        del config, workdir  # GRPO starts from a model: its init or (if allowed) the preset

    def video_output(self, config) -> str:
        return "embeddings"  # tower and projector frozen: whole video embeddings cached

    def row_share(self, config, mesh) -> hosts.RowShare:
        """Every prompt, on every process: the group advantages, dynamic sampling and update
        chunks are decisions over the whole rollout batch that every process takes alike, and
        a rollout batch has few prompts."""
        return hosts.RowShare()

    def dataset(self, data, tokenizer, on_epoch_end):
        return rl_dataset(data, tokenizer, on_epoch_end=on_epoch_end)

    def learner(self, config, model, tokenizer, cache, mesh, share) -> grpo_learner.GRPOLearner:
        del share  # every process reads every prompt (`row_share`)
        return grpo_learner.GRPOLearner(model, config, tokenizer, cache, mesh,
                                   engine=make_engine(config, tokenizer.pad_id, mesh))

    def trace_phases(self, config, mesh, llm, abstract_batch) -> dict:
        """The rollout of one chunk of prompts (`rl.rollout.prompts_per_chunk`, else the whole
        rollout batch: prefill, KV cache and decoding of the G samples) and one old /
        reference log-prob pass (`rl.logprob_prompts` prompts, or one streamed micro-batch
        of sequences)."""
        rl = config.rl
        graphdef, state = nnx.split(llm)
        chunk = abstract_batch(prompts=prompts_per_chunk(config))
        rollout = trace_generate(graphdef, state, chunk["prompt_embeds"], chunk["prompt_valid"],
                                 sampling_params(rl, (0,)),
                                 forwards=forwards.sampler_forwards(mesh, config.mesh))
        if grpo_learner.streams_update(config):  # one streamed micro-batch of whole groups
            batch = abstract_batch(micro=True)
        else:
            batch = abstract_batch(prompts=logprob_prompts(rl))
        logprobs_fn = forwards.response_logprobs_fn(mesh, config.mesh)

        def logprobs(state, batch):
            return grpo_learner.batch_logprobs(logprobs_fn, nnx.merge(graphdef, state), batch,
                                          rl.temperature)[0]
        return {"rollout": rollout, "log-probs": jax.jit(logprobs).trace(state, batch)}

    def phase_calls(self, config) -> dict:
        """Per step: a rollout per chunk of prompts; log-prob passes for the old policy, the
        reference (with a KL term) and the update's measure, over every prompt of the
        batch; the update's micro-batches (or steps) over them, `rl.ppo_epochs` times."""
        rl, prompts = config.rl, config.data.batch_size
        passes = 1 + (rl.kl_coef > 0) + bool(rl.measure_update)
        steps = rl.ppo_epochs * prompts // rl.update_batch_size
        if grpo_learner.streams_update(config):
            groups = groups_per_micro_batch(config.optim.micro_batch_size, rl.num_generations)
            batches = prompts // groups
            update = {"update micro-batch": rl.ppo_epochs * batches, "optimizer step": steps}
        else:
            batches = prompts // logprob_prompts(rl)
            update = {"update": steps}
        return {"frame encoding": prompts, "rollout": prompts // prompts_per_chunk(config),
                "log-probs": passes * batches, **update}

    def loop_trips(self, config) -> int:
        return config.rl.max_new_tokens  # the sampler decodes at most that many tokens

    def held_during_step(self, config, trainable, abstract_batch, bytes_of) -> dict:
        """The reference policy (a copy of the trainable weights), and the rollout batch's
        prompt embeddings unless `rl.offload_prompts` keeps them in host memory."""
        held = {"reference policy": bytes_of(trainable)}
        if not config.rl.offload_prompts:
            embeds = abstract_batch(prompts=config.data.batch_size)["prompt_embeds"]
            held["rollout batch's prompt embeddings"] = bytes_of(embeds)
        return held

    def memory_notes(self, config) -> list[str]:
        if not config.rl.offload_prompts:
            return []
        return ["in host memory between the passes: the rollout batch's prompt embeddings"]


def check_model_init(config) -> None:
    """Refuses GRPO from random weights unless `model.allow_random_init` asks for it."""
    model = config.model
    if model.init or model.allow_random_init:
        return
    raise ConfigError(
        "stage 'grpo' has no model.init, so it would train a randomly initialised "
        f"{model.preset!r} model: pass --config.model.init=<VILA directory> (e.g. the SFT run's "
        "<workdir>/model), or --config.model.allow_random_init=True if that is intended")


def check_sampling(config) -> None:
    """GRPO samples at a temperature above 0: greedy samples of a group are all alike (no
    advantage) and the loss divides the log-probs by the temperature (NaN at 0)."""
    if not config.rl.temperature > 0:
        raise ConfigError(f"rl.temperature must be above 0 for GRPO (got {config.rl.temperature}):"
                          " the G samples of a greedy group are identical and carry no signal")


def check_off_policy(config) -> None:
    """One-step off-policy overlaps generation with the update: only rollout servers can."""
    rl = config.rl
    if not rl.off_policy_steps:
        return
    if rl.off_policy_steps != 1:
        raise ConfigError(f"rl.off_policy_steps must be 0 or 1, got {rl.off_policy_steps}")
    if rl.rollout.backend != "server":
        raise ConfigError("rl.off_policy_steps=1 generates the next batch on rollout servers "
                          "while the trainer updates; the embedded sampler shares the trainer's "
                          "devices and weights: set --config.rl.rollout.backend=server (with "
                          "rl.rollout.urls) or rl.off_policy_steps=0")
