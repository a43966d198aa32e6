"""CoT-SFT as a stage (`lvr_jax.stages.Stage`): text drills first when it starts from
scratch, each process reading its share of every batch, the frozen tower's features cached
and the projector trained on top of them (or, training the tower too, nothing cached)."""

from __future__ import annotations

from lvr_jax.data.pipeline import sft_dataset
from lvr_jax.sft import learner as sft_learner
from lvr_jax.sft import option_drills
from lvr_jax.sharding import hosts
from lvr_jax.sharding.mesh import rules_of


class SFT:
    name = "sft"
    curves = ("loss", "grad_norm", "cache_hit_rate", "val_accuracy")
    batch_layout: dict = {}
    trainable_filter = staticmethod(sft_learner.trainable_filter)
    loss_fn = staticmethod(sft_learner.make_loss_fn)
    micro_batches = staticmethod(sft_learner.micro_batches)
    streams_update = staticmethod(sft_learner.streams_update)

    def check(self, config) -> None:
        del config  # every SFT recipe the general checks accept runs

    def prepare(self, config, workdir: str) -> None:
        if config.drills.steps and not config.model.init:
            config.model.init = option_drills.drilled_init(config, workdir)

    def video_output(self, config) -> str:
        return sft_learner.video_output(config)

    def row_share(self, config, mesh) -> hosts.RowShare:
        return hosts.row_share(mesh, rules_of(config.mesh), config.data.batch_size)

    def dataset(self, data, tokenizer, on_epoch_end):
        return sft_dataset(data, tokenizer, on_epoch_end=on_epoch_end)

    def learner(self, config, model, tokenizer, cache, mesh, share) -> sft_learner.SFTLearner:
        del tokenizer  # SFT's targets are in its records
        return sft_learner.SFTLearner(model, config, cache, mesh, share)


    def abstract_batch(self, config, model_config, mesh=None, micro: bool = False) -> dict:
        return sft_learner.abstract_batch(config, model_config, micro)

    def trace_phases(self, config, mesh, llm, abstract_batch) -> dict:
        return {}  # SFT's step is its update (and the frame encoding of a cache miss)

    def phase_calls(self, config) -> dict:
        """Per step: one update, or its micro-batches and one optimizer step."""
        batch = config.data.batch_size
        if sft_learner.streams_update(config):
            update = {"update micro-batch": batch // config.optim.micro_batch_size,
                      "optimizer step": 1}
        else:
            update = {"update": 1}
        return {"frame encoding": batch, **update}

    def loop_trips(self, config) -> int:
        return 1  # no while loop in an SFT step

    def held_during_step(self, config, trainable, abstract_batch, bytes_of) -> dict:
        return {}

    def memory_notes(self, config) -> list[str]:
        return []
