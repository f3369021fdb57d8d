"""Trajectory estimators (docs/math.md §4.1, §4.2) against independent naive references: P1–P4,
printed gaps.

The references below are Python loops over sequences, steps, blocks and positions, written from the
formulas with plain forward passes on hand-built states; they never call minidtrpo.estimators.
Run with `pytest -s` to see the measured approximation gaps. The ELBO and one-step estimators
(minidtrpo.elbo): test_elbo.py.
"""

import itertools
import math

import pytest
import torch

from conftest import (P, M, assert_grads_close, grads, naive_logmu, perturbed, rollout,
                      tiny_model)
from minidtrpo.estimators import (dtrpo_logratio, entropy_at_reveal, reduced_recorded_logprob,
                                  reduced_trajectory_logprob, sample_block_steps,
                                  trajectory_logprob)
from minidtrpo.sampling import reveal_schedule

pytestmark = pytest.mark.usefixtures("single_thread")


def naive_state(traj, i, t, shift=0):
    """Tokens (P+L,) of sequence i in state τ_t: every response token with unmask_step ≥ t + shift
    masked."""
    x = traj.tokens[i].clone()
    for j in range(traj.unmask_step.shape[1]):
        if traj.unmask_step[i, j] >= t + shift:
            x[P + j] = M
    return x


def naive_step_logps(model, traj, shift=0):
    """(B, T): Σ_{i∈I_t} log μ_θ(y_i | x, τ_t), one forward per (sequence, step)."""
    B, L = traj.unmask_step.shape
    out = torch.zeros(B, traj.num_steps, dtype=torch.float64)
    for i in range(B):
        for t in range(traj.num_steps):
            lp = naive_logmu(model, naive_state(traj, i, t, shift), traj.logp_temperature)
            for j in range(L):
                if traj.unmask_step[i, j] == t:
                    out[i, t] = out[i, t] + lp[j, traj.responses[i, j]]
    return out


def naive_reduced(model, traj, steps):
    """Σ_b Σ_{i: unmask_step = b·T_B + s_b} log μ_θ(y_i | true state before step b·T_B + s_b)."""
    B, L = traj.unmask_step.shape
    out = [torch.zeros((), dtype=torch.float64) for _ in range(B)]
    for i in range(B):
        for blk in range(traj.num_blocks):
            t = blk * traj.steps_per_block + int(steps[i, blk])
            lp = naive_logmu(model, naive_state(traj, i, t), traj.logp_temperature)
            for j in range(L):
                if traj.unmask_step[i, j] == t:
                    out[i] = out[i] + lp[j, traj.responses[i, j]]
    return torch.stack(out)


# --------------------------------------------------------------------------------------------------
# P1: exact full trajectory


@pytest.mark.parametrize("layout", ["block", "full"])
@pytest.mark.parametrize("steps_per_block,temperature,remasking",
                         [(2, 1.0, "low_confidence"), (4, 0.7, "random"),
                          (3, 0.0, "low_confidence")])
def test_p1_full_trajectory_matches_sampler_and_naive(layout, steps_per_block, temperature,
                                                      remasking):
    """P1: trajectory_logprob with the sampling model == Σ logp_at_reveal == the naive per-state
    loop, per step and in gradient; a state shifted by one step (token visible) is far off, so the
    test can fail."""
    model = tiny_model(layout)
    traj = rollout(model, steps_per_block, temperature, remasking)
    total = trajectory_logprob(model, traj)
    per_step = trajectory_logprob(model, traj, per_step=True)
    naive = naive_step_logps(model, traj)
    torch.testing.assert_close(total, traj.logp_at_reveal.sum(1), rtol=0, atol=1e-10)
    torch.testing.assert_close(per_step, naive, rtol=0, atol=1e-10)
    assert_grads_close(grads(total.sum(), model), grads(naive.sum(), model))
    wrong = naive_step_logps(model, traj, shift=1).sum(1)  # token i visible in its own state
    assert (wrong - total).abs().min() > 1.0


