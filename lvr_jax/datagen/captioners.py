"""Clip captioners: this project's LongVILA (embedded sampler) or an OpenAI-compatible VLM.

Both expose `frame_size` (the side to decode frames at) and `async caption(clips) -> texts`.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from typing import Sequence

import numpy as np

from lvr_jax.data.templates import SYSTEM_PROMPT
from lvr_jax.datagen.client import ChatClient, image_part
from lvr_jax.datagen.clips import Clip
from lvr_jax.datagen.prompts import CAPTION_INSTRUCTION, caption_messages
from lvr_jax.tokenizer import IM_END, IM_START, VIDEO_TOKEN


class OpenAICaptioner:
    """Sends each clip's frames as JPEG image parts to a chat endpoint, one request per clip."""

    def __init__(self, client: ChatClient, frame_size: int, max_tokens: int, temperature: float):
        self.client, self.frame_size = client, frame_size
        self.max_tokens, self.temperature = max_tokens, temperature

    async def _caption_one(self, clip: Clip) -> str:
        parts = [image_part(frame) for frame in clip.frames]
        reply = await self.client.chat(caption_messages(parts, clip.end - clip.start),
                                       max_tokens=self.max_tokens, temperature=self.temperature)
        return reply.text.strip()

    async def caption(self, clips: Sequence[Clip]) -> list[str]:
        """Every clip at once; the first failure cancels the others (the video has failed, and
        their retries would only hold the endpoint's slots)."""
        tasks = [asyncio.ensure_future(self._caption_one(c)) for c in clips]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            raise

    async def close(self) -> None:
        await self.client.close()


def caption_prompt(seconds: float) -> str:
    """The embedded model's chat prompt: the video placeholder, then the caption instruction."""
    user = VIDEO_TOKEN + CAPTION_INSTRUCTION.format(seconds=seconds)
    return (f"{IM_START}system\n{SYSTEM_PROMPT}{IM_END}\n{IM_START}user\n{user}{IM_END}\n"
            f"{IM_START}assistant\n")


class EmbeddedCaptioner:
    """LongVILA from a VILA checkpoint: clips are captioned `batch_size` at a time in one call.

    Every call has the same shapes (the last batch is padded with repeats), so the encoder and
    the sampler compile once. Calls run in a worker thread, one at a time.
    """

    def __init__(self, checkpoint: str, clip_seconds: float, max_tokens: int, temperature: float,
                 batch_size: int = 8, seed: int = 0):
        import jax

        from lvr_jax.model import load_pretrained
        from lvr_jax.model.sampler import SamplingParams
        from lvr_jax.tokenizer import load_tokenizer

        self.model = load_pretrained(checkpoint)
        self.tokenizer = load_tokenizer(checkpoint)
        self.frame_size = self.model.config.vision.image_size
        self.batch_size = max(1, batch_size)
        self.prompt_ids = np.asarray(self.tokenizer.encode(caption_prompt(clip_seconds)), np.int32)
        self.params = SamplingParams(max_new_tokens=max_tokens, temperature=temperature,
                                     stop_token_ids=(self.tokenizer.eos_id,))
        self._rng = jax.random.key(seed)
        self._lock = threading.Lock()
        self.videos = clip_embedder(self.model)

    def _caption_batch(self, clips: Sequence[Clip]) -> list[str]:
        import jax
        import jax.numpy as jnp

        from lvr_jax.model.sampler import generate

        frames = np.stack([c.frames for c in clips])
        pad = self.batch_size - len(clips)
        frames = np.concatenate([frames, np.repeat(frames[-1:], pad, 0)]) if pad else frames
        ids = jnp.broadcast_to(jnp.asarray(self.prompt_ids), (self.batch_size, len(self.prompt_ids)))
        with self._lock:
            embeds, valid = clip_prompts(self.videos, self.model, ids, frames)
            self._rng, key = jax.random.split(self._rng)
            out = generate(self.model.llm, embeds, valid, self.params, key,
                           pad_id=self.tokenizer.pad_id)
        tokens, lengths = out.tokens.tolist(), out.lengths.tolist()
        return [self.tokenizer.decode(t[:n], skip_special_tokens=True).strip()
                for t, n in zip(tokens[:len(clips)], lengths[:len(clips)])]

    async def caption(self, clips: Sequence[Clip]) -> list[str]:
        texts = []
        for i in range(0, len(clips), self.batch_size):
            texts += await asyncio.to_thread(self._caption_batch, clips[i:i + self.batch_size])
        return texts

    async def close(self) -> None:
        return None


def clip_embedder(model):
    """The one video path (`sharding.video_embeddings`) for clips: each captioned once, so
    the cache only has to hold a batch."""
    from lvr_jax.sharding.embedding_cache import EmbeddingCache
    from lvr_jax.sharding.video_embeddings import VideoEmbedder
    return VideoEmbedder(model, EmbeddingCache(256 << 20))


def clip_prompts(videos, model, ids_bt, frames_bfhw3):
    """Prompt embeddings with each row's clip spliced in, every clip encoded on its own (a
    pooling video encoder must not pool across clips): ([B, T', D], [B, T'])."""
    frames = np.asarray(frames_bfhw3)
    batch = {"frames": frames, "prompt_ids": ids_bt, "prompt_mask": np.ones(ids_bt.shape, bool),
             "video_key": [hashlib.sha256(f.tobytes()).hexdigest() for f in frames],
             "frame_indices": np.tile(np.arange(frames.shape[1]), (len(frames), 1))}
    return videos.prompts(model, batch)
