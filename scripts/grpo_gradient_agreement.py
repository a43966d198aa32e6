"""Does one GRPO step's gradient carry a direction that other prompts share?

    python scripts/grpo_gradient_agreement.py --data runs/demo/data --init runs/demo/sft/model

From one policy (the demo's GRPO recipe, `configs/demo.py:grpo`, from the model `--init`)
takes the gradient of the GRPO loss on `--batches` consecutive rollout batches and on the
first batch sampled again. The cosine between the first batch and its resample is what the
prompts decide; the cosines between different batches, what an update shares with the
next (one pair varies a lot: read their mean); the cosine between the sums of the first
and the second half of the batches, what a larger update would share (README, "What GRPO
does not correct yet").
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
from lvr_jax.config import demo_config
from lvr_jax.rl.learner import GRPOLearner, make_loss_fn
from lvr_jax.sharding.embedding_cache import EmbeddingCache


def flat_gradient(learner: GRPOLearner, grad_fn, batch: dict, rng) -> tuple[np.ndarray, dict]:
    """The GRPO loss's gradient over one rollout batch (summed over its update chunks)."""
    train, metrics = learner.rollout.collect(learner.state.model(), batch, rng)
    train, _ = learner.add_logprobs(train)
    s, total = learner.state, None
    order = np.arange(learner.passes.num_prompts(train))
    for chunk in learner.passes.update_batches(train, order):
        g = grad_fn(s.trainable, s.frozen, graphdef=s.graphdef, batch=chunk)
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
    parser.add_argument("--batches", type=int, default=6, help="rollout batches (at least 2)")
    args = parser.parse_args()
    config = demo_config("grpo", args.data, seed=args.seed)
    config.model.init = args.init
    tokenizer, model = build.build_model(config)
    learner = GRPOLearner(model, config, tokenizer, EmbeddingCache())
    loss_fn = make_loss_fn(config)

    @functools.partial(jax.jit, static_argnames="graphdef")
    def grad_fn(trainable, frozen, graphdef, batch):
        return jax.grad(lambda t: loss_fn(nnx.merge(graphdef, t, frozen), batch)[0])(trainable)

    data = dataclasses.replace(build.data_config(config, model), shuffle=False, num_workers=0)
    batches = list(itertools.islice(iter(rl_dataset(data, tokenizer)), args.batches))
    grads = []
    for i, batch in enumerate(batches + batches[:1]):  # the last: the first batch resampled
        g, m = flat_gradient(learner, grad_fn, batch, jax.random.key(i))
        grads.append(g)
        print(f"batch {i % len(batches)}: training accuracy {m['accuracy']:.3f}, mixed groups "
              f"{m['mixed_groups']:.3f}, gradient norm {np.linalg.norm(g):.4f}")
    resampled = grads.pop()
    print(f"same prompts, other samples: cosine {cosine(grads[0], resampled):+.3f}, "
          f"same sign {sign_agreement(grads[0], resampled):.1%}")
    pairs = [cosine(grads[i], grads[j]) for i in range(len(grads)) for j in range(i)]
    print(f"other prompts, {len(pairs)} pairs: cosine mean {np.mean(pairs):+.3f} "
          f"(min {min(pairs):+.3f}, max {max(pairs):+.3f})")
    half = len(grads) // 2
    first, second = sum(grads[:half]), sum(grads[half:2 * half])
    print(f"{half} batches against the next {half}: cosine {cosine(first, second):+.3f}, "
          f"same sign {sign_agreement(first, second):.1%}")


if __name__ == "__main__":
    main()