def test_position_term_random_is_log_binomial():
    """log S_t = −log C(m_t, k_t) under random remasking, counted by hand."""
    model = tiny_model("full")
    traj = rollout(model, steps_per_block=3, remasking="random")
    got = trajectory_logprob(model, traj, position_term=True, per_step=True) - \
        trajectory_logprob(model, traj, per_step=True)
    for i in range(traj.tokens.shape[0]):
        for t in range(traj.num_steps):
            blk = t // traj.steps_per_block
            cols = range(blk * traj.block_size, (blk + 1) * traj.block_size)
            m = sum(int(traj.unmask_step[i, j] >= t) for j in cols)
            k = sum(int(traj.unmask_step[i, j] == t) for j in cols)
            assert abs(got[i, t].item() + math.log(math.comb(m, k))) < 1e-12


@pytest.mark.parametrize("layout", ["block", "full"])
@pytest.mark.parametrize("schedule", ["uniform", "ascending"])
def test_position_term_low_confidence_by_enumeration(layout, schedule):
    """The low-confidence transition probability Π μ_i(y_i)·S_t equals brute force: enumerate every
    candidate tuple at the block's masked positions, keep those whose top-k confident set is I_t
    with y. The ascending schedule (k = 1, 3) too: S_t holds for any k_t."""
    model = tiny_model(layout)
    traj = rollout(model, steps_per_block=2 if schedule == "uniform" else None, temperature=0.8,
                   batch=2, seed=3, schedule=schedule)
    per_step = trajectory_logprob(model, traj, position_term=True, per_step=True)
    b, V = traj.block_size, M  # candidates range over the 11 real tokens (MASK has probability 0)
    for i in range(2):
        for t in range(traj.num_steps):
            blk = t // traj.steps_per_block
            # masked in block
            cols = [j for j in range(blk * b, (blk + 1) * b) if traj.unmask_step[i, j] >= t]
            reveal = sorted(c for c, j in enumerate(cols) if traj.unmask_step[i, j] == t)
            # (m, V)
            lp = naive_logmu(model, naive_state(traj, i, t), traj.logp_temperature)[cols, :V]
            cand = torch.tensor(list(itertools.product(range(V), repeat=len(cols))))  # (V^m, m)
            conf = lp.gather(1, cand.T).T  # (V^m, m) log μ_j(c_j)
            # the sampler's chosen positions
            top = conf.topk(len(reveal), dim=1).indices.sort(1).values
            y = traj.responses[i, cols]
            ok = (top == torch.tensor(reveal)).all(1) & (cand[:, reveal] == y[reveal]).all(1)
            brute = conf[ok].sum(1).logsumexp(0)  # log Σ over accepted tuples of Π_j μ_j(c_j)
            assert abs(brute.item() - per_step[i, t].item()) < 1e-9


def test_position_term_greedy_raises():
    model = tiny_model("block")
    with pytest.raises(ValueError, match="temperature"):
        trajectory_logprob(model, rollout(model, temperature=0.0), position_term=True)
    # the selection term is derived for top-k by confidence or at random, not for the parallel
    # rules or EOS rejection: asking for it there is an error, not a wrong number
    for decoding in (dict(steps_per_block=None, remasking="threshold"),
                     dict(eos_factor=0.5, eos_id=3)):
        with pytest.raises(ValueError, match="position_term"):
            trajectory_logprob(model, rollout(model, **decoding), position_term=True)


def test_p2_random_remasking_position_term_cancels_and_print_low_confidence_gap():
    """P2: under random remasking the transition log-ratio with log S_t == token-only log-ratio, per
    step. Under low-confidence remasking S_t depends on θ: print how much it moves the
    log-ratio."""
    ref = tiny_model("block")
    policy = perturbed(ref, 0.02)
    traj = rollout(ref, steps_per_block=4, remasking="random", batch=8)
    ratio = {pt: trajectory_logprob(policy, traj, position_term=pt, per_step=True)
             - trajectory_logprob(ref, traj, position_term=pt, per_step=True)
             for pt in (True, False)}
    torch.testing.assert_close(ratio[True], ratio[False], rtol=0, atol=1e-10)
    assert (trajectory_logprob(ref, traj, position_term=True).sum()
            < trajectory_logprob(ref, traj).sum() - 1)
    for layout in ("block", "full"):
        ref = tiny_model(layout)
        policy = perturbed(ref, 0.02)
        traj = rollout(ref, steps_per_block=4, batch=16)  # low-confidence
        full = (trajectory_logprob(policy, traj, position_term=True)
                - trajectory_logprob(ref, traj, position_term=True))
        tok = trajectory_logprob(policy, traj) - trajectory_logprob(ref, traj)
        print(f"\n[gap] low-confidence ratio reduction ({layout}, T_B=4, |Δθ|~0.02): "
              f"mean |log-ratio with S_t − token-only| = {(full - tok).abs().mean():.4f}, "
              f"mean |token-only log-ratio| = {tok.abs().mean():.4f}")
        assert (full - tok).abs().mean() > 1e-3  # the gap is real: S_t does not cancel


