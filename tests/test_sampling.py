"""The trajectory-recording sampler (docs/math.md §3) and its KV cache (P9)."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import M, random_prompts, tiny_model
from minidtrpo.estimators import trajectory_logprob
from minidtrpo.sampling import CREDIT, generate, reveal_schedule


def test_reveal_schedule():
    assert reveal_schedule(8, 8) == [1] * 8
    assert reveal_schedule(8, 3) == [3, 3, 2]
    assert reveal_schedule(4, 1) == [4]
    with pytest.raises(ValueError, match="steps_per_block"):
        reveal_schedule(4, 5)
    # CJ-GRPO's ascending step size, as its code: ⌊log₂ b⌋ steps, 2^s tokens at step s, the rest
    # folded into the last (b = 2^S: 1, 2, ..., 2^(S−1) + 1)
    assert reveal_schedule(4, schedule="ascending") == [1, 3]
    assert reveal_schedule(8, schedule="ascending") == [1, 2, 5]
    assert reveal_schedule(32, schedule="ascending") == [1, 2, 4, 8, 17]
    assert reveal_schedule(7, schedule="ascending") == [1, 6]
    assert reveal_schedule(2, schedule="ascending") == [2]
    assert reveal_schedule(1, schedule="ascending") == [1]
    for b in range(1, 70):  # the counts fill the block, in ⌊log₂ b⌋ steps
        ks = reveal_schedule(b, schedule="ascending")
        assert sum(ks) == b and len(ks) == max(1, math.floor(math.log2(b)))
    with pytest.raises(ValueError, match="steps_per_block"):
        reveal_schedule(4, 2, schedule="ascending")


# every decoding rule and schedule (the module docstring of sampling.py); EOS is token 3 here
DECODINGS = {
    "uniform T_B=3": dict(steps_per_block=3),
    "ascending": dict(schedule="ascending"),
    "random ascending": dict(schedule="ascending", remasking="random"),
    "eos rejection": dict(steps_per_block=2, eos_factor=0.05, eos_id=3),
    "threshold": dict(remasking="threshold", threshold=0.5),
    "credit": dict(remasking="credit", threshold=0.5),
    "credit, eos rejection": dict(remasking="credit", threshold=0.6, eos_factor=0.1, eos_id=3),
}


@pytest.mark.parametrize("name", DECODINGS)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_every_rule_keeps_the_kv_cache_exact(name, temperature):
    """P9 for every rule and schedule: cached and uncached decoding record the same trajectory."""
    model, prompts = tiny_model("block", seed=1), random_prompts(16, seed=1)
    runs = [generate(model, prompts, temperature=temperature, kv_cache=cache,
                     generator=torch.Generator().manual_seed(4), **DECODINGS[name])
            for cache in (True, False)]
    assert torch.equal(runs[0].tokens, runs[1].tokens)
    assert torch.equal(runs[0].unmask_step, runs[1].unmask_step)
    assert runs[0].steps_per_block == runs[1].steps_per_block
    torch.testing.assert_close(runs[0].logp_at_reveal, runs[1].logp_at_reveal, rtol=0, atol=1e-10)


@pytest.mark.parametrize("layout", ["block", "full"])
@pytest.mark.parametrize("name", DECODINGS)
def test_every_rule_reveals_inside_its_block_and_keeps_p1(layout, name):
    """Each rule reveals every position once, only inside the block of its step, as many per step
    as its schedule says (the parallel rules: at least one while the block has masked positions,
    the others above the threshold); the exact trajectory log-prob equals Σ logp_at_reveal (P1)."""
    options = DECODINGS[name]
    model, prompts = tiny_model(layout, seed=2), random_prompts(12, seed=2)
    traj = generate(model, prompts, temperature=1.0, generator=torch.Generator().manual_seed(5),
                    **options)
    T_B, b = traj.steps_per_block, traj.block_size
    assert (traj.unmask_step >= 0).all() and (traj.responses != M).all()
    ks = None if "remasking" in options and options["remasking"] != "random" else \
        reveal_schedule(b, options.get("steps_per_block"), options.get("schedule", "uniform"))
    assert T_B == (len(ks) if ks else T_B) and T_B <= b
    for t in range(traj.num_steps):
        block, s = divmod(t, T_B)
        revealed = traj.unmask_step == t  # (B, L)
        cols = revealed.nonzero()[:, 1]
        assert ((cols >= block * b) & (cols < (block + 1) * b)).all()
        if ks:
            assert (revealed.sum(1) == ks[s]).all()
        else:  # a step runs while the block has masked positions and reveals at least one
            left = (traj.unmask_step[:, block * b:(block + 1) * b] >= t).any(1)
            assert torch.equal(revealed.sum(1) > 0, left)
    torch.testing.assert_close(trajectory_logprob(model, traj), traj.logp_at_reveal.sum(1),
                               rtol=0, atol=1e-8)


def naive_greedy_decode(model, prompt, rule, threshold=0.9, eos_factor=1.0, eos_id=None,
                        credit=CREDIT):
    """CreditDecoding's formula, one sequence and one position at a time, greedy, no cache:
    C_v ← γ C_v + [v = argmax μ] μ_v^α; confidence max(μ(c), softmax(log μ + λ log(1 + C))(c));
    reveal every masked position above the threshold and the best one. Returns (tokens, steps)."""
    gamma0, (decay, fusion, alpha) = eos_factor, credit
    P, L, b = model.config.prompt_len, model.config.response_len, model.config.block_size
    x, step = prompt.tolist() + [M] * L, [-1] * L
    T = (L // b) * b  # nominal steps of the parallel rules, for the EOS ramp
    for blk in range(L // b):
        cols = range(P + blk * b, P + (blk + 1) * b)
        C = {j: [0.0] * model.config.vocab_size for j in cols}
        for s in range(b):
            masked = [j for j in cols if x[j] == M]
            if not masked:
                break
            t = blk * b + s
            logp = F.log_softmax(model(torch.tensor([x]))[0], -1)  # (P+L, V)
            conf, cand = {}, {}
            for j in cols:
                lp = logp[j].tolist()
                top = max(range(len(lp)), key=lp.__getitem__)
                C[j] = [decay * c + (v == top) * math.exp(alpha * lp[v])
                        for v, c in enumerate(C[j])]
                cand[j], conf[j] = top, lp[top]
                if rule == "credit":
                    fused = [lp[v] + fusion * math.log1p(C[j][v]) for v in range(len(lp))]
                    log_z = math.log(sum(math.exp(f) for f in fused))
                    conf[j] = max(conf[j], fused[top] - log_z)
                if gamma0 < 1 and top == eos_id:
                    conf[j] += math.log(gamma0 + (1 - gamma0) * t / (T - 1))
            best = max(masked, key=conf.__getitem__)
            for j in masked:
                if j == best or conf[j] >= math.log(threshold):
                    x[j], step[j - P] = cand[j], t
    return x, step


@pytest.mark.parametrize("seed,rule,options", [
    # the settings in which (on these tiny models) credit, threshold and EOS rejection each change
    # what is decoded: e.g. credit fills seed 4's blocks in 3 steps where the threshold takes 4
    (4, "credit", dict(threshold=0.3)),
    (4, "credit", dict(threshold=0.3, eos_factor=0.05, eos_id=1)),
    (4, "threshold", dict(threshold=0.3)),
    (2, "credit", dict(threshold=0.7)),
    (1, "credit", dict(threshold=0.5)),
])
def test_trace_credit_matches_a_naive_loop(seed, rule, options):
    """The batched rule decodes what the formula, applied position by position, decodes."""
    model, prompts = tiny_model("block", seed=seed), random_prompts(12, seed=seed)
    traj = generate(model, prompts, temperature=0.0, remasking=rule, **options)
    for i in range(len(prompts)):
        tokens, steps = naive_greedy_decode(model, prompts[i], rule, **options)
        assert traj.tokens[i].tolist() == tokens
        # generate renumbers steps to T_B = the most any block took; undo that to compare
        us, T_B = traj.unmask_step[i], traj.steps_per_block
        blk, s = us // T_B, us % T_B
        assert (blk * traj.block_size + s).tolist() == steps


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_kv_cache_matches_recomputation(seed, remasking, temperature):
    """P9: the cached sampler decodes the same tokens, steps and log-probs as the uncached one."""
    model = tiny_model("block", seed=seed)
    prompts = random_prompts(16, seed=seed)
    runs = [generate(model, prompts, steps_per_block=3, temperature=temperature,
                     remasking=remasking, generator=torch.Generator().manual_seed(seed),
                     kv_cache=cache)
            for cache in (True, False)]
    assert torch.equal(runs[0].tokens, runs[1].tokens)
    assert torch.equal(runs[0].unmask_step, runs[1].unmask_step)
    torch.testing.assert_close(runs[0].logp_at_reveal, runs[1].logp_at_reveal, rtol=0, atol=1e-10)


@pytest.mark.parametrize("layout", ["block", "full"])
@pytest.mark.parametrize("steps_per_block", [4, 3, 1])
def test_schedule_blocks_and_recorded_logps(layout, steps_per_block):
    """Each step reveals exactly k_s tokens, all inside the current block, and logp_at_reveal is the
    model's log-softmax at the state just before that step (rebuilt independently here)."""
    model = tiny_model(layout)
    prompts = random_prompts(8)
    tau = 0.7
    traj = generate(model, prompts, steps_per_block=steps_per_block, temperature=tau,
                    remasking="low_confidence", generator=torch.Generator().manual_seed(3))
    b, P = 4, 6
    schedule = reveal_schedule(b, steps_per_block)
    assert (traj.unmask_step >= 0).all() and (traj.tokens != 11).all()
    for t in range(traj.num_steps):
        block, s = divmod(t, steps_per_block)
        revealed = traj.unmask_step == t  # (B, L)
        assert (revealed.sum(1) == schedule[s]).all()
        cols = revealed.nonzero()[:, 1]
        assert ((cols >= block * b) & (cols < (block + 1) * b)).all()
        # the state before step t, built by hand: mask every token revealed at step >= t
        state = traj.tokens.clone()
        state[:, P:][traj.unmask_step >= t] = 11
        logp = F.log_softmax(model(state)[:, P:] / tau, dim=-1)  # (B, L, V)
        expected = logp.gather(-1, traj.responses[..., None]).squeeze(-1)
        torch.testing.assert_close(traj.logp_at_reveal[revealed], expected[revealed], rtol=0,
                                   atol=1e-10)
        assert torch.equal(traj.state(t), state)


