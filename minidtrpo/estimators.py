"""Trajectory likelihood estimators of a response under the masked-diffusion policy (docs/math.md
§4.1, §4.2).

They call the model. What an objective uses to score a sampled response y given its prompt x, read
off the decoding trajectory that produced it:
- `trajectory_logprob`: the exact log-probability of the decoding trajectory, T = N_B·T_B states
  (docs/math.md §4.1): the token part TraceRL (arXiv 2509.06949) and CJ-GRPO (arXiv 2509.23924)
  score, and optionally the selection term log S_t, this project's derivation.
- `reduced_trajectory_logprob` + `dtrpo_logratio`: dTRPO's reduced trajectory (arXiv 2603.18806,
  docs/math.md §4.2), one sampled state per block, all scored in one forward pass; and the dial
  between it and the exact trajectory: K of each block's T_B states, sampled without replacement
  (`sample_block_steps(k=K)`), scaled by T_B/K, in one [x ; y ; ỹ¹ … ỹᴷ] pass (K = 1: dTRPO's
  D̂; K = T_B: the exact log-ratio).
The estimates of log p(y | x) itself, VRPO's and BGPO's Monte Carlo ELBO (§4.3) and d1's one step
(§4.4), are in elbo.py; they score through this module's `response_logps`, by the same conventions.

Conventions and departures:
1. μ_θ(v | x, s) = softmax(logits_θ(x, s) / τ)[v], τ = the rollout temperature
   (`traj.logp_temperature`, 1 for greedy rollouts): exactly what the sampler records in
   `logp_at_reveal`. Estimators that take (prompts, responses) take `temperature=1.0`.
2. Block layout: a noisy block is always scored in one [x ; clean y ; noisy ỹ] pass (shared
   position ids, `model.clean_noisy_mask`), seeing x and the clean earlier blocks: the
   block-diffusion (BD3-LM, arXiv 2503.09573) conditional the model is trained on. Full layout:
   plain passes on [x ; state], except dTRPO's optional single pass (an approximation there).
3. Many states are stacked along the batch and run as a few large forward calls of at most `chunk`
   rows; there is no Python loop over sequences.

Shapes: B batch, P prompt length, L response length, V vocab, N draws per row, N_B blocks, K states
per block, T steps, S forward passes (states scored side by side).
"""

import math

import torch
import torch.nn.functional as F
from einops import rearrange, repeat

from .model import clean_noisy_mask
from .sampling import PARALLEL