# --------------------------------------------------------------------------------------------------
# P3: dTRPO single pass; P4: unbiasedness and variance


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_p3_block_single_pass_equals_per_block_passes(dtype, tol):
    """P3: block layout, one [x ; y ; ỹ] pass == one pass per block state == the naive loop (+
    gradients)."""
    model = tiny_model("block", dtype=dtype)
    traj = rollout(model, steps_per_block=4, batch=6)
    steps = sample_block_steps(traj, torch.Generator().manual_seed(0))
    single = reduced_trajectory_logprob(model, traj, steps)
    per_block = reduced_trajectory_logprob(model, traj, steps, single_pass=False)
    torch.testing.assert_close(single, per_block, rtol=0, atol=tol)
    if dtype == torch.float64:
        naive = naive_reduced(model, traj, steps)
        torch.testing.assert_close(single, naive, rtol=0, atol=tol)
        assert_grads_close(grads(single.sum(), model), grads(naive.sum(), model))


def test_full_layout_per_block_exact_and_print_single_pass_gap():
    """Full layout: the per-block passes equal the naive loop; the single pass is an approximation
    (printed)."""
    ref = tiny_model("full")
    policy = perturbed(ref, 0.02)
    traj = rollout(ref, steps_per_block=4, batch=16)
    steps = sample_block_steps(traj, torch.Generator().manual_seed(0))
    per_block = reduced_trajectory_logprob(ref, traj, steps, single_pass=False)
    naive = naive_reduced(ref, traj.index(slice(0, 4)), steps[:4])
    torch.testing.assert_close(per_block[:4], naive, rtol=0, atol=1e-10)
    single = reduced_trajectory_logprob(ref, traj, steps)
    gap_policy = (reduced_trajectory_logprob(policy, traj, steps)
                  - reduced_trajectory_logprob(policy, traj, steps, single_pass=False))
    d_single = dtrpo_logratio(policy, ref, traj, steps)
    d_exact = dtrpo_logratio(policy, ref, traj, steps, single_pass=False)
    print(f"\n[gap] full-layout single pass: mean |log-lik single − per-block| = "
          f"{(single - per_block).abs().mean():.4f}"
          f" (ref), {gap_policy.abs().mean():.4f} (policy = ref + N(0, 0.02²)); mean |log-lik| = "
          f"{per_block.abs().mean():.4f}; dTRPO D̂ (c = T_B = 4): mean |D̂ single − exact| = "
          f"{(d_single - d_exact).abs().mean():.4f}, mean |D̂| = {d_exact.abs().mean():.4f}")
    assert (single - per_block).abs().max() > 1e-6  # it is an approximation in this layout


@pytest.mark.parametrize("layout", ["block", "full"])
@pytest.mark.parametrize("temperature,remasking", [(1.0, "low_confidence"), (0.7, "random")])
def test_reduced_recorded_equals_sampler_reduced(layout, temperature, remasking):
    """The reference term of dTRPO's DPO, read from the record, == the sampler's reduced trajectory
    (true states, and the single pass in the block layout); at other sampled steps it differs."""
    model = tiny_model(layout)
    traj = rollout(model, steps_per_block=4, temperature=temperature, remasking=remasking, batch=6)
    steps = sample_block_steps(traj, torch.Generator().manual_seed(0))
    recorded = reduced_recorded_logprob(traj, steps)
    torch.testing.assert_close(recorded,
                               reduced_trajectory_logprob(model, traj, steps, single_pass=False),
                               rtol=0, atol=1e-10)
    if layout == "block":
        torch.testing.assert_close(recorded, reduced_trajectory_logprob(model, traj, steps),
                                   rtol=0, atol=1e-10)
    other = (steps + 1) % traj.steps_per_block  # a different step in every block
    assert (reduced_recorded_logprob(traj, other) - recorded).abs().max() > 1e-3