def test_greedy_low_confidence_reveals_most_confident():
    """τ = 0: every revealed token is the argmax, and the first one revealed is the most
    confident."""
    model = tiny_model("full")
    prompts = random_prompts(4)
    traj = generate(model, prompts, steps_per_block=4, temperature=0.0)
    first = traj.state(0)
    logits = model(first)[:, 6:10]  # block 0 at step 0
    conf, arg = F.log_softmax(logits, -1).max(-1)  # (B, b)
    pos = traj.unmask_step[:, :4].argmin(dim=1)  # position revealed at step 0
    assert torch.equal(pos, conf.argmax(dim=1))
    assert torch.equal(traj.responses[torch.arange(4), pos], arg[torch.arange(4), pos])


def test_random_remasking_is_seeded():
    model = tiny_model("block")
    prompts = random_prompts(8)
    a, b, c = (generate(model, prompts, temperature=1.0, remasking="random",
                        generator=torch.Generator().manual_seed(s))
               for s in (5, 5, 6))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.unmask_step, b.unmask_step)
    assert not torch.equal(a.unmask_step, c.unmask_step)


# --------------------------------------------------------------------------------------------------
# P12: random remasking reveals a uniformly random k-subset of the m masked positions, the premise
# of log S_t = −log C(m, k) (docs/math.md §4.1) and so of P2

