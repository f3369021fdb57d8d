"""Estimators of log p(y | x) under the masked-diffusion policy (docs/math.md §4.3, §4.4).

They call the model, through `estimators.response_logps` and by the conventions of estimators.py
(μ_θ at the rollout temperature, the block layout's [x ; y ; ỹ] pass, states stacked in a few large
forward calls). Their target is the response's likelihood log p(y | x), not the trajectory that
decoded it: the ELBO bounds it, the one-step estimate is a mean-field proxy of it.
- `sample_elbo_masks` + `elbo_terms`: the Monte Carlo ELBO of VRPO (arXiv 2505.19223) / BGPO
  (arXiv 2510.11683), docs/math.md §4.3; `sample_trajectory_masks` takes the masks from the
  rollout's own states instead, and `elbo_masks_for` draws the masks of an `elbo_masks` choice.
- `one_step_logprob` + `sample_prompt_mask`: d1 / diffu-GRPO's one-step mean-field estimate
  (arXiv 2504.12216), docs/math.md §4.4.

Departures:
1. ELBO masks in the full layout (option, `block_size=b`): instead of uniform masks over the whole
   response (states a block-by-block sampler never visits), blockwise masks keep earlier blocks
   clean, later blocks masked, and score one block: the semi-autoregressive sampler's ELBO (§4.3).
2. ELBO masks: the n counts share one random offset, spread evenly over 1..L (stratified); VRPO's
   n noise levels are independent. Its other techniques (n samples, one mask each, the same masks
   for θ, old and ref) are as in the paper.

Shapes: B batch, P prompt length, L response length, V vocab, N MC samples, T steps.
"""

import torch
from einops import rearrange, repeat

from .estimators import response_logps, stratified_cells


# §4.3 ELBO Monte Carlo (VRPO / BGPO) -------------------------------------------------------------
def sample_elbo_masks(batch, response_len, n_mc, generator=None, device=None,
                      block_size=None) -> torch.Tensor:
    """n_mc stratified masks per sequence (docs/math.md §4.3): (B, N, L) bool, True = masked.

    block_size=None (uniform): u ~ U{1..L} per sequence; m_j = ((u − 1 + round(j·L/n)) mod L) + 1;
      sample j masks m_j positions uniformly without replacement (the stratified offset is this
      project's addition to VRPO, which draws its noise levels independently).
    block_size=b (departure 1): sample j reads a stratified cell c = k·b + m − 1 of the N_B·b as
      (block k_j, count m_j), masks m_j uniform positions of block k_j and every later block whole.
    """
    gen_device = generator.device if generator is not None else device
    L = response_len
    if block_size is not None and (block_size < 1 or L % block_size):
        raise ValueError(f"block_size={block_size} must divide response_len={L}")
    # stratify over the L counts m, or over the N_B·b = L pairs (block k, count m)
    c = stratified_cells(batch, n_mc, L, generator, gen_device)  # (B, N) cells 0..L−1
    # a uniformly random subset of size m: the m positions with the smallest random keys
    keys = torch.rand(batch, n_mc, L, generator=generator, device=gen_device)  # (B, N, L)
    if block_size is None:
        rank = keys.argsort(-1).argsort(-1)  # (B, N, L) rank of each position among all L
        masks = rank < (c + 1)[..., None]  # m_j = c_j + 1
    else:
        k, m = c[..., None] // block_size, c[..., None] % block_size + 1  # (B, N, 1) block, count
        block_of = torch.arange(L, device=gen_device) // block_size  # (L,)
        rank = keys.view(batch, n_mc, -1, block_size).argsort(-1).argsort(-1)  # rank within block
        rank = rank.view(batch, n_mc, L)
        # sample j: m_j random positions of block k_j masked, every block after k_j masked whole
        masks = ((block_of == k) & (rank < m)) | (block_of > k)  # (B, N, L)
    return masks if device is None else masks.to(device)


def sample_trajectory_masks(traj, n_mc, generator=None, *, per_block=True) -> torch.Tensor:
    """n_mc masks per response read off its own decoding trajectory: (B, N, L) bool, True = masked.

    Sample j is a state the sampler visited (docs/math.md §4.3, "masks from the trajectory").
    per_block=True (block layout): every block just before its within-block step s_j, s_j
    stratified over 0..T_B−1 (one [x ; y ; ỹ] pass scores all blocks); False (full layout): the
    whole response just before global step t_j, stratified over 0..T−1; score it with
    `elbo_terms(block_size=b)`, the block being decoded. Under random remasking with T_B = b, each
    state has the law of a blockwise mask (per_block=False); per_block=True matches the uniform
    masks' mean of L·ℓ, Σ_k ELBO_k, but not their law (every block holds the same count, P15).
    """
    device = generator.device if generator is not None else traj.tokens.device
    B, L = traj.responses.shape
    n_cells = traj.steps_per_block if per_block else traj.num_steps
    c = stratified_cells(B, n_mc, n_cells, generator, device).to(traj.tokens.device)  # (B, N)
    t = c[..., None]  # (B, N, 1) global step before which the state is taken
    if per_block:  # block k's step s_j is global step k·T_B + s_j
        block_of = torch.arange(L, device=c.device) // traj.block_size  # (L,)
        t = block_of * traj.steps_per_block + t  # (B, N, L)
    return traj.unmask_step[:, None, :] >= t  # masked = not yet revealed before step t


ELBO_MASKS = ("auto", "uniform", "blockwise", "trajectory")


def resolve_elbo_masks(choice, layout):
    """An `elbo_masks` choice with auto resolved: the masks of the states the sampler visits,
    blockwise in the full layout (departure 1), the trajectory's own in the block layout (there
    BGPO gains with them and not with uniform masks: docs/results.md, "What did not help")."""
    if choice not in ELBO_MASKS:
        raise ValueError(f"elbo_masks={choice!r}; valid: {', '.join(ELBO_MASKS)}")
    if choice == "auto":
        return "blockwise" if layout == "full" else "trajectory"
    return choice