def all_step_combos(traj):
    """Every steps tensor (C, N_B) and the trajectory repeated C times, stacked: (C·B) rows."""
    combos = torch.tensor(list(itertools.product(range(traj.steps_per_block),
                                                 repeat=traj.num_blocks)))
    B = traj.tokens.shape[0]
    return (traj.index(torch.arange(B).repeat(len(combos))), combos.repeat_interleave(B, 0),
            len(combos))


def test_p4_dtrpo_unbiased_and_its_variance():
    """P4: with c = T_B, E_s[D̂] == the exact token log-ratio (the full log-ratio here: random
    remasking, P2): exactly by enumerating all s (value and gradient), and by Monte Carlo within 4
    standard errors. Var_s[D̂] over all s == T_B²·Σ_b Var_s(r_{b,s}), the per-step log-ratios
    r_{b,s} from the naive per-state loop (docs/math.md §4.2); on this model it grows with T_B."""
    ref = tiny_model("block")
    policy = perturbed(ref, 0.02)
    var = {}
    for T_B in (1, 2, 4):
        traj = rollout(ref, steps_per_block=T_B, batch=4, remasking="random")
        exact = trajectory_logprob(policy, traj) - trajectory_logprob(ref, traj).detach()  # (B,)
        big, steps, C = all_step_combos(traj)
        d_hat = dtrpo_logratio(policy, ref, big, steps).view(C, -1)  # (C, B)
        torch.testing.assert_close(d_hat.mean(0), exact, rtol=0, atol=1e-10)
        # r_{b,s}: the naive per-step log-ratios, (B, N_B, T_B)
        with torch.no_grad():
            r = (naive_step_logps(policy, traj) - naive_step_logps(ref, traj)).view(4, -1, T_B)
        # Var_s[D̂] = T_B² · Σ_b Var_s(r_{b,s})   (s_b independent and uniform)
        torch.testing.assert_close(d_hat.detach().var(0, unbiased=False),
                                   T_B ** 2 * r.var(-1, unbiased=False).sum(-1), rtol=0, atol=1e-10)
        var[T_B] = d_hat.detach().var(0, unbiased=False).mean().item()
        if T_B == 4:
            assert_grads_close(grads(d_hat.mean(0).sum(), policy), grads(exact.sum(), policy))
            R = 256
            mc_traj = traj.index(torch.arange(4).repeat(R))
            with torch.no_grad():
                mc = dtrpo_logratio(policy, ref, mc_traj,
                                    sample_block_steps(mc_traj, torch.Generator().manual_seed(1)))
            mc = mc.view(R, 4)
            se = mc.std(0) / math.sqrt(R)
            assert ((mc.mean(0) - exact.detach()).abs() < 4 * se).all()
            assert torch.equal(dtrpo_logratio(policy, ref, traj, steps[:4], scale="one") * 4,
                               dtrpo_logratio(policy, ref, traj, steps[:4]))
    print(f"\n[P4] mean Var_s[D̂] (c = T_B): T_B=1 {var[1]:.3g}, T_B=2 {var[2]:.3g}, "
          f"T_B=4 {var[4]:.3g}")
    assert var[1] < 1e-20 and var[4] > var[2] > 0.1