FALSE_ALARM = 1e-6  # chance that the check fails on a correct sampler (any seed)


def normal_quantile(alpha):
    """z with P(N(0, 1) > z) = alpha, by bisection on erfc(z/√2)/2."""
    lo, hi = 0.0, 40.0
    for _ in range(100):
        z = (lo + hi) / 2
        lo, hi = (z, hi) if math.erfc(z / math.sqrt(2)) / 2 > alpha else (lo, z)
    return z


def chi2_quantile(dof, alpha):
    """x with P(χ²_dof > x) ≈ alpha, by Wilson–Hilferty: (χ²/k)^(1/3) ≈ N(1 − 2/(9k), 2/(9k))."""
    z, v = normal_quantile(alpha), 2 / (9 * dof)
    return dof * (1 - v + z * math.sqrt(v)) ** 3


# (decoding options, hinted positions of the one block of 4): k_s = 2, 1, 1 of 4 masked; CJ-GRPO's
# ascending 1, 3; 2 then 2 with one position hinted, so m = 3 (k = 2), then 1 (k = 1)
SUBSET_CASES = {"k = 2, 1, 1": (dict(steps_per_block=3), []),
                "ascending": (dict(schedule="ascending"), []),
                "hint, k = 2, 1": (dict(steps_per_block=2), [0])}


