"""CoT-SFT: masked cross-entropy on the answer (reasoning + answer) tokens.

The LLM and projector train (the vision tower too if configured); a frozen vision tower's
features come from the embedding cache, so each video is encoded once for the whole run.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lvr_jax import training
from lvr_jax.model.vlm import LongVILA
from lvr_jax.sharding import forwards, hosts
from lvr_jax.sharding.embedding_cache import EmbeddingCache
from lvr_jax.sharding.mesh import rules_of
from lvr_jax.sharding.video_embeddings import VideoEmbedder


def token_cross_entropy(logits_btv, targets_bt, mask_bt, total=None):
    """Mean negative log-likelihood of targets over the masked positions, and the count;
    `total`: the whole batch's count when this is one micro-batch of it."""
    logp = jax.nn.log_softmax(logits_btv.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets_bt[..., None], axis=-1)[..., 0]
    count = jnp.sum(mask_bt)
    return jnp.sum(nll * mask_bt) / jnp.maximum(count if total is None else total, 1.0), count


def predicting_slots(input_ids_bt, num_video: int, video_token_id: int):
    """For each text token, the slot of the merged sequence whose output predicts it.

    Text token k sits at slot k before the placeholder and k + N - 1 after it; its
    prediction comes from the slot before. Logits are taken only there, never over the
    video, which for a long video is most of the sequence.
    """
    k = jnp.arange(input_ids_bt.shape[1])[None]
    placeholder = jnp.argmax(input_ids_bt == video_token_id, axis=1)[:, None]
    slot = jnp.where(k < placeholder, k, k + num_video - 1)
    return jnp.maximum(slot - 1, 0)


def sft_loss(model: LongVILA, batch: dict, hidden_fn):
    """Next-token loss on the `loss_mask` tokens of prompts whose video is spliced in."""
    ids, mask = batch["input_ids"], batch["loss_mask"].astype(jnp.float32)
    if "video_features" in batch:
        video = jax.vmap(model.project_features)(batch["video_features"])
    else:
        video = jax.vmap(model.encode_video)(batch["frames"])
    embeds, valid = model.embed_inputs(ids, video, batch["token_mask"].astype(bool))
    hidden = hidden_fn(model.llm, embeds, valid)
    slots = predicting_slots(ids, video.shape[1], model.config.video_token_id)
    text_hidden = jnp.take_along_axis(hidden, slots[..., None], axis=1)
    loss, count = token_cross_entropy(model.llm.logits(text_hidden), ids, target_mask(mask),
                                      batch.get("total_tokens"))
    return loss, {"target_tokens": count}


def target_mask(loss_mask):
    return loss_mask.at[:, 0].set(0.0)  # the first token has no prediction


def split_micro_batches(batch: dict, micro: training.MicroBatches) -> tuple[dict, dict]:
    """The batch as micro-batches of `micro.size` sequences, each with the whole batch's
    count of target tokens (`training.MicroBatches`)."""
    count = micro.count(batch["input_ids"].shape[0])
    total = jnp.sum(target_mask(batch["loss_mask"].astype(jnp.float32)))
    return {"total_tokens": total}, {k: training.split_rows(v, count) for k, v in batch.items()}


def text_loss(model: LongVILA, batch: dict):
    """Next-token loss on the `loss_mask` tokens of text-only sequences (no video)."""
    ids, mask = batch["input_ids"], batch["loss_mask"].astype(jnp.float32)
    logits = model.llm(ids, valid=batch["token_mask"])
    loss, count = token_cross_entropy(logits[:, :-1], ids[:, 1:], mask[:, 1:])
    return loss, {"target_tokens": count}


def trainable_filter(config):
    """LLM and projector train; the vision tower only if `sft.train_vision_tower`."""
    return training.param_filter(["llm", "mm_projector"] +
                                 (["vision_tower"] if config.sft.train_vision_tower else []))


def micro_batches(config) -> training.MicroBatches | None:
    return training.micro_batching(config.optim, split_micro_batches)


def make_loss_fn(config, mesh=None):
    return functools.partial(sft_loss, hidden_fn=forwards.hidden_fn(mesh, config.mesh))


def video_output(config) -> str:
    """What the video path gives the update: the frozen tower's features (cached), or the
    frames themselves when `sft.train_vision_tower` trains the tower too."""
    return "frames" if config.sft.train_vision_tower else "features"


def abstract_batch(config, model_config) -> dict:
    """Shapes of one training batch (for compiling a recipe without data)."""
    b, length, f = config.data.batch_size, config.data.max_length, config.data.num_frames
    v = model_config.vision
    text = {k: jax.ShapeDtypeStruct((b, length), jnp.int32)
            for k in ("input_ids", "loss_mask", "token_mask")}
    if config.sft.train_vision_tower:
        video = jax.ShapeDtypeStruct((b, f, v.image_size, v.image_size, 3), jnp.float32)
        return {**text, "frames": video}
    features = (b, f, v.num_patches, v.hidden_size)
    return {**text, "video_features": jax.ShapeDtypeStruct(features, jnp.dtype(model_config.dtype))}


class SFTLearner:
    """Holds the train state and the cached video encoder; `step(batch)` trains on a batch."""

    TEXT_PADS = {"input_ids": 0, "loss_mask": 0, "token_mask": 0}  # masked: any id will do
    looks_ahead = False

    def __init__(self, model: LongVILA, config, cache: EmbeddingCache, mesh=None,
                 share: hosts.RowShare = hosts.RowShare()):
        self.tx = training.make_optimizer(config.optim)
        self.state = training.TrainState.create(model, trainable_filter(config), self.tx)
        self.videos = VideoEmbedder(model, cache, mesh, rules_of(config.mesh),
                                    output=video_output(config), share=share)
        self.video_key = "frames" if self.videos.output == "frames" else "video_features"
        self._update = training.jit_update(self.tx, make_loss_fn(config, mesh),
                                           micro=micro_batches(config))

    def device_batch(self, batch: dict) -> dict:
        """The arrays the jitted step needs (global arrays of every process's rows, their text
        padded to the longest process's); video features come from the cache."""
        if hosts.multiprocess():
            length = hosts.agreed_length(np.shape(batch["input_ids"])[1])
            batch = hosts.pad_to(batch, self.TEXT_PADS, length, side="right")
        out = {k: self.videos.global_batch(batch[k]) for k in self.TEXT_PADS}
        out[self.video_key] = self.videos.videos(batch)
        return out

    def step(self, batch: dict, upcoming: dict | None = None) -> dict:
        del upcoming  # SFT never looks ahead
        s = self.state
        s.trainable, s.opt_state, metrics = self._update(
            s.trainable, s.frozen, s.opt_state, graphdef=s.graphdef, batch=self.device_batch(batch))
        s.step += 1
        return {k: np.asarray(v) for k, v in metrics.items()}