@pytest.mark.parametrize("T_B", [1, 2, 3, 4])
def test_p4_variance_for_iid_token_logratios_by_enumeration(T_B):
    """P4's variance when the L token log-ratios are i.i.d. (mean μ, variance σ²), by enumerating
    every outcome of a two-valued token law over N_B = 2 blocks of b = 4:
    E[T_B²·Σ_b Var_s(r_{b,s})] = (T_B − 1)·L·σ² + N_B·T_B²·μ²·Var_s(k_s) (docs/math.md §4.2);
    the last term vanishes when T_B divides b, as k_s is then constant."""
    n_blocks, b, values, probs = 2, 4, (0.7, -0.4), (0.3, 0.7)
    ks = reveal_schedule(b, T_B)
    step_of = [s for s, k in enumerate(ks) for _ in range(k)]  # the step of each position
    mu = sum(p * v for p, v in zip(probs, values))
    sigma2 = sum(p * (v - mu) ** 2 for p, v in zip(probs, values))
    expected_var = 0.0
    for outcome in itertools.product(range(2), repeat=n_blocks * b):  # 2^8 token log-ratio draws
        prob = math.prod(probs[o] for o in outcome)
        delta = [values[o] for o in outcome]
        total = 0.0
        for blk in range(n_blocks):  # T_B²·Var_s(r_{b,s}), r_{b,s} = Σ_{i∈I_{b,s}} δ_i
            r = [sum(delta[blk * b + i] for i in range(b) if step_of[i] == s) for s in range(T_B)]
            mean_r = sum(r) / T_B
            total += T_B ** 2 * sum((x - mean_r) ** 2 for x in r) / T_B
        expected_var += prob * total
    var_k = sum((k - b / T_B) ** 2 for k in ks) / T_B
    formula = (T_B - 1) * n_blocks * b * sigma2 + n_blocks * T_B ** 2 * mu ** 2 * var_k
    assert abs(expected_var - formula) < 1e-12
    assert (var_k == 0) == (b % T_B == 0)


def test_dtrpo_reference_gets_no_gradient():
    ref, policy = tiny_model("block"), perturbed(tiny_model("block"), 0.02)
    traj = rollout(ref)
    dtrpo_logratio(policy, ref, traj, sample_block_steps(traj)).sum().backward()
    assert all(p.grad is None for p in ref.parameters())
    assert all(p.grad is not None for p in policy.parameters())


def test_sample_block_steps_range_and_seed():
    traj = rollout(tiny_model("block"), steps_per_block=3)
    s = sample_block_steps(traj.index(torch.arange(4).repeat(500)),
                           torch.Generator().manual_seed(0))
    assert s.shape == (2000, 2, 1) and s.dtype == torch.long
    assert torch.equal(torch.bincount(s.flatten(), minlength=3) > 1200,
                       torch.ones(3, dtype=torch.bool))
    assert torch.equal(sample_block_steps(traj, torch.Generator().manual_seed(5)),
                       sample_block_steps(traj, torch.Generator().manual_seed(5)))


# --------------------------------------------------------------------------------------------------
# The dial: K of each block's T_B steps, sampled without replacement, c = T_B/K (P16–P19)


def all_subset_combos(traj, k, stratified=False):
    """Every steps tensor (C, N_B, K) the sampler can draw, each with its probability (equal), and
    the trajectory repeated C times: (C·B) rows. Uniform: every K-subset of {0..T_B−1} per block;
    stratified: every offset u, steps (u + round(j·T_B/K)) mod T_B, written out by hand."""
    T_B = traj.steps_per_block
    if stratified:
        per_block = [[(u + round(j * T_B / k)) % T_B for j in range(k)] for u in range(T_B)]
    else:
        per_block = [list(c) for c in itertools.combinations(range(T_B), k)]
    combos = torch.tensor(list(itertools.product(per_block, repeat=traj.num_blocks)))  # (C, N_B, K)
    B = traj.tokens.shape[0]
    return (traj.index(torch.arange(B).repeat(len(combos))), combos.repeat_interleave(B, 0),
            len(combos))


