"""LLaDA's semi-autoregressive sampler, recording the decoding trajectory (docs/math.md §3).

LLaDA, arXiv 2502.09992, Algorithm 5 (semi-autoregressive low-confidence remasking): blocks left to
right, T_B steps per block, step s revealing k_s tokens. The returned `Trajectory` records, for
every response token, the global step at which it was revealed and its log-probability then: all
the likelihood estimators need (state τ_t: every token with unmask_step >= t still masked).

Departures from the LLaDA reference code:
1. Candidates are drawn from μ_θ = softmax(logits / τ) by Gumbel-max in float64 with an explicit
   generator (τ = 0: argmax); LLaDA adds Gumbel noise to the logits in float64, the same thing.
2. Low-confidence remasking ranks positions by μ_θ(candidate) at temperature τ (τ = 1 when greedy).
3. Every sequence in the batch follows the same schedule k_s: no Python loop over the batch.

Shapes: B batch, P prompt length, L response length, b block size, V vocab, S cached key length.
"""

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

REMASKING = ("low_confidence", "random")


@dataclass
class Trajectory:
    tokens: torch.Tensor  # (B, P+L) prompt followed by the decoded response
    unmask_step: torch.Tensor  # (B, L) global step t (0..T-1) at which each token was revealed
    logp_at_reveal: torch.Tensor  # (B, L) log μ_θ(y_i | x, τ_t) when it was revealed
    prompt_len: int  # P
    block_size: int  # b
    steps_per_block: int  # T_B
    temperature: float  # τ of the rollout (0 = greedy)
    remasking: str  # "low_confidence" or "random"
    mask_id: int  # id of the MASK token

    @property
    def prompts(self) -> torch.Tensor:
        return self.tokens[:, : self.prompt_len]  # (B, P)

    @property
    def responses(self) -> torch.Tensor:
        return self.tokens[:, self.prompt_len :]  # (B, L)

    @property
    def num_blocks(self) -> int:
        return self.responses.shape[1] // self.block_size  # N_B

    @property
    def num_steps(self) -> int:
        return self.num_blocks * self.steps_per_block  # T = N_B · T_B

    @property
    def logp_temperature(self) -> float:
        """τ of μ_θ = softmax(logits / τ) in log-probs: the rollout's, 1 for a greedy rollout."""
        return self.temperature if self.temperature > 0 else 1.0

    def state(self, t) -> torch.Tensor:
        """Tokens (B, P+L) of τ_t, before step t (int or (B,) tensor): unmask_step >= t masked."""
        t = torch.as_tensor(t, device=self.tokens.device).reshape(-1, 1)  # (B or 1, 1)
        masked = self.unmask_step >= t  # (B, L)
        response = self.responses.masked_fill(masked, self.mask_id)
        return torch.cat([self.prompts, response], dim=1)  # (B, P+L)

    def index(self, idx) -> "Trajectory":
        """The sub-batch of trajectories idx (a slice, index list or bool mask)."""
        return Trajectory(**{k: v[idx] if isinstance(v, torch.Tensor) else v
                             for k, v in self.to_dict().items()})

    def to(self, device) -> "Trajectory":
        return Trajectory(**{k: v.to(device) if isinstance(v, torch.Tensor) else v
                             for k, v in self.to_dict().items()})

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def cat(cls, trajs) -> "Trajectory":
        """Concatenate trajectories decoded with the same settings along the batch."""
        first = trajs[0].to_dict()
        return cls(**{k: torch.cat([t.to_dict()[k] for t in trajs]) if isinstance(v, torch.Tensor)
                      else v for k, v in first.items()})


def reveal_schedule(block_size: int, steps_per_block: int) -> list[int]:
    """k_s tokens revealed at within-block step s: ⌊b/T_B⌋, +1 in the first (b mod T_B) steps."""
    if not 1 <= steps_per_block <= block_size:
        raise ValueError(f"steps_per_block={steps_per_block} must be in 1..block_size={block_size}")
    base, extra = divmod(block_size, steps_per_block)
    return [base + (s < extra) for s in range(steps_per_block)]


def sample_candidates(logp: torch.Tensor, temperature: float, generator=None) -> torch.Tensor:
    """A token per position from μ_θ, logp (..., V) its log-probs; argmax when temperature == 0."""
    if temperature == 0:
        return logp.argmax(dim=-1)
    # Gumbel-max, exact draw from μ: argmax_v (log μ(v) + G_v), G = −log(−log U); float64: no ties
    u = torch.rand(logp.shape, generator=generator, dtype=torch.float64,
                   device=generator.device if generator is not None else logp.device)
    return (logp.double() - torch.log(-torch.log(u.to(logp.device)))).argmax(dim=-1)


def sample_hints(answers, share, mask_id, generator, chunk=(2, 4)) -> torch.Tensor:
    """IGPO's hints (arXiv 2509.10396): each answer (n, L) cut left to right into chunks of
    chunk[0]..chunk[1] tokens, of which round(share_r · #chunks) chosen at random stay (share (n,));
    the rest becomes mask_id -> (n, L) for `generate(hints=...)`. IGPO's chunks are 5-10 tokens of
    a reasoning trace; here an answer has ~16 tokens, so they are shorter."""
    hints = torch.full_like(answers, mask_id)
    for r in range(len(answers)):  # a few rows of ~16 tokens: a loop reads best
        sizes = torch.randint(chunk[0], chunk[1] + 1, (answers.shape[1],), generator=generator)
        ends = sizes.cumsum(0)
        ends = ends[ends < answers.shape[1]].tolist() + [answers.shape[1]]  # chunk i: ends[i-1]..
        starts = [0] + ends[:-1]
        shown = torch.randperm(len(ends), generator=generator)[:round(float(share[r]) * len(ends))]
        for c in shown.tolist():
            hints[r, starts[c]:ends[c]] = answers[r, starts[c]:ends[c]]
    return hints