def response_logps(model, prompts, states, tau, *, clean=None, block_size=None, chunk=256):
    """log μ_θ(· | x, state) at the response positions of each row: (n, P), (n, K·L) -> (n, K·L, V).

    The forward pass of every estimator, here and in elbo.py.

    clean=None: a plain pass on [x ; state] with the model's layout mask (K = 1).
    clean=(n, L) tokens: one pass on [x ; clean ; ỹ¹ … ỹᴷ], the K noisy copies side by side in
    `states`, with clean_noisy_mask (docs/math.md §1).
    """
    n, P = prompts.shape
    N, device = states.shape[1], states.device  # N = K·L
    if clean is None:
        tokens, positions, attn = torch.cat([prompts, states], 1), None, None  # (n, P+L)
    else:
        L = clean.shape[1]
        tokens = torch.cat([prompts, clean, states], 1)  # (n, P+(K+1)L)
        # the clean copy and every noisy copy of response token i sit at position P + i
        positions = torch.cat([torch.arange(P + L, device=device),
                               torch.arange(P, P + L, device=device).repeat(N // L)])
        attn = clean_noisy_mask(P, L, block_size, device, copies=N // L)  # (P+(K+1)L, P+(K+1)L)
    logits = torch.cat([model(tokens[i:i + chunk], positions, attn)[:, -N:]
                        for i in range(0, n, chunk)])
    return F.log_softmax(logits / tau, dim=-1)  # (n, K·L, V)


def _score_states(model, traj, step_of, active, form, chunk):
    """Score S states of every trajectory side by side -> logp (S, B, L, V), tok (S, B, L),
    revealed (S, B, L).

    State s of trajectory i masks the response tokens with unmask_step ≥ step_of[s, i]: position j
    is read in its state before step step_of[s, i, j] (step_of (S, B or 1, L or 1)). A position
    gives a term only where active (S, B or 1, L) and revealed at that very step. form: "plain"
    (S·B rows [x ; state]), "rows" (S·B rows [x ; y ; state]) or "copies" (B rows
    [x ; y ; state¹ … stateˢ]); the last two exact in the block layout only (docs/math.md §1).
    """
    y, us = traj.responses, traj.unmask_step  # (B, L)
    B, L = y.shape
    states = y.masked_fill(us >= step_of, traj.mask_id)  # (S, B, L)
    n = len(states)
    if form == "copies":  # one row per trajectory, its S states side by side
        logp = response_logps(model, traj.prompts, rearrange(states, "s b l -> b (s l)"),
                              traj.logp_temperature, clean=y, block_size=traj.block_size,
                              chunk=chunk)
        logp = rearrange(logp, "b (s l) v -> s b l v", s=n)
    else:  # the S states stacked as rows (s b): state-major, one row per (state, trajectory)
        clean = dict(clean=repeat(y, "b l -> (s b) l", s=n), block_size=traj.block_size)
        logp = response_logps(model, repeat(traj.prompts, "b p -> (s b) p", s=n),
                              rearrange(states, "s b l -> (s b) l"), traj.logp_temperature,
                              chunk=chunk, **(clean if form == "rows" else {}))
        logp = rearrange(logp, "(s b) l v -> s b l v", s=n)
    tok = logp.gather(-1, y.expand(n, B, L)[..., None]).squeeze(-1)  # (S, B, L) log μ_θ(y_i | ·)
    revealed = active & (us == step_of)  # (S, B, L) token i revealed at the step of its state
    return logp, tok, revealed


def _check_position_term(traj):
    if traj.temperature == 0:
        raise ValueError("position_term needs a sampled trajectory (temperature > 0): "
                         "a greedy step is deterministic")
    if traj.remasking in PARALLEL or traj.eos_factor < 1:
        raise ValueError("position_term is derived for top-k selection by confidence or at "
                         f"random; this trajectory used remasking={traj.remasking!r} and "
                         f"eos_factor={traj.eos_factor}")


def _check_block_size(model, traj):
    if model.config.layout == "block" and traj.block_size != model.config.block_size:
        raise ValueError(f"trajectory block_size={traj.block_size} "
                         f"!= model block_size={model.config.block_size}")


# §4.1 Exact full trajectory ----------------------------------------------------------------------
def trajectory_logprob(model, traj, *, position_term=False, per_step=False, per_token=False,
                       chunk=256):
    """Exact log π_θ(τ | x) of the recorded trajectory -> (B,), or (B, T) per step if per_step.

    log π_θ(τ | x) = Σ_t [ log S_t(I_t | τ_t) + Σ_{i∈I_t} log μ_θ(y_i | x, τ_t) ]
    τ_t: the response with unmask_step ≥ t masked. Token part only unless position_term=True; with
    the sampling model it reproduces Σ traj.logp_at_reveal (P1). Passes: full layout, T of length
    P+L; block layout, T_B of length P+2L (pass s: block b in its state before step b·T_B+s, exact).
    position_term: log S_t = −log C(m_t, k_t) under random remasking (θ-free, cancels in ratios,
    P2); under low confidence (τ > 0) a θ-dependent sum over the discarded candidates, checked by
    enumeration in tests/test_estimators.py; a greedy rollout (τ = 0) raises ValueError.
    per_step=True: TraceRL's step-level sums; per_token=True: (B, L) each token's term at its
    reveal (what the sampler records as logp_at_reveal). Derivation: docs/math.md §4.1.
    """
    _check_block_size(model, traj)
    if position_term:
        _check_position_term(traj)
    y, us = traj.responses, traj.unmask_step  # (B, L)
    B, T = y.shape[0], traj.num_steps
    step_of, active, form = _every_state(model, traj)
    logp, tok, revealed = _score_states(model, traj, step_of, active, form, chunk)
    # Σ_{i∈I_t} log μ_θ(y_i | x, τ_t), placed at step t = unmask_step_i (revealed in one pass)
    logp_reveal = torch.where(revealed, tok, 0.0).sum(0)  # (B, L) == logp_at_reveal (sampler)
    if per_token:
        return logp_reveal
    # a hinted token (inpainting, unmask_step −1) is in every state and scored by no step: adds 0
    steps = torch.zeros(B, T, dtype=logp.dtype, device=y.device).scatter_add(
        1, us.clamp(min=0), logp_reveal)
    if position_term:  # log π_θ(τ_{t−1} | τ_t) = log S_t + Σ_{i∈I_t} log μ_θ(y_i | x, τ_t)
        others = active & (us > step_of)  # (S, B, L) masked in the current block, not revealed
        steps = steps + _log_selection_prob(traj, logp, tok, revealed, others, step_of)
    return steps if per_step else steps.sum(1)


def _every_state(model, traj):
    """step_of, active and form of `_score_states` for all T states of the trajectory."""
    L, device = traj.responses.shape[1], traj.tokens.device
    T, T_B = traj.num_steps, traj.steps_per_block
    block_of = torch.arange(L, device=device) // traj.block_size  # (L,) block of each position
    if model.config.layout == "block":
        s = torch.arange(T_B, device=device)[:, None, None]  # (T_B, 1, 1) within-block step
        step_of = block_of * T_B + s  # (T_B, 1, L) the global step at which each position is scored
        active = torch.ones_like(step_of, dtype=torch.bool)  # each block is "current" in its copy
        return step_of, active, "rows"  # T_B rows [x ; y ; ỹ], block k of row s before k·T_B + s
    step_of = torch.arange(T, device=device)[:, None, None].expand(-1, 1, L)  # (T, 1, L)
    active = block_of == step_of // T_B  # (T, 1, L) positions of the block decoded at step t
    return step_of, active, "plain"  # T plain passes on [x ; τ_t]


@torch.no_grad()
def entropy_at_reveal(model, traj, chunk=256) -> torch.Tensor:
    """H(μ_θ(· | x, τ_t)) at each decoded token in the state where it was revealed -> (B, L), 0 at
    hinted tokens: how unsure the policy is where it chooses (the same passes as
    `trajectory_logprob`, without grad; a diagnostic of the runs, docs/math.md §5.5)."""
    step_of, active, form = _every_state(model, traj)
    logp, _, revealed = _score_states(model, traj, step_of, active, form, chunk)
    # H = −Σ_v μ(v)·log μ(v)  (μ(MASK) = 0: its −∞ log gives 0·−∞, set to 0)
    entropy = -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1)  # (S, B, L)
    return torch.where(revealed, entropy, 0.0).sum(0)  # (B, L) each token's reveal state only


def _log_selection_prob(traj, logp, tok, revealed, others, step_of):
    """log S_t per step (B, T) from the passes' log-probs (S, B, L, V); see `trajectory_logprob`."""
    S, B, L, _ = logp.shape
    n_blocks, b = traj.num_blocks, traj.block_size
    by_block = (S, B, n_blocks, b)  # view of an (S, B, L) tensor block by block
    step_b = step_of.expand(S, B, L).reshape(by_block)[..., 0]  # (S, B, N_B) step of block's copy
    m = (revealed | others).view(by_block).sum(-1)  # (S, B, N_B) masked positions m_t of the block
    k = revealed.view(by_block).sum(-1)  # (S, B, N_B) revealed positions k_t
    if traj.remasking == "random":
        # log S_t = −log C(m_t, k_t)   (a block not decoded in this pass: k = m = 0, log C(0,0) = 0)
        m, k_ = m.to(logp.dtype), k.to(logp.dtype)
        log_s = -(torch.lgamma(m + 1) - torch.lgamma(k_ + 1)
                  - torch.lgamma(m - k_ + 1))  # (S, B, N_B)
    else:
        # c_min = min_{i∈I_t} μ_i(y_i), per block of each pass
        log_cmin = torch.where(revealed, tok, math.inf).view(by_block).amin(-1)  # (S, B, N_B)
        below = logp < log_cmin.repeat_interleave(b, -1)[..., None]  # (S, B, L, V) μ_j(v) < c_min
        keep = others[..., None] & below  # only masked, not revealed positions j contribute
        # rows that do not contribute get zeros (not all −inf): logsumexp then has a finite gradient
        masked_lp = torch.where(keep, logp, -math.inf).where(others[..., None], 0.0)  # (S, B, L, V)
        # log S_t = Σ_{j masked, not revealed at t} log Σ_{v: μ_j(v) < c_min} μ_j(v)
        log_s_pos = torch.where(others, masked_lp.logsumexp(-1), 0.0)  # (S, B, L)
        log_s = log_s_pos.view(by_block).sum(-1)  # (S, B, N_B)
    log_s = torch.where(k > 0, log_s, 0.0)  # only the block decoded at that step counts
    out = torch.zeros(B, traj.num_steps, dtype=logp.dtype, device=logp.device)
    return out.scatter_add(1, step_b.permute(1, 0, 2).flatten(1),
                           log_s.permute(1, 0, 2).flatten(1))  # (B, T)


# §4.2 dTRPO: reduced trajectory ------------------------------------------------------------------
def stratified_cells(batch, n_mc, n_cells, generator, device) -> torch.Tensor:
    """(B, N) cells c_j = (u + round(j·C/n)) mod C, u ~ U{0..C−1} per row: each c_j uniform,
    together spread evenly over the C cells (stratification: this project's, not VRPO's). The
    dial's stratified steps (§4.2) and the ELBO masks (elbo.py, §4.3) are drawn with it."""
    u = torch.randint(0, n_cells, (batch, 1), generator=generator, device=device)  # (B, 1)
    # round(j·C/n), half to even like Python's round
    j = torch.arange(n_mc, device=device, dtype=torch.float64)  # (N,)
    return (u + torch.round(j * n_cells / n_mc).long()) % n_cells  # (B, N)


def sample_block_steps(traj, generator=None, k=1, stratified=False) -> torch.Tensor:
    """K distinct within-block steps per block, independently per block: (B, N_B, K) long.

    Uniform (default): a uniform K-subset of {0..T_B−1}, the first K of a partial Fisher–Yates
    shuffle; K = 1 draws dTRPO's s_b ~ U{0..T_B−1}. stratified=True: s_j = (u + round(j·T_B/K))
    mod T_B with one u ~ U{0..T_B−1} per block, spread evenly over the block. Either way each
    step is in the set with probability K/T_B: what c = T_B/K needs (docs/math.md §4.2, P16).
    """
    T_B, device = traj.steps_per_block, (generator.device if generator is not None
                                         else traj.tokens.device)
    if not 1 <= k <= T_B:
        raise ValueError(f"k={k} steps per block: between 1 and steps_per_block={T_B}")
    shape = (traj.tokens.shape[0], traj.num_blocks)
    if stratified:  # (B·N_B, K) evenly spread steps, one random offset per block
        steps = stratified_cells(shape[0] * shape[1], k, T_B, generator, device).view(*shape, k)
    else:
        perm = torch.arange(T_B, device=device).repeat(*shape, 1)  # (B, N_B, T_B)
        for j in range(k):  # swap a uniform pick among places j..T_B−1 into place j
            pick = j + torch.randint(0, T_B - j, (*shape, 1), generator=generator, device=device)
            picked, head = perm.gather(-1, pick), perm[..., j:j + 1].clone()
            perm.scatter_(-1, pick, head)
            perm[..., j:j + 1] = picked
        steps = perm[..., :k]  # (B, N_B, K)
    return steps.to(traj.tokens.device)


def _copies(steps) -> torch.Tensor:
    """steps as (B, N_B, K): a (B, N_B) table is one step per block (K = 1)."""
    return steps if steps.dim() == 3 else steps[..., None]


def reduced_trajectory_logprob(model, traj, steps, *, single_pass=True, position_term=False,
                               chunk=256) -> torch.Tensor:
    """dTRPO's reduced trajectory (arXiv 2603.18806), K states per block -> (B,).

    Σ_b Σ_{s∈S_b} [log S_t + Σ_{i∈I_{b,s}} log μ_θ(y_i | x, y_{<b}, ỹ_b^{(s)})],  t = b·T_B + s
    ỹ_b^{(s)}: block b re-masked to its state just before step t; S_b: the K steps of block b,
    steps (B, N_B, K) from `sample_block_steps` ((B, N_B): K = 1); the reference must be scored
    with the same steps. log S_t only if position_term (as `trajectory_logprob`). single_pass=True:
    one [x ; y ; ỹ¹ … ỹᴷ] pass (length P+(K+1)L, copy k holding every block at its k-th step),
    exact in the block layout (P3, P18), approximate in the full layout (tests print the gap);
    False: one plain pass per block and step on its true state (N_B·K), exact in both layouts.
    With all T_B steps of every block it is the exact `trajectory_logprob`. Derivation:
    docs/math.md §4.2, and §1 for the single pass.
    """
    _check_block_size(model, traj)
    if position_term:
        _check_position_term(traj)
    steps = _copies(steps)  # (B, N_B, K)
    y, us = traj.responses, traj.unmask_step  # (B, L)
    L, device = y.shape[1], y.device
    T_B, n_blocks, K = traj.steps_per_block, traj.num_blocks, steps.shape[-1]
    block_of = torch.arange(L, device=device) // traj.block_size  # (L,)
    if single_pass:
        # copy k: every block b in its state before its k-th sampled step b·T_B + s_{b,k}
        step_of = block_of * T_B + rearrange(steps, "b n k -> k b n")[..., block_of]  # (K, B, L)
        active = torch.ones_like(step_of, dtype=torch.bool)  # every block scored in every copy
        form = "copies"
    else:
        # pass (b, k): the true state before block b's k-th sampled step, scoring block b only
        first = torch.arange(n_blocks, device=device)[:, None, None] * T_B  # (N_B, 1, 1)
        step_of = rearrange(first + rearrange(steps, "b n k -> n k b"), "n k b -> (n k) b")
        step_of = step_of[..., None]  # (N_B·K, B, 1)
        pass_block = torch.arange(n_blocks, device=device).repeat_interleave(K)  # (N_B·K,)
        active = block_of == pass_block[:, None, None]  # (N_B·K, 1, L)
        form = "plain"
    logp, tok, revealed = _score_states(model, traj, step_of, active, form, chunk)
    # Σ_b Σ_{s∈S_b} Σ_{i∈I_{b,s}} log μ_θ(y_i | x, y_{<b}, ỹ_b^{(s)})   (other tokens: no term)
    total = torch.where(revealed, tok, 0.0).sum((0, 2))  # (B,)
    if position_term:  # + Σ_b Σ_{s∈S_b} log S_{b·T_B+s}
        others = active & (us > step_of)  # masked in the scored block, not revealed at its step
        total = total + _log_selection_prob(traj, logp, tok, revealed, others, step_of).sum(1)
    return total


def reduced_recorded_logprob(traj, steps) -> torch.Tensor:
    """The reduced trajectory of the model that sampled traj, read from its record, no pass: (B,).

    Σ_b Σ_{s∈S_b} Σ_{i∈I_{b,s}} logp_at_reveal_i == reduced_trajectory_logprob(sampler, traj,
    steps) (P1, state by state): the reference term of D̂ when the reference decoded the response
    (DPO pairs). steps (B, N_B, K) or (B, N_B).
    """
    steps = _copies(steps)  # (B, N_B, K)
    L = traj.responses.shape[1]
    block_of = torch.arange(L, device=traj.tokens.device) // traj.block_size  # (L,)
    t = (block_of * traj.steps_per_block)[:, None] + steps[:, block_of]  # (B, L, K) sampled steps
    # Σ_b Σ_{s∈S_b} Σ_{i∈I_{b,s}} logp_at_reveal_i,  I_{b,s} = {i : unmask_step_i = b·T_B + s}
    scored = (traj.unmask_step[..., None] == t).any(-1)  # (B, L) revealed at one of the K steps
    return torch.where(scored, traj.logp_at_reveal, 0.0).sum(1)  # (B,)


def dtrpo_scale(traj, scale: str, k: int = 1) -> float:
    """c of D̂ with K steps per block: T_B/K for scale="steps" (unbiased, P4, P16), 1/K for
    scale="one" (the paper's form at K = 1, T_B absorbed into β)."""
    return {"steps": traj.steps_per_block, "one": 1}[scale] / k


def dtrpo_logratio(policy, ref, traj, steps, scale="steps", *, single_pass=True,
                   position_term=False) -> torch.Tensor:
    """dTRPO's trajectory log-ratio estimate D̂(x, y) with K steps per block -> (B,), gradient
    through the policy only.

    D̂ = c · Σ_b Σ_{s∈S_b} Σ_{i∈I_{b,s}} [log μ_θ(y_i | x, y_{<b}, ỹ_b^{(s)}) − log μ_ref(same)]
    steps (B, N_B, K) from `sample_block_steps` ((B, N_B): K = 1, dTRPO's D̂). c = T_B/K for
    scale="steps" (E_S[D̂] = the exact token log-ratio, P4, P16; K = T_B: the exact log-ratio
    itself, P17), 1/K for "one" (the paper's, absorbed into β). log S_t is dropped unless
    position_term: it cancels exactly under random remasking (P2), approximately under low
    confidence (the tests print the gap). Derivation: docs/math.md §4.2.
    """
    c = dtrpo_scale(traj, scale, _copies(steps).shape[-1])
    kw = dict(single_pass=single_pass, position_term=position_term)
    # the reference sees the same sampled steps and the same re-masked input (coupled estimate)
    with torch.no_grad():
        ref_logp = reduced_trajectory_logprob(ref, traj, steps, **kw)
    # D̂ = c · (reduced log-lik under θ − under ref)
    return c * (reduced_trajectory_logprob(policy, traj, steps, **kw) - ref_logp)
