"""GRPO's training forward: every prompt run once for its G samples vs each sample whole.

    python -m benchmarks.shared_prompt    # one device: the demo's shapes, a longer prompt; a mesh

The G samples of a GRPO group continue one prompt (a video and its question). The trainer
takes their log-probs twice per step (old and reference policy) and their gradients once per
update. Run whole, each sample repeats its prompt's forward and backward G times; shared
(`sharding.forwards.response_logprobs_fn`, what the learner runs, with or without a mesh),
every layer runs the prompt once and the samples attend to its keys and values. Both give
the same numbers (tests/model/test_shared_prompt.py, tests/sharding/test_shared_prompt_sp.py);
this prints the time of each, side by side, for the log-prob pass and for the gradient of
the GRPO loss, at:

  demo     the demo's LLM (3 layers, width 128), an update of 16 prompts x G = 8, prompts of
           335 tokens (80 of them video), responses of 112
  long     the same LLM, 2 prompts x G = 8 of 2,048 tokens, responses of 256
  mesh-1k  on 8 (simulated) devices, the sequence split over sp = 8 with ring attention (the
           `hour` recipe's strategy): 1 prompt x G = 8 of 1,024 tokens, responses of 256;
           whole, each sequence runs split over sp; shared, the prompt runs once split over
           sp and the samples attend to each shard of its keys and values where it lies
  mesh-2k  the same with a prompt of 2,048 tokens

Median wall time of --repeats calls after a warm-up (compile) call. On a CPU the 8 devices
share its cores: the mesh rows compare work, not the parallel speed of 8 accelerators.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.gpu_step import median_time  # noqa: E402
from lvr_jax.model.config import Qwen2Config  # noqa: E402
from lvr_jax.model.qwen2 import Qwen2, positions_from_valid  # noqa: E402
from lvr_jax.config import base_config  # noqa: E402
from lvr_jax.rl import grpo  # noqa: E402
from lvr_jax.sharding import mesh as mesh_lib  # noqa: E402
from lvr_jax.sharding.forwards import hidden_fn, response_logprobs_fn  # noqa: E402
from lvr_jax.sharding import sequence  # noqa: E402

DEMO_LLM = Qwen2Config(vocab_size=700, hidden_size=128, intermediate_size=256,
                       num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                       rope_theta=1e4)
CASES = {"demo": dict(prompts=16, generations=8, prompt_len=335, response_len=112),
         "long": dict(prompts=2, generations=8, prompt_len=2048, response_len=256),
         "mesh-1k": dict(prompts=1, generations=8, prompt_len=1024, response_len=256),
         "mesh-2k": dict(prompts=1, generations=8, prompt_len=2048, response_len=256)}


def whole_logprobs(llm, prompts, prompt_valid, index, tokens, response_mask, temperature):
    """Each sample after its own copy of its prompt, one forward per sequence."""
    t, m = prompts.shape[1], tokens.shape[1]
    x = jnp.concatenate([prompts[index], llm.embed(tokens)], axis=1)
    valid = jnp.concatenate([prompt_valid[index], response_mask.astype(bool)], axis=1)
    hidden, _ = llm.hidden_states(x, positions_from_valid(valid), valid)
    return sequence.logprobs_and_entropy(llm.logits(hidden[:, t - 1:t - 1 + m]) / temperature,
                                         tokens)


def sp_mesh():
    """8 devices, the sequence split over all of them, ring attention: (mesh, its config)."""
    config = base_config().mesh
    config.update(shape=dict(data=1, fsdp=1, sp=8, tp=1), attention="ring")
    return mesh_lib.make_mesh(config), config


def whole_mesh_logprobs(mesh, mesh_config):
    """Each sample after its own copy of its prompt, every sequence split over sp."""
    hidden = hidden_fn(mesh, mesh_config)

    def logprobs(llm, prompts, prompt_valid, index, tokens, response_mask, temperature):
        x = jnp.concatenate([prompts[index], llm.embed(tokens)], axis=1)
        valid = jnp.concatenate([prompt_valid[index], response_mask.astype(bool)], axis=1)
        return sequence.response_logprobs(llm, hidden(llm, x, valid), prompts.shape[1] - 1,
                                          tokens, mesh, mesh_lib.rules_of(mesh_config),
                                          temperature)
    return logprobs


def passes(name: str):
    """(whole, shared) log-prob functions for a case: on one device, or on the sp mesh."""
    if not name.startswith("mesh"):
        return whole_logprobs, response_logprobs_fn()
    mesh, config = sp_mesh()
    return whole_mesh_logprobs(mesh, config), response_logprobs_fn(mesh, config)


def case_inputs(prompts, generations, prompt_len, response_len, d, vocab):
    keys = jax.random.split(jax.random.key(0), 3)
    n = prompts * generations
    return (jax.random.normal(keys[0], (prompts, prompt_len, d)),
            jnp.ones((prompts, prompt_len), bool),
            jnp.repeat(jnp.arange(prompts), generations),
            jax.random.randint(keys[1], (n, response_len), 0, vocab),
            jnp.ones((n, response_len), jnp.float32)), jax.random.normal(keys[2], (n,))


def measure(logprobs_fn, llm, inputs, advantages, repeats: int) -> tuple[float, float]:
    """(seconds of the log-prob pass, seconds of the GRPO loss's value and gradient)."""
    graphdef, state = nnx.split(llm)
    logp = jax.jit(lambda s: logprobs_fn(nnx.merge(graphdef, s), *inputs, 1.0)[0])
    old = logp(state)
    mask = inputs[-1]

    def loss(s):
        new = logprobs_fn(nnx.merge(graphdef, s), *inputs, 1.0)[0]
        return grpo.policy_loss(new, old, advantages, mask)
    grad = jax.jit(jax.value_and_grad(loss))
    return median_time(lambda: logp(state), repeats), median_time(lambda: grad(state), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    llm = Qwen2(DEMO_LLM, rngs=nnx.Rngs(0))
    print("| case | sequences x tokens | pass | whole sequences | shared prompt | speed-up |")
    print("|---|---|---|---|---|---|")
    for name in args.cases:
        c = CASES[name]
        inputs, advantages = case_inputs(**c, d=DEMO_LLM.hidden_size, vocab=DEMO_LLM.vocab_size)
        whole_fn, shared_fn = passes(name)
        whole = measure(whole_fn, llm, inputs, advantages, args.repeats)
        ours = measure(shared_fn, llm, inputs, advantages, args.repeats)
        size = (f"{c['prompts']} x {c['generations']} x ({c['prompt_len']} + "
                f"{c['response_len']})")
        for label, w, s in zip(("log-probs", "loss + gradient"), whole, ours):
            print(f"| {name} | {size} | {label} | {w:.2f} s | {s:.2f} s | {w / s:.2f}x |",
                  flush=True)


if __name__ == "__main__":
    main()
