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
    """The loss mask without each row's first token, which has no prediction."""
    if isinstance(loss_mask, np.ndarray):
        return np.concatenate([np.zeros_like(loss_mask[:, :1]), loss_mask[:, 1:]], axis=1)
    return loss_mask.at[:, 0].set(0.0)



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


def streams_update(config) -> bool:
    """Whether the update goes micro-batch by micro-batch (`optim.micro_batch_size` set),
    each a pass of its own that brings its own videos' features to the devices, the
    gradients summed on them and the optimizer applied once (`training.StreamedUpdate`):
    the devices never hold a whole batch's features (8 videos of 2,048 frames: 39 GB)."""
    return micro_batches(config) is not None


def abstract_batch(config, model_config, micro: bool = False) -> dict:
    """Shapes of one training batch, or (`micro`) of one streamed micro-batch with the
    whole batch's count of target tokens (for compiling a recipe without data)."""
    b = config.optim.micro_batch_size if micro else config.data.batch_size
    length, f, v = config.data.max_length, config.data.num_frames, model_config.vision
    sds = jax.ShapeDtypeStruct
    batch = {k: sds((b, length), jnp.int32) for k in ("input_ids", "loss_mask", "token_mask")}
    if config.sft.train_vision_tower:
        batch["frames"] = sds((b, f, v.image_size, v.image_size, 3), jnp.float32)
    else:
        batch["video_features"] = sds((b, f, v.num_patches, v.hidden_size),
                                      jnp.dtype(model_config.dtype))
    if micro:
        batch["total_tokens"] = sds((), jnp.float32)
    return batch


class SFTLearner:
    """Holds the train state and the cached video encoder; `step(batch)` trains on a batch."""

    TEXT_PADS = {"input_ids": 0, "loss_mask": 0, "token_mask": 0}  # masked: any id will do
    MICRO_KEYS = (*TEXT_PADS, "frames", "video_key", "frame_indices")  # what a pass reads
    looks_ahead = False

    def __init__(self, model: LongVILA, config, cache: EmbeddingCache, mesh=None,
                 share: hosts.RowShare = hosts.RowShare()):
        self.tx = training.make_optimizer(config.optim)
        self.state = training.TrainState.create(model, trainable_filter(config), self.tx)
        self.videos = VideoEmbedder(model, cache, mesh, rules_of(config.mesh),
                                    output=video_output(config), share=share)
        self.video_key = "frames" if self.videos.output == "frames" else "video_features"
        self.micro, loss_fn = micro_batches(config), make_loss_fn(config, mesh)
        self._update = training.jit_update(self.tx, loss_fn)
        self.streamed = training.StreamedUpdate(self.tx, loss_fn) if self.micro else None

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
        if self.streamed is None:
            s.trainable, s.opt_state, metrics = self._update(
                s.trainable, s.frozen, s.opt_state, graphdef=s.graphdef,
                batch=self.device_batch(batch))
        else:
            s.trainable, s.opt_state, metrics = self.streamed.step(
                s.trainable, s.frozen, s.opt_state, s.graphdef, self.micro_batches(batch))
        s.step += 1
        return {k: np.asarray(v) for k, v in metrics.items()}

    def micro_batches(self, batch: dict):
        """The batch's streamed micro-batches: rows i, i + count, ... of this process's rows
        (as the in-step split takes them), each brought to the devices when its pass runs,
        with the whole batch's count of target tokens."""
        rows = len(batch["input_ids"])
        count = self.micro.count(rows * self.videos.share.count)
        total = hosts.global_sum(np.sum(target_mask(np.asarray(batch["loss_mask"], np.float32))))
        for i in range(count):
            part = {k: batch[k][i::count] for k in self.MICRO_KEYS}
            yield {**self.device_batch(part), "total_tokens": jnp.float32(total)}
