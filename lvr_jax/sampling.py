"""How to sample a response: the one settings type of the embedded sampler, the rollout
engines and the rollout servers. Plain Python, so that a server's environment (torch and
vLLM, no JAX) imports it too."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_k 0 and top_p 1.0 disable those filters. Hashable:
    the embedded sampler compiles one program per value (its random key is an argument)."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_token_ids: tuple[int, ...] = ()
    num_samples: int = 1  # G: samples per prompt, sharing its prefill