@torch.no_grad()
def generate(model, prompts, *, block_size=None, steps_per_block=None, temperature=0.0,
             remasking="low_confidence", generator=None, kv_cache=True, hints=None) -> Trajectory:
    """Decode a response for each prompt (B, P) and return its full `Trajectory`.

    block_size defaults to the model's; steps_per_block (T_B) to block_size (one token per step).
    kv_cache=True caches keys/values of the prompt and finished blocks: exact, and used, only in
    the block layout, where nothing attends to later blocks; the full layout recomputes all.
    generator: a torch.Generator for the candidate draws and random remasking (None: global RNG).
    hints: (B, L) response tokens fixed before decoding starts, mask_id where free (inpainting,
    IGPO arXiv 2509.10396): they sit in every state, are recorded with unmask_step −1 and
    logp_at_reveal 0 (no estimator scores them), and a block with hints runs out of masked
    positions before its last step: the free positions keep the schedule k_s until none is left.
    """
    cfg = model.config
    block_size = block_size or cfg.block_size
    steps_per_block = steps_per_block or block_size
    if remasking not in REMASKING:
        raise ValueError(f"remasking={remasking!r} is not one of {REMASKING}")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0")
    if cfg.layout == "block" and block_size != cfg.block_size:
        raise ValueError(f"block layout: block_size={block_size} "
                         f"must equal the model's {cfg.block_size}")
    B, P = prompts.shape
    L = cfg.response_len
    if P != cfg.prompt_len:
        raise ValueError(f"prompts have length {P}, the model expects prompt_len={cfg.prompt_len}")
    schedule = reveal_schedule(block_size, steps_per_block)
    tau = temperature if temperature > 0 else 1.0  # log-probs recorded at the rollout temperature
    device = prompts.device
    gen_device = generator.device if generator is not None else device
    use_cache = kv_cache and cfg.layout == "block"

    x = torch.cat([prompts, prompts.new_full((B, L), cfg.mask_id)], dim=1)  # (B, P+L)
    unmask_step = torch.full((B, L), -1, dtype=torch.long, device=device)
    if hints is not None:  # inpainting: the hinted tokens are there from the start (step −1)
        x[:, P:] = hints
    logp_at_reveal = torch.zeros(B, L, device=device, dtype=model.embed.weight.dtype)
    if use_cache:  # the prompt (block 0) only sees itself: its keys/values are final from the start
        _, past = model(prompts, attn_mask=prompts.new_ones(P, P, dtype=torch.bool), return_kv=True)

    for blk in range(L // block_size):
        lo, hi = P + blk * block_size, P + (blk + 1) * block_size  # the block's columns in x
        positions = torch.arange(lo, hi, device=device)
        for s, k in enumerate(schedule):
            t = blk * steps_per_block + s  # global step index
            if use_cache:  # the block sees the cached prompt + finished blocks, and itself
                see_all = torch.ones(block_size, hi, dtype=torch.bool, device=device)  # (b, lo+b)
                logits = model(x[:, lo:hi], positions, see_all, past)  # (B, b, V)
            else:  # recompute the whole sequence; keep this block's logits
                logits = model(x)[:, lo:hi]  # (B, b, V)
            logp = F.log_softmax(logits / tau, dim=-1)  # (B, b, V)
            cand = sample_candidates(logp, temperature, generator)  # (B, b)
            cand_logp = logp.gather(-1, cand[..., None]).squeeze(-1)  # (B, b) log μ_θ(candidate)
            still_masked = x[:, lo:hi] == cfg.mask_id  # (B, b)
            if remasking == "low_confidence":  # reveal the k most probable candidates
                score = cand_logp.clone()
            else:  # reveal k positions uniformly at random among the masked ones
                score = torch.rand(B, block_size, generator=generator, device=gen_device).to(device)
            score = score.masked_fill(~still_masked, float("-inf"))  # revealed tokens stay
            chosen = score.topk(k, dim=-1).indices  # (B, k)
            # & still_masked: a hinted block may have fewer than k masked positions left
            reveal = torch.zeros_like(still_masked).scatter_(1, chosen, True) & still_masked
            x[:, lo:hi] = torch.where(reveal, cand, x[:, lo:hi])
            r = slice(lo - P, hi - P)  # the block's columns in the response
            unmask_step[:, r] = torch.where(reveal, t, unmask_step[:, r])
            logp_at_reveal[:, r] = torch.where(reveal, cand_logp, logp_at_reveal[:, r])
        if use_cache:  # the finished block's keys/values are final now: append them to the cache
            _, kv = model(x[:, lo:hi], positions, see_all, past, return_kv=True)
            past = [(torch.cat([pk, k], 2), torch.cat([pv, v], 2))
                    for (pk, pv), (k, v) in zip(past, kv)]

    return Trajectory(tokens=x, unmask_step=unmask_step, logp_at_reveal=logp_at_reveal,
                      prompt_len=P, block_size=block_size, steps_per_block=steps_per_block,
                      temperature=float(temperature), remasking=remasking, mask_id=cfg.mask_id)
