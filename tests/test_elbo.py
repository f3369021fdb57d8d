"""ELBO Monte Carlo (docs/math.md §4.3, VRPO / BGPO) and d1's one-step estimate (§4.4) against
naive references: P11.

The references are Python loops over masks, blocks and positions with plain forward passes on
hand-built states; they never call minidtrpo.elbo. The blockwise masks (docs/math.md §4.3) get their
own P11: the ELBO of the block-by-block orders.
"""

import copy
import itertools
import math
from types import SimpleNamespace

import pytest
import torch

from conftest import (P, M, assert_grads_close, grads, naive_logmu, perturbed, random_prompts,
                      rollout, tiny_model)
from minidtrpo.elbo import (elbo_mask_block, elbo_terms, one_step_logprob, resolve_elbo_masks,
                            sample_elbo_masks, sample_prompt_mask, sample_trajectory_masks)
from minidtrpo.estimators import trajectory_logprob
from minidtrpo.preference import dpo_vrpo
from minidtrpo.sampling import Trajectory, generate

pytestmark = pytest.mark.usefixtures("single_thread")


def test_sample_elbo_masks_stratified_and_uniform():
    B, L, n = 2000, 8, 3
    masks = sample_elbo_masks(B, L, n, torch.Generator().manual_seed(0))
    assert masks.shape == (B, n, L) and masks.dtype == torch.bool
    counts = masks.sum(-1)  # (B, N)
    for row in counts[:50].tolist():  # the counts are ((u − 1 + round(j·L/n)) mod L) + 1 for one u
        assert any(row == [((u - 1 + round(j * L / n)) % L) + 1 for j in range(n)]
                   for u in range(1, L + 1))
    freq = masks.float().mean((0, 1))  # every position equally likely
    assert (freq - freq.mean()).abs().max() < 0.03
    assert torch.equal(
        sample_elbo_masks(2, L, L, torch.Generator().manual_seed(1)).sum(-1).sort(1).values,
        torch.arange(1, L + 1).expand(2, L))  # n = L: every count once