def one_block_rollout(n, hinted=(), **options):
    """n one-block responses (P = 2, b = L = 4) decoded at τ = 1 with random remasking, and the
    model that decoded them."""
    model = tiny_model("block", prompt_len=2, response_len=4, block_size=4)
    hints = torch.full((n, 4), M)
    hints[:, list(hinted)] = 0
    return model, generate(model, random_prompts(n, prompt_len=2), temperature=1.0,
                           remasking="random", hints=hints,
                           generator=torch.Generator().manual_seed(11), **options)


def subset_chi2(options, hinted, n=4000):
    """Decode n one-block responses (b = 4) with random remasking; count each ordered outcome
    (I_0, I_1, ...), which must have probability Π_t 1/C(m_t, k_t). Returns Pearson's χ² against
    the uniform counts and the number of possible outcomes."""
    _, traj = one_block_rollout(n, hinted, **options)
    ks = reveal_schedule(4, options.get("steps_per_block"), options.get("schedule", "uniform"))
    outcomes, m = 1, 4 - len(hinted)
    for s, k in enumerate(ks):
        k = min(k, m)  # a hinted block runs out of masked positions early
        assert ((traj.unmask_step == s).sum(1) == k).all()  # k_s positions at step s, every row
        outcomes, m = outcomes * math.comb(m, k), m - k
    _, counts = torch.unique(traj.unmask_step, dim=0, return_counts=True)  # one row per outcome
    assert len(counts) == outcomes  # every outcome drawn, none else
    expected = n / outcomes
    return ((counts - expected) ** 2 / expected).sum().item(), outcomes


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("case", SUBSET_CASES)
def test_random_remasking_draws_every_subset_uniformly(case):
    """P12: the counts of the ordered outcomes are uniform: Pearson's χ² below its quantile at
    false-alarm rate 1e-6 (Wilson–Hilferty's approximation, K − 1 degrees of freedom, ≥ 300
    expected per cell)."""
    x2, outcomes = subset_chi2(*SUBSET_CASES[case])
    assert x2 < chi2_quantile(outcomes - 1, FALSE_ALARM), (x2, outcomes)


@pytest.mark.usefixtures("single_thread")
def test_random_remasking_ignores_the_candidates():
    """P12: the selection is blind to the candidates, so a token revealed at the first step has
    the confidence of any candidate there: the mean over n = 4000 rows of
    Σ_{i∈I_0} [μ_i(y_i) − Σ_v μ_i(v)²] / k_0 is 0 within 4.9 standard errors (two-sided false
    alarm 1e-6, normal approximation of a mean of bounded i.i.d. rows)."""
    model, traj = one_block_rollout(4000, steps_per_block=3)  # k_0 = 2 of 4
    first = traj.unmask_step == 0  # (n, 4)
    with torch.no_grad():  # μ_i at the all-masked block, the state of step 0
        mu = F.softmax(model(traj.state(0))[:, -4:], -1)  # (n, 4, V)
    # μ_i(c_i) of a revealed candidate − its expectation under c_i ~ μ_i, E[μ_i(c_i)] = Σ_v μ_i(v)²
    gap = torch.where(first, traj.logp_at_reveal.exp() - (mu ** 2).sum(-1), 0.0).sum(1) / 2
    z = gap.mean() / (gap.std() / math.sqrt(len(gap)))
    assert abs(z) < normal_quantile(FALSE_ALARM / 2), z