@pytest.mark.parametrize("stratified", [False, True])
def test_p16_dial_unbiased_for_every_k_by_enumeration(stratified):
    """P16: for every K = 1..T_B, the mean of D̂ (c = T_B/K) over every step set the sampler can
    draw (all K-subsets per block, or all offsets when stratified) == the exact token log-ratio,
    value and gradient; with log S_t (low confidence, one model) == the full log π(τ). The sampler
    draws every K-subset equally often (within 5 standard errors)."""
    ref = tiny_model("block")
    policy = perturbed(ref, 0.02)
    traj = rollout(ref, steps_per_block=4, batch=3, temperature=0.8)  # low confidence
    exact = trajectory_logprob(policy, traj) - trajectory_logprob(ref, traj).detach()  # (B,)
    exact_s = trajectory_logprob(policy, traj, position_term=True).detach()  # (B,) with log S_t
    for k in range(1, 5):
        big, steps, C = all_subset_combos(traj, k, stratified)
        d_hat = dtrpo_logratio(policy, ref, big, steps).view(C, -1)  # (C, B)
        torch.testing.assert_close(d_hat.mean(0), exact, rtol=0, atol=1e-10)
        if k == 2:
            assert_grads_close(grads(d_hat.mean(0).sum(), policy), grads(exact.sum(), policy))
        with torch.no_grad():  # c·Σ_b Σ_{s∈S_b} [log S_t + tokens], averaged over the sets
            full = (4 / k) * reduced_trajectory_logprob(policy, big, steps, position_term=True)
        torch.testing.assert_close(full.view(C, -1).mean(0), exact_s, rtol=0, atol=1e-10)
    # the sampler: each of the C(4, 2) = 6 subsets with probability 1/6
    many = traj.index(torch.arange(3).repeat(2000))
    drawn = sample_block_steps(many, torch.Generator().manual_seed(0), k=2, stratified=stratified)
    keys = drawn.sort(-1).values.flatten(0, 1)  # (B·N_B, 2) each set sorted
    sets = [c for c in itertools.combinations(range(4), 2)]
    counts = torch.tensor([(keys == torch.tensor(c)).all(-1).sum().item() for c in sets])
    if stratified:  # offsets 0..3 with round(j·4/2) = 0, 2: the sets {0, 2} and {1, 3} only
        p = torch.tensor([0, 0.5, 0, 0, 0.5, 0])
    else:
        p = torch.full((6,), 1 / 6)
    n = len(keys)
    assert ((counts - n * p).abs() <= 5 * (n * p * (1 - p)).sqrt() + 1e-9).all(), counts


@pytest.mark.parametrize("layout", ["block", "full"])
def test_p17_dial_at_t_b_is_exact_and_at_one_is_dtrpo(layout):
    """P17: K = T_B (c = 1, every step of every block) == the exact trajectory log-ratio of
    trajectory_logprob, value and gradient, with and without log S_t; K = 1 draws dTRPO's s_b
    (torch.randint, as before the dial) and == T_B × the naive reduced log-ratio on those steps."""
    ref = tiny_model(layout)
    policy = perturbed(ref, 0.02)
    traj = rollout(ref, steps_per_block=4, batch=4, temperature=0.8)
    single = layout == "block"  # the single pass is exact only there
    gen = torch.Generator().manual_seed(0)
    every = sample_block_steps(traj, gen, k=4)  # (B, N_B, 4): a permutation of 0..3 per block
    for pt in (False, True):
        dial = dtrpo_logratio(policy, ref, traj, every, single_pass=single, position_term=pt)
        exact = (trajectory_logprob(policy, traj, position_term=pt)
                 - trajectory_logprob(ref, traj, position_term=pt))
        torch.testing.assert_close(dial, exact, rtol=0, atol=1e-10)
        if not pt:
            assert_grads_close(grads(dial.sum(), policy), grads(exact.sum(), policy))
    one = sample_block_steps(traj, torch.Generator().manual_seed(5))  # (B, N_B, 1)
    s_b = torch.randint(0, 4, (4, traj.num_blocks), generator=torch.Generator().manual_seed(5))
    assert torch.equal(one[..., 0], s_b)
    with torch.no_grad():
        naive = 4 * (naive_reduced(policy, traj, s_b) - naive_reduced(ref, traj, s_b))
        dial = dtrpo_logratio(policy, ref, traj, one, single_pass=single)
    torch.testing.assert_close(dial, naive, rtol=0, atol=1e-10)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_p18_one_pass_with_k_copies_equals_k_separate_passes(dtype, tol):
    """P18: block layout, the one [x ; y ; ỹ¹ … ỹᴷ] pass == K separate [x ; y ; ỹᵏ] passes == the
    N_B·K plain passes on the true states == the naive loop (value and gradient, float64)."""
    model = tiny_model("block", dtype=dtype)
    traj = rollout(model, steps_per_block=4, batch=5)
    steps = sample_block_steps(traj, torch.Generator().manual_seed(0), k=3)  # (B, N_B, 3)
    one = reduced_trajectory_logprob(model, traj, steps)
    separate = sum(reduced_trajectory_logprob(model, traj, steps[..., k]) for k in range(3))
    true_states = reduced_trajectory_logprob(model, traj, steps, single_pass=False)
    torch.testing.assert_close(one, separate, rtol=0, atol=tol)
    torch.testing.assert_close(one, true_states, rtol=0, atol=tol)
    if dtype == torch.float64:
        naive = sum(naive_reduced(model, traj, steps[..., k]) for k in range(3))
        torch.testing.assert_close(one, naive, rtol=0, atol=tol)
        assert_grads_close(grads(one.sum(), model), grads(naive.sum(), model))
    torch.testing.assert_close(reduced_recorded_logprob(traj, steps), one.to(traj.logp_at_reveal),
                               rtol=0, atol=tol)  # the record gives the sampler's value, no pass


