"""GRPO as REFERENCE.md §5 states it: group advantages, clipped surrogate, KL estimators.

Pure functions of arrays (no logging, no model): the learner computes metrics from the
per-token terms these return.
"""

from __future__ import annotations

import jax.numpy as jnp

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                "seq-mean-token-sum-norm")


def group_advantages(scores, group_size: int, eps: float = 1e-6, scale_by_std: bool = True):
    """Per-response advantages [N] from scores [N] ordered in groups of `group_size`.

    (s - mean) / (std + eps) with the unbiased std of each group; Dr.GRPO drops the
    division (`scale_by_std=False`). A group of one has mean 0 and std 1.
    """
    groups = scores.reshape(-1, group_size)
    if group_size == 1:
        mean, std = jnp.zeros_like(groups), jnp.ones_like(groups)
    else:
        mean = jnp.mean(groups, axis=1, keepdims=True)
        std = jnp.std(groups, axis=1, keepdims=True, ddof=1)
    centred = groups - mean
    return (centred / (std + eps) if scale_by_std else centred).reshape(-1)


def ratio(logp, old_logp):
    """Importance ratio exp(logp - old_logp), the log-ratio clamped to [-20, 20]."""
    return jnp.exp(jnp.clip(logp - old_logp, -20.0, 20.0))


def policy_loss_terms(logp, old_logp, advantages, clip_low: float = 0.2, clip_high: float = 0.3,
                      dual_clip: float | None = 3.0):
    """Per-token clipped surrogate [N, T] and whether the clip was the binding term.

    max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)); for A < 0 dual clip caps it at -A c.
    """
    adv = advantages[:, None] if advantages.ndim == 1 else advantages
    r = ratio(logp, old_logp)
    unclipped = -adv * r
    clipped = -adv * jnp.clip(r, 1.0 - clip_low, 1.0 + clip_high)
    loss = jnp.maximum(unclipped, clipped)
    if dual_clip is not None:
        loss = jnp.where(adv < 0, jnp.minimum(loss, -adv * dual_clip), loss)
    return loss, clipped > unclipped


def aggregate(loss_nt, mask_nt, agg: str = "token-mean", norm_length: int | None = None,
              totals: tuple | None = None):
    """Reduces per-token losses to a scalar; `norm_length` is Dr.GRPO's constant divisor.
    `totals`: (tokens, sequences) of the whole batch when these rows are one micro-batch of
    it; the result is then this micro-batch's share of the whole batch's value."""
    mask = mask_nt.astype(loss_nt.dtype)
    per_token = loss_nt * mask
    tokens, sequences = totals if totals is not None else (jnp.sum(mask), loss_nt.shape[0])
    if agg == "token-mean":
        return jnp.sum(per_token) / jnp.maximum(tokens, 1.0)
    seq_sum = jnp.sum(per_token, axis=-1)
    if agg == "seq-mean-token-mean":
        return jnp.sum(seq_sum / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)) / sequences
    if agg == "seq-mean-token-sum":
        return jnp.sum(seq_sum) / sequences
    if agg == "seq-mean-token-sum-norm":
        return jnp.sum(seq_sum) / (norm_length or loss_nt.shape[-1])
    raise ValueError(f"loss aggregation {agg!r} is not one of {AGGREGATIONS}")


def policy_loss(logp, old_logp, advantages, mask, clip_low: float = 0.2, clip_high: float = 0.3,
                dual_clip: float | None = 3.0, agg: str = "token-mean",
                norm_length: int | None = None):
    """The PPO/GRPO clipped policy-gradient loss, aggregated over valid response tokens."""
    loss, _ = policy_loss_terms(logp, old_logp, advantages, clip_low, clip_high, dual_clip)
    return aggregate(loss, mask, agg, norm_length)


def kl_penalty(logp, ref_logp, kind: str = "k3"):
    """Per-token KL(pi || ref) estimate: "k1" (log-ratio), "k2" (half squared), "k3" (low-var)."""
    if kind == "k1":
        return logp - ref_logp
    if kind == "k2":
        return 0.5 * jnp.square(logp - ref_logp)
    if kind == "k3":
        x = jnp.clip(ref_logp - logp, -20.0, 20.0)
        return jnp.clip(jnp.exp(x) - x - 1.0, -10.0, 10.0)
    raise ValueError(f"KL estimator {kind!r} is not one of 'k1', 'k2', 'k3'")


