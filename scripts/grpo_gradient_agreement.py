"""Does one GRPO step's gradient carry a direction that other prompts share?

    python scripts/grpo_gradient_agreement.py --data runs/demo/data --init runs/demo/sft/model

From one policy (the demo's GRPO recipe, `configs/demo.py:grpo`, from the model `--init`)
takes the gradient of the GRPO loss on three rollout batches: A, A again with other samples
(A'), and B (the next prompts). The cosine of A with A' is what the prompts decide, that of
A with B what a step shares with the next one: near 0, each update fits its own prompts'
videos and the steps add up to a random walk (README, "What GRPO does not correct yet").
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lvr_jax import build
from lvr_jax.data.pipeline import rl_dataset
from lvr_jax.demo import stage_config
from lvr_jax.rl.learner import GRPOLearner, make_loss_fn
from lvr_jax.sharding.embedding_cache import EmbeddingCache


def flat_gradient(learner: GRPOLearner, grad_fn, batch: dict, rng) -> tuple[np.ndarray, dict]:
    """The GRPO loss's gradient over one rollout batch (summed over its update chunks)."""
    train, metrics = learner.rollout(batch, rng)
    train.pop("weights_step")
    train, _ = learner.add_logprobs(train)
    s, total = learner.state, None
    for prompts in learner.chunks(np.arange(learner.num_prompts(train))):
        g = grad_fn(s.trainable, s.frozen, graphdef=s.graphdef,
                    batch=learner.chunk_batch(train, prompts))
        total = g if total is None else jax.tree.map(jnp.add, total, g)
    leaves = [np.asarray(x, np.float64).reshape(-1) for x in jax.tree.leaves(total)]
    return np.concatenate(leaves), metrics


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def sign_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Share of parameters whose gradient has the same sign in both (Adam's early steps
    move each parameter by about the learning rate in that sign's direction)."""
    both = (a != 0) & (b != 0)
    return float(np.mean(np.sign(a[both]) == np.sign(b[both])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="runs/demo/data", help="the demo's synthetic set")
    parser.add_argument("--init", default="runs/demo/sft/model", help="the SFT model")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    config = stage_config("grpo", args.data, seed=args.seed)
    config.model.init = args.init
    tokenizer, model = build.build_model(config)
    learner = GRPOLearner(model, config, tokenizer, EmbeddingCache())
    loss_fn = make_loss_fn(config)

    @functools.partial(jax.jit, static_argnames="graphdef")
    def grad_fn(trainable, frozen, graphdef, batch):
        return jax.grad(lambda t: loss_fn(nnx.merge(graphdef, t, frozen), batch)[0])(trainable)

    data = dataclasses.replace(build.data_config(config, model), shuffle=False, num_workers=0)
    first, second = itertools.islice(iter(rl_dataset(data, tokenizer)), 2)
    grads = {}
    for name, batch, key in (("A", first, 1), ("A'", first, 2), ("B", second, 3)):
        grads[name], m = flat_gradient(learner, grad_fn, batch, jax.random.key(key))
        print(f"{name}: training accuracy {m['accuracy']:.3f}, mixed groups "
              f"{m['mixed_groups']:.3f}, gradient norm {np.linalg.norm(grads[name]):.4f}")
    for other, what in (("A'", "same prompts, other samples"), ("B", "other prompts")):
        print(f"A vs {other} ({what}): cosine {cosine(grads['A'], grads[other]):+.3f}, "
              f"same sign {sign_agreement(grads['A'], grads[other]):.1%}")


if __name__ == "__main__":
    main()
