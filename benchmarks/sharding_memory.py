"""Per-device memory of one RL training step under sequence parallelism, from XLA.

    python -m benchmarks.sharding_memory --model small   # sp = 1, 2, 4, 8 at 64/256 frames
    python -m benchmarks.sharding_memory --model 7b      # LongVILA-R1-7B shapes, 8 devices

The step is forward + backward of a clipped policy loss over the long merged sequence
(cached video embeddings + prompt + response), logits only on the response, bf16
compute, per-layer remat. It is compiled abstractly (no weights, no data) and
`compiled.memory_analysis()` gives bytes per device: arguments + outputs + temporaries.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from lvr_jax.model import PRESETS  # noqa: E402
from lvr_jax.model.qwen2 import Qwen2  # noqa: E402
from lvr_jax.sharding import mesh as mesh_lib  # noqa: E402
from lvr_jax.sharding.param_placement import param_shardings  # noqa: E402
from lvr_jax.sharding.sequence import response_logprobs, sp_hidden_states  # noqa: E402

TOKENS_PER_FRAME = 257
PROMPT, RESPONSE = 256, 2048
# FSDP over the sp group too (ZeRO-3 style): weights are gathered a layer at a time.
SP_FSDP_RULES = (("embed", ("fsdp", "sp")), ("vis_embed", ("fsdp", "sp")),
                 ("proj_in", ("fsdp", "sp"))) + mesh_lib.DEFAULT_RULES


def small_llm():
    return dataclasses.replace(PRESETS["tiny"]().llm, vocab_size=4096, hidden_size=256,
                               intermediate_size=1024, num_hidden_layers=4,
                               num_attention_heads=8, num_key_value_heads=2)


def policy_loss_step(llm, embeds, valid, positions, actions, advantages, mesh, strategy, block):
    """Gradient of a clipped surrogate on the response tokens w.r.t. the LLM."""
    def loss_fn(llm):
        hidden = sp_hidden_states(llm, embeds, valid, positions, mesh, strategy, block)
        start = embeds.shape[1] - RESPONSE - 1  # these positions predict the response
        logp, _ = response_logprobs(llm, hidden, start, actions, mesh)
        ratio = jnp.exp(logp - jax.lax.stop_gradient(logp))
        return -jnp.mean(jnp.minimum(ratio * advantages, jnp.clip(ratio, 0.8, 1.3) * advantages))
    return nnx.grad(loss_fn)(llm)


def step_memory(llm_config, frames, sp, strategy, block=512, rules=mesh_lib.DEFAULT_RULES):
    """Bytes per device of the compiled step on a mesh of `sp` devices (sp = all of them)."""
    mesh = mesh_lib.make_mesh({"shape": dict(data=1, fsdp=1, sp=sp, tp=1)},
                              devices=jax.devices()[:sp])
    llm = nnx.eval_shape(lambda: Qwen2(llm_config, dtype=jnp.bfloat16, remat=True,
                                       rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(llm)
    shardings = param_shardings(llm, mesh, rules)
    state = jax.tree.map(
        lambda v, s: v.replace(jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype,
                                                    sharding=s)),
        state, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
    t = frames * TOKENS_PER_FRAME + PROMPT + RESPONSE
    seq = NamedSharding(mesh, P(None, "sp"))
    abstract = lambda shape, dtype, sh=seq: jax.ShapeDtypeStruct(shape, dtype, sharding=sh)  # noqa: E731
    rep = NamedSharding(mesh, P())
    args = (abstract((1, t, llm_config.hidden_size), jnp.bfloat16, NamedSharding(mesh, P(None, "sp", None))),
            abstract((1, t), jnp.bool_) if t % sp == 0 else abstract((1, t), jnp.bool_, rep),
            abstract((1, t), jnp.int32) if t % sp == 0 else abstract((1, t), jnp.int32, rep),
            abstract((1, RESPONSE), jnp.int32, rep), abstract((1, RESPONSE), jnp.float32, rep))
    if t % sp:
        args = (abstract(args[0].shape, jnp.bfloat16, rep),) + args[1:]

    grad_shardings = jax.tree.map(lambda v: v.get_value().sharding, state,
                                  is_leaf=lambda x: isinstance(x, nnx.Variable))

    @functools.partial(jax.jit, out_shardings=grad_shardings)  # grads sharded like weights
    def step(state, *batch):
        grads = policy_loss_step(nnx.merge(graphdef, state), *batch, mesh, strategy, block)
        return jax.tree.map(lambda v: v.get_value(), nnx.state(grads, nnx.Param),
                            is_leaf=lambda x: isinstance(x, nnx.Variable))

    compiled = step.lower(state, *args).compile()
    m = compiled.memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes \
        - m.alias_size_in_bytes


def small_table(frame_counts, strategies):
    print("small config (Qwen2 4 layers, hidden 256, 8/2 heads), weights ZeRO-sharded over "
          "sp, GiB per device, ratio to sp=1")
    print(f"{'frames':>6} {'strategy':>10} " + " ".join(f"{'sp=' + str(s):>14}" for s in (1, 2, 4, 8)))
    for frames in frame_counts:
        for strategy in strategies:
            row = [step_memory(small_llm(), frames, sp, strategy, 512, SP_FSDP_RULES)
                   for sp in (1, 2, 4, 8)]
            cells = " ".join(f"{b / 2**30:7.3f} ({b / row[0]:.2f})" for b in row)
            print(f"{frames:>6} {strategy:>10} {cells}", flush=True)


def big_table(frame_counts, strategies):
    llm = PRESETS["longvila_r1_7b"]().llm
    print("LongVILA-R1-7B LLM (28 layers), 8 devices sp=8, weights ZeRO-sharded over sp, "
          "bf16 compute, remat; GiB per device")
    print(f"{'frames':>6} {'tokens':>8} " + " ".join(f"{s:>11}" for s in strategies))
    for frames in frame_counts:
        cells = []
        for strategy in strategies:
            try:
                cells.append(f"{step_memory(llm, frames, 8, strategy, 512, SP_FSDP_RULES) / 2**30:11.1f}")
            except ValueError as e:
                cells.append(f"{'n/a':>11}")
                print("  ", strategy, ":", str(e).split(";")[0])
        print(f"{frames:>6} {frames * TOKENS_PER_FRAME + PROMPT + RESPONSE:>8} " + " ".join(cells),
              flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=("small", "7b"), default="small")
    parser.add_argument("--frames", type=int, nargs="*",
                        help="default: 64 256 (small), 512 1024 2048 4096 (7b)")
    parser.add_argument("--strategies", nargs="*", default=list(mesh_lib.STRATEGIES))
    args = parser.parse_args()
    if args.model == "small":
        small_table(args.frames or [64, 256], args.strategies)
    else:
        big_table(args.frames or [512, 1024, 2048, 4096], args.strategies)


if __name__ == "__main__":
    main()