def group_stats(scores, correct, group_size: int) -> dict:
    """What a rollout batch offers the update, from scores [N] and answer correctness [N].

    mixed_groups: share of groups whose G scores are not all equal (only those carry a
    gradient); pass_at_g: share with at least one correct answer; reward_std: mean
    within-group standard deviation of the scores.
    """
    groups = jnp.asarray(scores, jnp.float32).reshape(-1, group_size)
    hits = jnp.asarray(correct, jnp.float32).reshape(-1, group_size)
    spread = jnp.max(groups, axis=1) - jnp.min(groups, axis=1)
    return {"mixed_groups": jnp.mean(spread > 0), "pass_at_g": jnp.mean(jnp.max(hits, axis=1) > 0),
            "reward_std": jnp.mean(jnp.std(groups, axis=1))}


def update_alignment(old_logp, new_logp, advantages, mask) -> dict:
    """How an update moved the sampled responses: the mean per-token change of log-prob of
    positive-advantage responses, of negative ones, and their difference (> 0 when the
    update went the way the advantages ask)."""
    m = mask.astype(jnp.float32)
    per_seq = jnp.sum((new_logp - old_logp) * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
    counted = jnp.sum(m, axis=1) > 0

    def mean_where(selected):
        chosen = (selected & counted).astype(jnp.float32)
        return jnp.sum(per_seq * chosen) / jnp.maximum(jnp.sum(chosen), 1.0)

    positive, negative = mean_where(advantages > 0), mean_where(advantages < 0)
    return {"logp_shift_pos": positive, "logp_shift_neg": negative,
            "update_alignment": positive - negative}


CORRECTIONS = ("none", "token-tis", "seq-tis", "token-mis", "seq-mis")


def rollout_correction(old_logp, rollout_logp, mask, mode: str = "none", threshold: float = 2.0):
    """Weights [N, T] for the policy-gradient terms, and which tokens the loss keeps [N, T].

    r = exp(old_logp - rollout_logp): the trainer's probability of a sampled token over the
    rollout engine's (seq modes: the log-ratio summed over the sequence's valid tokens, one r
    per sequence). TIS (truncated importance sampling) weighs each term by min(r, C); MIS
    (masked importance sampling) weighs it by r where r <= C and rejects the rest, tokens
    or whole sequences. Inputs are log-probs of sampling, so no gradient flows through r.
    """
    if mode not in CORRECTIONS:
        raise ValueError(f"rl.rollout_correction {mode!r} is not one of {CORRECTIONS}")
    valid = mask > 0
    if mode == "none":
        return jnp.ones_like(old_logp), valid
    log_r = jnp.where(valid, old_logp - rollout_logp, 0.0)
    if mode.startswith("seq"):
        log_r = jnp.broadcast_to(jnp.sum(log_r, axis=-1, keepdims=True), log_r.shape)
    r = jnp.exp(jnp.clip(log_r, -20.0, 20.0))
    if mode.endswith("tis"):
        return jnp.minimum(r, threshold), valid
    keep = valid & (r <= threshold)
    return jnp.where(keep, r, 0.0), keep


def mismatch_stats(old_logp, rollout_logp, mask) -> dict:
    """How far the rollout engine's log-probs of the sampled tokens are from the trainer's:
    mean |difference|, k3 estimate of KL(engine || trainer) per token, and the perplexity
    ratio trainer / engine averaged over sequences (1.0 when they agree)."""
    m = mask.astype(jnp.float32)
    tokens = jnp.maximum(jnp.sum(m), 1.0)
    delta = jnp.clip((old_logp - rollout_logp) * m, -20.0, 20.0)
    per_seq = jnp.sum(m, axis=-1)
    seq_ppl_ratio = jnp.exp(-jnp.sum(delta, axis=-1) / jnp.maximum(per_seq, 1.0))
    counted = (per_seq > 0).astype(jnp.float32)
    return {"logprob_mismatch": jnp.sum(jnp.abs(delta)) / tokens,
            "mismatch_kl": jnp.sum((jnp.exp(delta) - delta - 1.0) * m) / tokens,
            "ppl_ratio": jnp.sum(seq_ppl_ratio * counted) / jnp.maximum(jnp.sum(counted), 1.0)}
