"""GRPO functions against the formulas of REFERENCE.md §5, written out element by element."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvr_jax.rl import grpo


def reference_advantages(scores, g, eps=1e-6, scale=True):
    out = []
    for start in range(0, len(scores), g):
        group = scores[start:start + g]
        if g == 1:
            mean, std = 0.0, 1.0
        else:
            mean = sum(group) / g
            std = math.sqrt(sum((s - mean) ** 2 for s in group) / (g - 1))
        out += [(s - mean) / (std + eps) if scale else s - mean for s in group]
    return np.array(out)


def reference_token_loss(logp, old, adv, lo, hi, c):
    r = math.exp(min(max(logp - old, -20.0), 20.0))
    loss = max(-adv * r, -adv * min(max(r, 1 - lo), 1 + hi))
    if c is not None and adv < 0:
        loss = min(loss, -adv * c)
    return loss


def reference_policy_loss(logp, old, adv, mask, lo, hi, c, agg):
    n, t = logp.shape
    tok = [[reference_token_loss(logp[i, j], old[i, j], adv[i], lo, hi, c) for j in range(t)]
           for i in range(n)]
    seq_sums = [sum(tok[i][j] * mask[i, j] for j in range(t)) for i in range(n)]
    if agg == "token-mean":
        return sum(seq_sums) / mask.sum()
    if agg == "seq-mean-token-mean":
        return sum(seq_sums[i] / mask[i].sum() for i in range(n)) / n
    if agg == "seq-mean-token-sum":
        return sum(seq_sums) / n
    return sum(seq_sums) / t  # seq-mean-token-sum-norm, Dr.GRPO's constant divisor


def reference_k3(logp, ref):
    x = min(max(ref - logp, -20.0), 20.0)
    return min(max(math.exp(x) - x - 1, -10.0), 10.0)


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def random_batch(seed, n=6, t=7):
    rng = np.random.default_rng(seed)
    logp = rng.normal(-1.5, 0.6, (n, t))
    old = logp + rng.normal(0, 0.4, (n, t))  # ratios well outside [0.7, 1.3] occur
    adv = rng.normal(0, 1.2, n)
    mask = (rng.uniform(size=(n, t)) < 0.8).astype(np.float64)
    mask[:, 0] = 1
    return logp, old, adv, mask


@pytest.mark.parametrize("g", [1, 2, 5])
@pytest.mark.parametrize("scale", [True, False])
def test_group_advantages_match_the_formula(x64, g, scale):
    scores = np.random.default_rng(g).choice([0.0, 0.1, 0.9, 1.0], size=4 * g)
    ours = grpo.group_advantages(jnp.asarray(scores), g, scale_by_std=scale)
    np.testing.assert_allclose(ours, reference_advantages(list(scores), g, scale=scale),
                               rtol=1e-12, atol=1e-12)


def test_equal_rewards_give_zero_advantage(x64):
    adv = grpo.group_advantages(jnp.asarray([1.0, 1.0, 1.0, 0.0, 1.0, 0.0]), 3)
    np.testing.assert_array_equal(adv[:3], 0.0)


@pytest.mark.parametrize("agg", grpo.AGGREGATIONS)
@pytest.mark.parametrize("clips", [(0.2, 0.3, 3.0), (0.2, 0.28, None), (0.2, 0.2, 3.0)])
def test_policy_loss_matches_the_formula(x64, agg, clips):
    logp, old, adv, mask = random_batch(7)
    lo, hi, c = clips
    ours = grpo.policy_loss(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv),
                            jnp.asarray(mask), lo, hi, c, agg)
    expected = reference_policy_loss(logp, old, adv, mask, lo, hi, c, agg)
    np.testing.assert_allclose(float(ours), expected, rtol=1e-12)


def test_dual_clip_binds_for_large_ratios_with_negative_advantage(x64):
    logp, old = jnp.asarray([[0.0]]), jnp.asarray([[-3.0]])  # ratio e^3 = 20
    loss, _ = grpo.policy_loss_terms(logp, old, jnp.asarray([-1.0]), dual_clip=3.0)
    assert float(loss[0, 0]) == 3.0  # -A * c, not -A * r = 20


def test_clip_flag_marks_the_binding_clip(x64):
    logp, old = jnp.asarray([[0.5, 0.0, -0.5]]), jnp.zeros((1, 3))
    _, clipped = grpo.policy_loss_terms(logp, old, jnp.asarray([1.0]))
    np.testing.assert_array_equal(clipped[0], [True, False, False])  # r=1.65 > 1.3 with A>0


def test_k3_kl_matches_the_formula(x64):
    logp, ref, _, _ = random_batch(3)
    ref = ref + np.where(np.random.default_rng(0).uniform(size=ref.shape) < 0.1, 30.0, 0.0)
    ours = grpo.kl_penalty(jnp.asarray(logp), jnp.asarray(ref), "k3")
    expected = np.vectorize(reference_k3)(logp, ref)
    np.testing.assert_allclose(ours, expected, rtol=1e-12)
    assert float(jnp.max(ours)) == 10.0  # the clamp binds on the shifted entries


def test_token_mean_equals_trl_and_seq_mean_equals_grpo_normalisation(x64):
    logp, old, adv, mask = random_batch(11)
    terms, _ = grpo.policy_loss_terms(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv),
                                      clip_high=0.2, dual_clip=None)
    terms = np.asarray(terms)
    # TRL "bnpo"/"dapo": all valid tokens of the batch at once; TRL "grpo": per sequence.
    np.testing.assert_allclose(float(grpo.aggregate(jnp.asarray(terms), jnp.asarray(mask))),
                               (terms * mask).sum() / mask.sum(), rtol=1e-12)
    np.testing.assert_allclose(
        float(grpo.aggregate(jnp.asarray(terms), jnp.asarray(mask), "seq-mean-token-mean")),
        ((terms * mask).sum(-1) / mask.sum(-1)).mean(), rtol=1e-12)


def test_group_stats_count_mixed_groups_pass_at_g_and_spread():
    # Three groups of G = 4: mixed with one right answer, all wrong, all right.
    scores = [1.0, 0.1, 0.1, 0.0, 0.1, 0.1, 0.1, 0.1, 1.0, 1.0, 1.0, 1.0]
    correct = [1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1]
    stats = grpo.group_stats(np.array(scores), np.array(correct), 4)
    assert float(stats["mixed_groups"]) == pytest.approx(1 / 3)
    assert float(stats["pass_at_g"]) == pytest.approx(2 / 3)
    first = np.array(scores[:4])  # the only group with a spread; np.std is the population std
    assert float(stats["reward_std"]) == pytest.approx(np.std(first) / 3)


def test_update_alignment_is_the_positive_minus_the_negative_log_prob_shift():
    old = jnp.zeros((3, 4))
    new = jnp.array([[0.2, 0.4, 9.0, 9.0], [-0.1, -0.3, 9.0, 9.0], [5.0, 5.0, 5.0, 5.0]])
    mask = jnp.array([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]])  # masked tokens ignored
    shift = grpo.update_alignment(old, new, jnp.array([1.0, -1.0, 0.0]), mask)
    assert float(shift["logp_shift_pos"]) == pytest.approx(0.3)
    assert float(shift["logp_shift_neg"]) == pytest.approx(-0.2)
    assert float(shift["update_alignment"]) == pytest.approx(0.5)


def reference_correction(old, rollout, mask, mode, c):
    """Element by element: r per token (or per sequence), then TIS / MIS."""
    n, t = old.shape
    weights, keep = np.ones((n, t)), mask > 0
    if mode == "none":
        return weights, keep
    for i in range(n):
        seq_log_r = sum(old[i, j] - rollout[i, j] for j in range(t) if mask[i, j] > 0)
        for j in range(t):
            if mask[i, j] == 0:
                weights[i, j] = min(1.0, c) if mode.endswith("tis") else 0.0
                continue
            r = math.exp(seq_log_r if mode.startswith("seq") else old[i, j] - rollout[i, j])
            if mode.endswith("tis"):
                weights[i, j] = min(r, c)
            else:
                keep[i, j] = r <= c
                weights[i, j] = r if r <= c else 0.0
    return weights, keep


@pytest.mark.parametrize("mode", grpo.CORRECTIONS)
@pytest.mark.parametrize("threshold", [1.2, 2.0])
def test_rollout_correction_matches_the_formulas(mode, threshold):
    k = jax.random.split(jax.random.key(11), 3)
    old = -jax.random.uniform(k[0], (5, 7)) * 3
    rollout = old + 0.4 * jax.random.normal(k[1], (5, 7))
    mask = (jnp.arange(7)[None] < jnp.array([[7], [4], [1], [6], [0]])).astype(jnp.float32)
    weights, keep = grpo.rollout_correction(old, rollout, mask, mode, threshold)
    want_w, want_keep = reference_correction(np.asarray(old, np.float64),
                                             np.asarray(rollout, np.float64),
                                             np.asarray(mask), mode, threshold)
    valid = np.asarray(mask) > 0
    np.testing.assert_array_equal(np.asarray(keep), want_keep)
    np.testing.assert_allclose(np.asarray(weights)[valid], want_w[valid], rtol=1e-5)
    if mode.endswith("mis"):  # the random ratios leave some tokens kept and some rejected
        assert 0 < np.asarray(keep)[valid].mean() < 1


def test_seq_mis_rejects_whole_sequences():
    old = jnp.zeros((2, 4))
    rollout = jnp.array([[0.0, 0.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0]])  # r = e for sequence 0
    weights, keep = grpo.rollout_correction(old, rollout, jnp.ones((2, 4)), "seq-mis", 2.0)
    np.testing.assert_array_equal(np.asarray(keep), [[False] * 4, [True] * 4])
    np.testing.assert_allclose(np.asarray(weights), [[0.0] * 4, [1.0] * 4])


def test_an_unknown_correction_is_refused_naming_the_modes():
    with pytest.raises(ValueError, match="rl.rollout_correction 'tis'.*token-tis"):
        grpo.rollout_correction(jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.ones((1, 2)), "tis")


def test_mismatch_stats_match_the_formulas():
    old = jnp.array([[-1.0, -2.0, -0.5], [-0.3, -0.1, -4.0]])
    rollout = jnp.array([[-1.2, -1.5, -0.5], [-0.3, -0.2, 9.0]])
    mask = jnp.array([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    stats = {k: float(v) for k, v in grpo.mismatch_stats(old, rollout, mask).items()}
    deltas = [0.2, -0.5, 0.0, 0.0, 0.1]
    assert stats["logprob_mismatch"] == pytest.approx(sum(map(abs, deltas)) / 5, rel=1e-5)
    assert stats["mismatch_kl"] == pytest.approx(
        sum(math.exp(d) - d - 1 for d in deltas) / 5, rel=1e-5)
    ppl_train = [math.exp((1.0 + 2.0 + 0.5) / 3), math.exp((0.3 + 0.1) / 2)]
    ppl_engine = [math.exp((1.2 + 1.5 + 0.5) / 3), math.exp((0.3 + 0.2) / 2)]
    assert stats["ppl_ratio"] == pytest.approx(
        sum(a / b for a, b in zip(ppl_train, ppl_engine)) / 2, rel=1e-5)