@pytest.mark.usefixtures("single_thread")
def test_the_subset_check_fails_on_a_biased_selection(monkeypatch):
    """The same check rejects a sampler whose random scores lean by 0.03 per position toward the
    end of the block (torch.rand patched for the (B, b) draw of random remasking only)."""
    rand = torch.rand

    def leaning(*size, **kw):
        u = rand(*size, **kw)
        return u if "dtype" in kw else u + 0.03 * torch.arange(u.shape[-1])  # not the Gumbel draw

    monkeypatch.setattr(torch, "rand", leaning)
    x2, outcomes = subset_chi2(*SUBSET_CASES["k = 2, 1, 1"])
    assert x2 > chi2_quantile(outcomes - 1, FALSE_ALARM), (x2, outcomes)


def test_bad_arguments():
    model = tiny_model("block")
    with pytest.raises(ValueError, match="remasking"):
        generate(model, random_prompts(2), remasking="top_k")
    with pytest.raises(ValueError, match="prompt_len"):
        generate(model, random_prompts(2, prompt_len=5))


@pytest.mark.parametrize("layout", ["block", "full"])
def test_hints_stay_fixed_and_the_trajectory_scores_only_what_was_decoded(layout):
    """Inpainting (IGPO): hinted tokens are in the response from the start (unmask_step −1, never
    changed), the free positions are decoded at ≤ k_s per step, and the exact trajectory
    log-prob still equals Σ logp_at_reveal (P1), the hints adding nothing."""
    from minidtrpo.estimators import trajectory_logprob
    from minidtrpo.igpo import sample_hints
    model = tiny_model(layout)
    prompts = random_prompts(8)
    answers = torch.randint(0, 11, (8, 8), generator=torch.Generator().manual_seed(5))
    share = torch.linspace(0, 1, 8)
    hints = sample_hints(answers, share, 11, torch.Generator().manual_seed(6))
    given = hints != 11
    assert not given[0].any() and given[-1].all()  # share 0: no hint; share 1: the whole answer
    assert torch.equal(hints[given], answers[given])
    traj = generate(model, prompts, steps_per_block=3, temperature=1.0, hints=hints,
                    generator=torch.Generator().manual_seed(7))
    assert torch.equal(traj.responses[given], answers[given])
    assert (traj.unmask_step[given] == -1).all() and (traj.unmask_step[~given] >= 0).all()
    schedule = reveal_schedule(4, 3)
    for t in range(traj.num_steps):
        assert ((traj.unmask_step == t).sum(1) <= schedule[t % 3]).all()
    torch.testing.assert_close(trajectory_logprob(model, traj), traj.logp_at_reveal.sum(1),
                               rtol=0, atol=1e-5)
    assert (traj.logp_at_reveal[given] == 0).all()


def test_cat_renumbers_batches_that_took_different_steps():
    """The parallel rules give each batch its own T_B; concatenated, step s of block k of either
    batch becomes k·T_B + s at the larger T_B, and P1 still holds row by row."""
    from minidtrpo.sampling import Trajectory
    model = tiny_model("block", seed=4)
    a, b = (generate(model, random_prompts(12, seed=4), remasking="threshold", threshold=th)
            for th in (0.05, 0.99))
    assert a.steps_per_block < b.steps_per_block
    both = Trajectory.cat([a, b])
    T_B, old = both.steps_per_block, a.steps_per_block
    assert T_B == b.steps_per_block and torch.equal(both.unmask_step[12:], b.unmask_step)
    assert torch.equal(both.unmask_step[:12], a.unmask_step // old * T_B + a.unmask_step % old)
    torch.testing.assert_close(trajectory_logprob(model, both), both.logp_at_reveal.sum(1),
                               rtol=0, atol=1e-8)
