"""CoT-SFT as a stage (`lvr_jax.stages.Stage`): text drills first when it starts from
scratch, each process reading its share of every batch, the frozen tower's features cached
and the projector trained on top of them (or, training the tower too, nothing cached)."""

from __future__ import annotations

from lvr_jax.data.pipeline import sft_dataset
from lvr_jax.sft import learner, option_drills
from lvr_jax.sharding import hosts
from lvr_jax.sharding.mesh import rules_of


class SFT:
    name = "sft"
    curves = ("loss", "grad_norm", "cache_hit_rate", "val_accuracy")
    batch_layout: dict = {}
    trainable_filter = staticmethod(learner.trainable_filter)
    loss_fn = staticmethod(learner.make_loss_fn)
    micro_batches = staticmethod(learner.micro_batches)

    def check(self, config) -> None:
        del config  # every SFT recipe the general checks accept runs

    def prepare(self, config, workdir: str) -> None:
        if config.drills.steps and not config.model.init:
            config.model.init = option_drills.drilled_init(config, workdir)

    def video_output(self, config) -> str:
        return learner.video_output(config)

    def row_share(self, config, mesh) -> hosts.RowShare:
        return hosts.row_share(mesh, rules_of(config.mesh), config.data.batch_size)

    def dataset(self, data, tokenizer, on_epoch_end):
        return sft_dataset(data, tokenizer, on_epoch_end=on_epoch_end)

    def learner(self, config, model, tokenizer, cache, mesh, share) -> learner.SFTLearner:
        del tokenizer  # SFT's targets are in its records
        return learner.SFTLearner(model, config, cache, mesh, share)

    def streams_update(self, config) -> bool:
        return False

    def abstract_batch(self, config, model_config, mesh=None) -> dict:
        return learner.abstract_batch(config, model_config)

    def compile_phases(self, config, mesh, llm, abstract_batch) -> dict:
        return {}  # SFT's step is its update (and the frame encoding of a cache miss)

    def held_during_step(self, config, trainable, abstract_batch, bytes_of) -> dict:
        return {}

    def memory_notes(self, config) -> list[str]:
        return []