def elbo_mask_block(choice, layout, block_size):
    """The block_size argument of `sample_elbo_masks` / `elbo_terms` for an `elbo_masks` choice:
    b where one block is scored per sample (blockwise; trajectory in the full layout), else None."""
    choice = resolve_elbo_masks(choice, layout)
    blockwise = choice == "blockwise" or (choice == "trajectory" and layout == "full")
    return block_size if blockwise else None


def elbo_masks_for(choice, layout, traj, n_mc, generator=None, group=1) -> torch.Tensor:
    """ELBO masks (B, N, L) of an `elbo_masks` choice for traj's responses: each response's own
    visited states (trajectory), or drawn uniform or blockwise with one set shared by every `group`
    consecutive responses. Hinted tokens (unmask_step −1) are context, never masked."""
    blk = elbo_mask_block(choice, layout, traj.block_size)  # None: uniform masks; b: blockwise
    if resolve_elbo_masks(choice, layout) == "trajectory":  # per response: `group` does not apply
        return sample_trajectory_masks(traj, n_mc, generator, per_block=blk is None)
    B, L = traj.responses.shape
    masks = sample_elbo_masks(B // group, L, n_mc, generator, traj.tokens.device, blk)
    # groups are contiguous rows (p g): every response of group p gets p's masks
    return repeat(masks, "p n l -> (p g) n l", g=group) & traj.unmask_step[:, None, :].ge(0)


def elbo_terms(model, prompts, responses, masks, *, normalize=True, temperature=1.0,
               block_size=None, chunk=256) -> torch.Tensor:
    """Per-sample ELBO terms ℓ^{(j)} -> (B, N); derivation: docs/math.md §4.3.

    ℓ^{(j)} = (1/m_j) · Σ_{i masked in sample j} log μ_θ(y_i | x, y^{(j)}),  m_j = |mask j|
    masks: (B, N, L) from `sample_elbo_masks`, shared by policy, old policy and reference; BGPO
    passes one sample at a time, masks[:, j:j+1]. normalize=True (default, the BGPO code): per
    masked token; False: × L, LLaDA's per-sequence (L/m_j)·Σ, whose mean ≤ log p(y) (P11).
    Block layout: one [x ; y ; y^{(j)}] pass, the clean earlier blocks as context (mean: BD3-LM's
    per-block ELBO, the training bound); full layout: a plain pass on [x ; y^{(j)}]. block_size=b
    (full layout, masks drawn with the same b; departure 1): only the first block holding a masked
    position is scored, later blocks are masked context.
    """
    B, n, L = masks.shape
    # the N samples of a response stacked as rows (b n): response-major, one per (response, sample)
    noisy = responses[:, None].masked_fill(masks, model.config.mask_id)  # (B, N, L)
    noisy = rearrange(noisy, "b n l -> (b n) l")
    clean = repeat(responses, "b l -> (b n) l", n=n) if model.config.layout == "block" else None
    logp = response_logps(model, repeat(prompts, "b p -> (b n) p", n=n), noisy, temperature,
                          clean=clean, block_size=model.config.block_size, chunk=chunk)
    logp = rearrange(logp, "(b n) l v -> b n l v", n=n)
    tok = logp.gather(-1, responses[:, None, :, None].expand(B, n, L, 1)).squeeze(-1)  # (B, N, L)
    scored = masks
    if block_size is not None:  # the first block with a masked position: the block being decoded
        block_of = torch.arange(L, device=masks.device) // block_size  # (L,)
        first = torch.where(masks, block_of, L).amin(-1, keepdim=True)  # (B, N, 1)
        scored = masks & (block_of == first)  # (B, N, L)
    # ℓ^{(j)} = (1/m_j) · Σ_{i masked} log μ_θ(y_i | x, y^{(j)})   (a visible token: no term)
    # (an empty mask, possible when hints fill a response: ℓ = 0, no gradient)
    ell = torch.where(scored, tok, 0.0).sum(-1) / scored.sum(-1).clamp(min=1)  # (B, N)
    return ell if normalize else L * ell


# §4.4 One-step mean-field (d1 / diffu-GRPO) ------------------------------------------------------
def sample_prompt_mask(prompts, p=0.15, generator=None) -> torch.Tensor:
    """Each prompt token masked independently with probability p, as in d1: (B, P) bool."""
    device = generator.device if generator is not None else prompts.device
    return (torch.rand(prompts.shape, generator=generator, device=device) < p).to(prompts.device)


def one_step_logprob(model, prompts, responses, prompt_mask, *, temperature=1.0) -> torch.Tensor:
    """d1's one-step mean-field log-likelihood (arXiv 2504.12216, docs/math.md §4.4) -> (B,).

    log π_θ(y | x) ≈ Σ_i log μ_θ(y_i | x', M…M),  x' = x with its prompt_mask positions set to M
    Old policy and reference must use the same prompt_mask. Departure: in the block layout the
    all-masked response is scored with the plain layout mask (block k sees x', masked blocks ≤ k).
    """
    x_masked = prompts.masked_fill(prompt_mask, model.config.mask_id)  # (B, P) x'
    all_masked = torch.full_like(responses, model.config.mask_id)  # (B, L) M…M
    logp = response_logps(model, x_masked, all_masked, temperature)  # (B, L, V)
    # Σ_i log μ_θ(y_i | x', M…M): every token predicted independently from the same all-masked state
    return logp.gather(-1, responses[..., None]).squeeze(-1).sum(1)  # (B,)