def test_blockwise_elbo_masks():
    """elbo.py, departure 1: each sample keeps earlier blocks clean, masks 1..b positions of one
    block and every later block; the (block, count) cells are stratified like the counts of
    docs/math.md §4.3."""
    B, L, b, n = 2000, 8, 2, 3
    masks = sample_elbo_masks(B, L, n, torch.Generator().manual_seed(0), block_size=b)
    assert masks.shape == (B, n, L) and masks.dtype == torch.bool
    blocks = masks.view(B, n, L // b, b).sum(-1)  # (B, N, N_B) masked count per block
    first = (blocks > 0).float().argmax(-1)  # (B, N) the scored block k_j
    idx = torch.arange(L // b)
    assert ((blocks == 0) == (idx < first[..., None])).all()  # earlier blocks clean
    assert ((blocks == b) | (idx <= first[..., None])).all()  # later blocks whole
    # (B, N) c_j = k_j·b + m_j − 1
    cells = first * b + blocks.gather(-1, first[..., None])[..., 0] - 1
    for row in cells[:50].tolist():
        assert any(row == [(u + round(j * L / n)) % L for j in range(n)] for u in range(L))
    full = sample_elbo_masks(2, L, L, torch.Generator().manual_seed(1), block_size=b)
    # n = N_B·b: every (block, count) once (count = (N_B−1−k)·b + m)
    cells = (full.sum(-1) - 1).sort(1).values
    assert torch.equal(cells, torch.arange(L).expand(2, L))
    # (·, N_B, b)
    within = masks.view(B, n, L // b, b)[blocks.gather(-1, first[..., None])[..., 0] == 1]
    # where a single masked position falls inside its block: uniform
    freq = within.float().sum((0, 1))
    assert (freq / freq.sum() - 1 / b).abs().max() < 0.03
    assert elbo_mask_block("auto", "full", b) == b and elbo_mask_block("auto", "block", b) is None
    assert resolve_elbo_masks("auto", "block") == "trajectory"
    assert (elbo_mask_block("uniform", "full", b) is None
            and elbo_mask_block("blockwise", "block", b) == b)
    with pytest.raises(ValueError, match="elbo_masks='x'; valid: auto, uniform, blockwise"):
        elbo_mask_block("x", "full", b)
    with pytest.raises(ValueError, match="block_size=3 must divide response_len=8"):
        sample_elbo_masks(2, L, n, block_size=3)


def test_p11_blockwise_elbo_is_expected_semi_ar_loglik():
    """Full layout, blockwise masks (L = 4, b = 2): the exact ELBO of the semi-autoregressive
    sampler, Σ_blocks Σ_k (1/k)·mean_{|S|=k} Σ_{i∈S} log μ(y_i | earlier blocks clean, later
    masked), equals the mean over within-block orders of the trajectory log-prob (§4.1);
    elbo_terms(block_size=b) gives each term and L × its MC mean converges to it."""
    L, b = 4, 2
    model = tiny_model("full", response_len=L, block_size=b)
    prompts = random_prompts(2)
    y = generate(model, prompts, temperature=1.0,
                 generator=torch.Generator().manual_seed(0)).responses
    exact, terms, weights = torch.zeros(2, dtype=torch.float64), [], []
    for blk in range(L // b):
        cols = range(blk * b, (blk + 1) * b)
        for k in range(1, b + 1):
            subsets = list(itertools.combinations(cols, k))
            for S in subsets:
                # later blocks masked
                mask = torch.tensor([j in S or j // b > blk for j in range(L)])
                terms.append(mask)
                weights.append(1 / len(subsets))
                for i in range(2):
                    x = torch.cat([prompts[i], y[i].masked_fill(mask, M)])
                    lp = naive_logmu(model, x)
                    exact[i] += sum(lp[j, y[i, j]] for j in S).detach() / (k * len(subsets))
    ell = elbo_terms(model, prompts, y, torch.stack(terms).expand(2, -1, -1),
                     block_size=b).detach()  # (2, 6)
    # Σ over (block, k) of the mean over S of ℓ_S = (1/k)·Σ_{i∈S} log μ
    torch.testing.assert_close((ell * torch.tensor(weights, dtype=ell.dtype)).sum(1), exact,
                               rtol=0, atol=1e-10)
    per_block = [list(itertools.permutations(range(blk * b, (blk + 1) * b)))
                 for blk in range(L // b)]
    orders = [sum(parts, ()) for parts in itertools.product(*per_block)]
    O = len(orders)
    us = torch.tensor([[order.index(j) for j in range(L)] for order in orders])  # (O, L)
    traj = Trajectory(tokens=torch.cat([prompts, y], 1).repeat_interleave(O, 0),
                      unmask_step=us.repeat(2, 1),
                      logp_at_reveal=torch.zeros(2 * O, L, dtype=torch.float64), prompt_len=P,
                      block_size=b, steps_per_block=b, temperature=1.0, remasking="random",
                      mask_id=M)
    torch.testing.assert_close(trajectory_logprob(model, traj).detach().view(2, O).mean(1), exact,
                               rtol=0, atol=1e-10)
    R = 400
    masks = sample_elbo_masks(2 * R, L, 2, torch.Generator().manual_seed(0), block_size=b)
    mc = L * elbo_terms(model, prompts.repeat(R, 1), y.repeat(R, 1), masks,
                        block_size=b).detach().mean(1).view(R, 2)
    assert ((mc.mean(0) - exact).abs() < 4 * mc.std(0) / math.sqrt(R)).all()
    uniform = L * elbo_terms(model, prompts, y,
                             sample_elbo_masks(2, L, 64, torch.Generator().manual_seed(0))).mean(1)
    assert (uniform.detach() - exact).abs().max() > 1e-3  # the uniform ELBO is another quantity


def naive_elbo_term(model, prompt, response, mask):
    """(1/m)·Σ_{i masked} log μ_θ(y_i | ·). Block layout: each block scored in its own plain pass
    with the earlier blocks clean, itself masked by `mask`, later blocks fully masked (invisible
    anyway)."""
    cfg, L = model.config, len(response)
    blocks = range(L // cfg.block_size) if cfg.layout == "block" else [None]
    total = torch.zeros((), dtype=torch.float64)
    for blk in blocks:
        x = torch.cat([prompt, response.clone()])
        for j in range(L):
            here = blk is None or j // cfg.block_size == blk
            if (mask[j] and here) or (blk is not None and j // cfg.block_size > blk):
                x[P + j] = M
        lp = naive_logmu(model, x)
        for j in range(L):
            if mask[j] and (blk is None or j // cfg.block_size == blk):
                total = total + lp[j, response[j]]
    return total / int(mask.sum())


@pytest.mark.parametrize("layout", ["block", "full"])
def test_elbo_terms_match_naive(layout):
    model = tiny_model(layout)
    traj = rollout(model, batch=3)
    masks = sample_elbo_masks(3, 8, 4, torch.Generator().manual_seed(0))
    ell = elbo_terms(model, traj.prompts, traj.responses, masks)  # (B, N)
    naive = torch.stack([
        torch.stack([naive_elbo_term(model, traj.prompts[i], traj.responses[i], masks[i, j])
                     for j in range(4)])
        for i in range(3)])
    torch.testing.assert_close(ell, naive, rtol=0, atol=1e-10)
    assert_grads_close(grads(ell.sum(), model), grads(naive.sum(), model))
    # one MC sample, as BGPO uses it
    one = elbo_terms(model, traj.prompts, traj.responses, masks[:, 2:3])
    torch.testing.assert_close(one[:, 0], ell[:, 2], rtol=0, atol=1e-12)
    torch.testing.assert_close(
        elbo_terms(model, traj.prompts, traj.responses, masks, normalize=False), 8 * ell)


@pytest.mark.parametrize("layout", ["block", "full"])
def test_one_step_logprob_matches_naive(layout):
    model = tiny_model(layout)
    traj = rollout(model, batch=3)
    pmask = sample_prompt_mask(traj.prompts, 0.3, torch.Generator().manual_seed(0))
    got = one_step_logprob(model, traj.prompts, traj.responses, pmask, temperature=0.7)
    for i in range(3):
        x = torch.cat([traj.prompts[i].masked_fill(pmask[i], M), torch.full((8,), M)])
        lp = naive_logmu(model, x, 0.7)
        assert abs(got[i].item()
                   - sum(lp[j, traj.responses[i, j]].item() for j in range(8))) < 1e-10
    freq = sample_prompt_mask(torch.zeros(200, 50), 0.15,
                              torch.Generator().manual_seed(0)).float().mean()
    assert abs(freq.item() - 0.15) < 0.01


@pytest.mark.parametrize("layout,block_size", [("full", 4), ("block", 2)])
def test_p11_elbo_is_expected_random_order_loglik(layout, block_size):
    """P11 (L = 4): the exact ELBO (all masks enumerated) == mean over all decoding orders of the
    one-token-per-step trajectory log-prob (§4.1) ≤ log p(y) of that random-order sampler; L × the
    stratified MC mean converges to it. Block layout: orders inside each block, blocks left to
    right, and the exact ELBO is the sum of per-block ELBOs (BD3-LM)."""
    L = 4
    model = tiny_model(layout, response_len=L, block_size=block_size)
    prompts = random_prompts(2)
    y = generate(model, prompts, temperature=1.0,
                 generator=torch.Generator().manual_seed(0)).responses
    # exact ELBO by hand: Σ_blocks Σ_{k=1..b} (1/k)·mean_{S ⊆ block, |S|=k} Σ_{i∈S} log μ(y_i | ·)
    exact = torch.zeros(2, dtype=torch.float64)
    for blk in range(L // block_size):
        cols = range(blk * block_size, (blk + 1) * block_size)
        for k in range(1, block_size + 1):
            subsets = list(itertools.combinations(cols, k))
            for S in subsets:
                mask = torch.tensor([j in S for j in range(L)])
                for i in range(2):
                    exact[i] += (naive_elbo_term(model, prompts[i], y[i], mask).detach()
                                 / len(subsets))
    # the same through elbo_terms on every mask: Σ_{m=1..L} mean_{|S|=m} ℓ_S
    all_masks = [torch.tensor([j in S for j in range(L)])
                 for m in range(1, L + 1) for S in itertools.combinations(range(L), m)]
    sizes = torch.tensor([int(mk.sum()) for mk in all_masks])
    ell = elbo_terms(model, prompts, y,
                     torch.stack(all_masks).expand(2, -1, -1)).detach()  # (2, 15)
    via_terms = sum(ell[:, sizes == m].mean(1) for m in range(1, L + 1))
    torch.testing.assert_close(via_terms, exact, rtol=0, atol=1e-10)
    # every order σ (blocks left to right): unmask_step = rank of the position in the order
    per_block = [list(itertools.permutations(range(blk * block_size, (blk + 1) * block_size)))
                 for blk in range(L // block_size)]
    orders = [sum(parts, ()) for parts in itertools.product(*per_block)]
    us = torch.tensor([[order.index(j) for j in range(L)] for order in orders])  # (O, L)
    O = len(orders)
    traj = Trajectory(tokens=torch.cat([prompts, y], 1).repeat_interleave(O, 0),
                      unmask_step=us.repeat(2, 1),
                      logp_at_reveal=torch.zeros(2 * O, L, dtype=torch.float64), prompt_len=P,
                      block_size=block_size, steps_per_block=block_size, temperature=1.0,
                      remasking="random", mask_id=M)
    order_ll = trajectory_logprob(model, traj).detach().view(2, O)
    torch.testing.assert_close(order_ll.mean(1), exact, rtol=0, atol=1e-10)
    # Σ_σ P(σ)·p_σ(y)
    log_p = trajectory_logprob(model, traj, position_term=True).detach().view(2, O).logsumexp(1)
    assert (exact < log_p).all()
    R = 400
    masks = sample_elbo_masks(2 * R, L, 2, torch.Generator().manual_seed(0))
    mc = L * elbo_terms(model, prompts.repeat(R, 1), y.repeat(R, 1),
                        masks).detach().mean(1).view(R, 2)
    assert ((mc.mean(0) - exact).abs() < 4 * mc.std(0) / math.sqrt(R)).all()


@pytest.mark.parametrize("layout", ["block", "full"])
def test_trajectory_masks_are_visited_states(layout):
    """elbo_masks=trajectory: every mask is a state the sampler visited, before a stratified step
    (docs/math.md §4.3): in the block layout all blocks before the same within-block step s_j,
    in the full layout the whole response before global step t_j; n = T draws cover every step
    once; elbo_mask_block scores all blocks (block layout) or the block being decoded (full)."""
    model = tiny_model(layout)
    traj = generate(model, random_prompts(5), temperature=1.0, steps_per_block=2,
                    generator=torch.Generator().manual_seed(0))  # b = 4, T_B = 2: 2 tokens a step
    per_block = layout == "block"
    T_B, b, L = traj.steps_per_block, traj.block_size, traj.responses.shape[1]
    n = T_B if per_block else traj.num_steps
    masks = sample_trajectory_masks(traj, n, torch.Generator().manual_seed(1), per_block=per_block)
    assert masks.shape == (5, n, L)
    for i in range(5):
        seen = []
        for j in range(n):
            # the one step t (per block: within-block step s) whose state this mask is
            found = [t for t in range(n)
                     if torch.equal(masks[i, j], traj.unmask_step[i] >= (
                         torch.arange(L) // b * T_B + t if per_block else torch.tensor(t)))]
            assert len(found) == 1, (i, j)
            seen += found
        assert sorted(seen) == list(range(n))  # stratified: n = T draws visit each step once
    assert elbo_mask_block("trajectory", layout, b) == (None if per_block else b)


# --------------------------------------------------------------------------------------------------
# VRPO's antithetic sampling; trajectory masks against uniform masks (docs/math.md §4.3)


def every_mask(L):
    """All 2^L − 1 nonempty masks (K, L) and their probability under uniform masks: m ~ U{1..L},
    then a uniform m-subset, P(S) = 1 / (L·C(L, |S|))."""
    subsets = [S for m in range(1, L + 1) for S in itertools.combinations(range(L), m)]
    masks = torch.tensor([[j in S for j in range(L)] for S in subsets])
    prob = torch.tensor([1 / (L * math.comb(L, len(S))) for S in subsets], dtype=torch.float64)
    return masks, prob


def stratified_variance(ell, masks, n):
    """Exact variance of B̂ = (1/n) Σ_j ℓ^{(j)} under `sample_elbo_masks`' law, per response: ell
    (B, K) on every mask. Given the offset u the counts are m_j = ((u − 1 + round(j·L/n)) mod L) + 1
    and the n masks independent, so Var = E_u[(1/n²) Σ_j Var_{m_j}] + Var_u[(1/n) Σ_j E_{m_j}]."""
    L, sizes = masks.shape[1], masks.sum(1)
    mean = torch.stack([ell[:, sizes == m].mean(1) for m in range(1, L + 1)], 1)  # (B, L)
    var = torch.stack([ell[:, sizes == m].var(1, unbiased=False) for m in range(1, L + 1)], 1)
    cells = [[(u + round(j * L / n)) % L for j in range(n)] for u in range(L)]  # m_j − 1, per u
    cond_mean = torch.stack([mean[:, c].mean(1) for c in cells], 1)  # (B, L) E[B̂ | u]
    cond_var = torch.stack([var[:, c].sum(1) / n ** 2 for c in cells], 1)  # (B, L) Var[B̂ | u]
    return cond_var.mean(1) + cond_mean.var(1, unbiased=False)


@pytest.mark.parametrize("layout", ["block", "full"])
def test_shared_masks_reduce_the_variance_of_the_elbo_difference(layout):
    """P13, VRPO's antithetic sampling: the same masks for θ and ref lower the variance of
    B̂_θ − B̂_ref against independent masks, exactly (every mask enumerated, L = 8, uniform
    stratified masks, n = 1 and 4, a policy 0.02 from the reference): lower for every response,
    and by at least 5× summed over the responses. Var_indep − Var_shared = 2·Cov(B̂_θ, B̂_ref).
    And VRPO's DPO does share them: at θ = ref its D is exactly 0 for every response."""
    ref = tiny_model(layout)
    policy = perturbed(ref, 0.02)
    traj = rollout(ref, batch=4)
    masks, _ = every_mask(8)
    with torch.no_grad():
        ell = {m: elbo_terms(m, traj.prompts, traj.responses, masks.expand(4, -1, -1))
               for m in (policy, ref)}  # (B, K) ℓ on every mask
    for n in (1, 4):
        shared = stratified_variance(ell[policy] - ell[ref], masks, n)  # (B,)
        independent = stratified_variance(ell[policy], masks, n) + stratified_variance(
            ell[ref], masks, n)
        print(f"\n[antithetic] {layout}, n = {n}: Var shared / independent per response "
              f"{[round(v, 3) for v in (shared / independent).tolist()]}")
        assert (shared < independent).all() and shared.sum() < independent.sum() / 5
    options = SimpleNamespace(elbo_masks="uniform", n_mc=4, elbo_per_token=False, beta=1.0)
    at_ref = dpo_vrpo(options, copy.deepcopy(ref), ref, traj, torch.Generator().manual_seed(0))
    assert at_ref["chosen_logratio"] == 0 and at_ref["rejected_logratio"] == 0


def test_trajectory_masks_match_uniform_masks_in_expectation_not_in_distribution():
    """P15. Block layout, random remasking, one token per step (T_B = b = 4, L = 8): over every
    pair of block orders (24²) and every within-block step s (n = T_B stratified steps: each once),
    `sample_trajectory_masks` gives E[L·ℓ] equal to that of uniform masks (every mask enumerated),
    Σ_k ELBO_k (docs/math.md §4.3), to 1e-10; the variances differ: all blocks share one step,
    so their mask counts are equal, where uniform masks draw them jointly."""
    model, L, b = tiny_model("block"), 8, 4
    one = rollout(model, batch=1)
    prompt, y = one.prompts, one.responses
    masks, prob = every_mask(L)
    with torch.no_grad():
        uniform = elbo_terms(model, prompt, y, masks[None], normalize=False)[0]  # (K,) L·ℓ
    rank = torch.tensor([[order.index(j) for j in range(b)]
                         for order in itertools.permutations(range(b))])  # (24, b)
    pairs = torch.cartesian_prod(torch.arange(24), torch.arange(24))  # (576, 2) one order a block
    us = torch.cat([rank[pairs[:, 0]], b + rank[pairs[:, 1]]], 1)  # (576, L) unmask_step
    traj = Trajectory(tokens=torch.cat([prompt, y], 1).expand(len(us), -1), unmask_step=us,
                      logp_at_reveal=torch.zeros(len(us), L, dtype=torch.float64), prompt_len=P,
                      block_size=b, steps_per_block=b, temperature=1.0, remasking="random",
                      mask_id=M)
    visited = sample_trajectory_masks(traj, b, torch.Generator().manual_seed(0))  # (576, 4, L)
    with torch.no_grad():
        on_traj = elbo_terms(model, traj.prompts, traj.responses, visited,
                             normalize=False).flatten()  # (2304,) L·ℓ, each state equally likely
    mean_u = (prob * uniform).sum()
    var_u = (prob * (uniform - mean_u) ** 2).sum()
    print(f"\n[trajectory masks] E[L·ℓ] {on_traj.mean():.6f} (uniform {mean_u:.6f}); "
          f"Var {on_traj.var(unbiased=False):.4f} (uniform {var_u:.4f})")
    assert abs(on_traj.mean() - mean_u) < 1e-10
    assert abs(on_traj.var(unbiased=False) / var_u - 1) > 0.05