def test_p19_dial_variance_is_the_finite_population_formula():
    """P19: over every K-subset per block (uniform), Var[D̂] == Σ_b (T_B²/K)·σ_b²·(T_B−K)/(T_B−1),
    σ_b² = (1/T_B)·Σ_s (r_{b,s} − r̄_b)² from the naive per-step log-ratios (sampling without
    replacement: the finite-population factor); it falls with K to 0 at K = T_B. Stratified sets,
    by enumeration, printed beside it."""
    ref = tiny_model("block")
    policy = perturbed(ref, 0.02)
    T_B = 4
    traj = rollout(ref, steps_per_block=T_B, batch=4, temperature=0.8)
    with torch.no_grad():
        r = (naive_step_logps(policy, traj) - naive_step_logps(ref, traj)).view(4, -1, T_B)
        sigma2 = r.var(-1, unbiased=False)  # (B, N_B) population variance over the T_B steps
        var = {}
        for k in range(1, T_B + 1):
            for stratified in (False, True):
                big, steps, C = all_subset_combos(traj, k, stratified)
                d_hat = dtrpo_logratio(policy, ref, big, steps).view(C, -1)  # (C, B)
                var[k, stratified] = d_hat.var(0, unbiased=False)  # (B,)
            # Var[D̂] = Σ_b (T_B²/K)·σ_b²·(T_B − K)/(T_B − 1)
            formula = (T_B ** 2 / k * sigma2 * (T_B - k) / (T_B - 1)).sum(-1)
            torch.testing.assert_close(var[k, False], formula, rtol=0, atol=1e-10)
    means = {key: v.mean().item() for key, v in var.items()}
    print("\n[P19] mean Var[D̂] by K, uniform / stratified: " + ", ".join(
        f"K={k} {means[k, False]:.3g} / {means[k, True]:.3g}" for k in range(1, T_B + 1)))
    assert means[1, False] > means[2, False] > means[3, False] > means[4, False] == 0
    assert means[4, True] < 1e-20


@pytest.mark.parametrize("layout", ["block", "full"])
def test_entropy_at_reveal_matches_a_naive_loop(layout):
    """The runs' entropy diagnostic: H(μ_θ(· | x, τ_t)) at each token's reveal state, from plain
    passes on hand-built states."""
    model = tiny_model(layout)
    traj = rollout(model, steps_per_block=2, batch=3)
    got = entropy_at_reveal(model, traj)
    for i in range(3):
        for t in range(traj.num_steps):
            lp = naive_logmu(model, naive_state(traj, i, t))[:, :M]  # MASK has probability 0
            for j in range(traj.unmask_step.shape[1]):
                if traj.unmask_step[i, j] == t:
                    h = -(lp[j].exp() * lp[j]).sum()
                    assert abs(got[i, j].item() - h.item()) < 1e-10
