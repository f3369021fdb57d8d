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

Other decoding rules of the works this project follows (docs/math.md §3, "Decoding rules"); each
records the same `Trajectory`, so every estimator works unchanged:
- schedule="ascending" (CJ-GRPO, arXiv 2509.23924, as its code does it): S = ⌊log₂ b⌋ steps per
  block instead of b, step s revealing 2^s tokens and the last what is left (b = 2^S: 1, 2, ...,
  2^(S−1) + 1).
- eos_factor (CJ-GRPO's EOS early rejection): an EOS candidate's confidence is scaled by a factor
  ramping linearly from eos_factor at the first step to 1 at the last, so EOS is revealed late.
- remasking="threshold" (confidence-threshold parallel decoding): every masked position of the
  block whose candidate has μ_θ ≥ threshold is revealed, and at least the most confident one.
- remasking="credit" (CreditDecoding, arXiv 2510.06133): as "threshold", on a confidence raised by
  trace credit, each position's decayed sum of its past top-1 probabilities (`trace_credit`).
  Departure 4: the token is still drawn from μ_θ; the credit only decides which positions are
  revealed (CreditDecoding also takes the fused distribution's argmax as the token). The record's
  log-probs then stay those of the model, which every estimator needs.
The last two reveal a different number of tokens per sequence: a block runs until every sequence
has filled it (at most b steps), and the steps are renumbered so that T_B is the most any block
took.

Shapes: B batch, P prompt length, L response length, b block size, V vocab, S cached key length.
"""

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

REMASKING = ("low_confidence", "random", "threshold", "credit")
PARALLEL = ("threshold", "credit")  # rules that choose how many tokens a step reveals
SCHEDULES = ("uniform", "ascending")
CREDIT = (0.65, 0.7, 0.5)  # trace credit's decay γ, fusion λ, exponent α: CreditDecoding's values


@dataclass
class Trajectory:
    tokens: torch.Tensor  # (B, P+L) prompt followed by the decoded response
    unmask_step: torch.Tensor  # (B, L) global step t (0..T-1) at which each token was revealed
    logp_at_reveal: torch.Tensor  # (B, L) log μ_θ(y_i | x, τ_t) when it was revealed
    prompt_len: int  # P
    block_size: int  # b
    steps_per_block: int  # T_B
    temperature: float  # τ of the rollout (0 = greedy)
    remasking: str  # the position rule, one of REMASKING
    mask_id: int  # id of the MASK token
    eos_factor: float = 1.0  # EOS early rejection's first factor (1: off)

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

    def renumber(self, steps_per_block: int) -> "Trajectory":
        """Give the trajectory T_B = steps_per_block (at least the most steps any of its blocks
        took), in place: step s of block k becomes step k·T_B + s. The parallel rules end blocks
        early, so batches decoded apart may have taken different T_B. Returns self."""
        us, old = self.unmask_step, self.steps_per_block
        if ((us % old)[us >= 0] >= steps_per_block).any():
            raise ValueError(f"steps_per_block={steps_per_block}: a block took more steps")
        self.unmask_step = torch.where(us >= 0, us // old * steps_per_block + us % old, us)
        self.steps_per_block = steps_per_block
        return self

    @classmethod
    def cat(cls, trajs) -> "Trajectory":
        """Concatenate trajectories decoded with the same settings along the batch (renumbered to
        the largest T_B among them)."""
        T_B = max(t.steps_per_block for t in trajs)
        trajs = [cls(**t.to_dict()).renumber(T_B) for t in trajs]  # copies: trajs stay as they are
        first = trajs[0].to_dict()
        return cls(**{k: torch.cat([t.to_dict()[k] for t in trajs]) if isinstance(v, torch.Tensor)
                      else v for k, v in first.items()})


def reveal_schedule(block_size: int, steps_per_block=None, schedule="uniform") -> list[int]:
    """k_s tokens revealed at within-block step s. uniform: ⌊b/T_B⌋, +1 in the first (b mod T_B)
    steps (T_B None: b, one token per step); ascending: S = ⌊log₂ b⌋ steps (at least 1), 2^s
    tokens at step s < S − 1 and the rest, b − 2^(S−1) + 1, at the last (T_B follows from b)."""
    if schedule == "ascending":
        if steps_per_block is not None:
            raise ValueError("the ascending schedule sets its own steps per block: "
                             f"steps_per_block={steps_per_block} must be left unset")
        S = max(block_size.bit_length() - 1, 1)  # ⌊log₂ b⌋ steps, as CJ-GRPO's code
        # 1, 2, ..., 2^(S−2), then what is left: b = 8 -> 1, 2, 5
        return [2 ** s for s in range(S - 1)] + [block_size - (2 ** (S - 1) - 1)]
    if schedule != "uniform":
        raise ValueError(f"schedule={schedule!r} is not one of {SCHEDULES}")
    steps_per_block = steps_per_block or block_size
    if not 1 <= steps_per_block <= block_size:
        raise ValueError(f"steps_per_block={steps_per_block} must be in 1..block_size={block_size}")
    base, extra = divmod(block_size, steps_per_block)
    return [base + (s < extra) for s in range(steps_per_block)]


def trace_credit(credit, logp, decay, exponent):
    """One step of CreditDecoding's trace credit: credit (B, b, V) decays by γ and each position's
    current top-1 token gains its probability to the power α:
    C_v ← γ·C_v + [v = argmax μ] · μ_v^α."""
    top_logp, top = logp.max(-1, keepdim=True)  # (B, b, 1)
    return (decay * credit).scatter_add(-1, top, (exponent * top_logp).exp())


def sample_candidates(logp: torch.Tensor, temperature: float, generator=None) -> torch.Tensor:
    """A token per position from μ_θ, logp (..., V) its log-probs; argmax when temperature == 0."""
    if temperature == 0:
        return logp.argmax(dim=-1)
    # Gumbel-max, exact draw from μ: argmax_v (log μ(v) + G_v), G = −log(−log U); float64: no ties
    u = torch.rand(logp.shape, generator=generator, dtype=torch.float64,
                   device=generator.device if generator is not None else logp.device)
    return (logp.double() - torch.log(-torch.log(u.to(logp.device)))).argmax(dim=-1)


@torch.no_grad()
def generate(model, prompts, *, block_size=None, steps_per_block=None, temperature=0.0,
             remasking="low_confidence", schedule="uniform", threshold=0.9, eos_factor=1.0,
             eos_id=None, credit=CREDIT, generator=None, kv_cache=True, hints=None) -> Trajectory:
    """Decode a response for each prompt (B, P) and return its full `Trajectory`.

    The loop is LLaDA's: for each block, for each step s, predict every masked position, draw a
    candidate token for each, and reveal the k_s candidates with the highest confidence μ_θ.
    Options (the module docstring describes each rule):
    block_size: the model's by default; steps_per_block (T_B): block_size by default (one token
    per step); schedule: k_s of the fixed-count rules (SCHEDULES); remasking: the position rule
    (REMASKING), with `threshold` for the parallel rules and `credit` = trace credit's (γ, λ, α);
    eos_factor < 1 with eos_id: EOS early rejection; generator: a torch.Generator for the
    candidate draws and random remasking (None: global RNG).
    kv_cache=True caches keys/values of the prompt and finished blocks: exact, and used, only in
    the block layout, where nothing attends to later blocks; the full layout recomputes all.
    hints: (B, L) response tokens fixed before decoding starts, mask_id where free (inpainting,
    IGPO arXiv 2509.10396): they sit in every state, are recorded with unmask_step −1 and
    logp_at_reveal 0 (no estimator scores them), and a block with hints runs out of masked
    positions before its last step: the free positions keep the schedule k_s until none is left.
    """
    cfg = model.config
    b = block_size or cfg.block_size
    _check_options(cfg, prompts, b, temperature, remasking, threshold, eos_factor, eos_id)
    ks = step_counts(b, steps_per_block, schedule, remasking)  # k_s, or None: the rule decides
    B, P = prompts.shape
    L, T_B, mask = cfg.response_len, len(ks), cfg.mask_id
    tau = temperature if temperature > 0 else 1.0  # log-probs recorded at the rollout temperature
    x = torch.cat([prompts, prompts.new_full((B, L), mask)], dim=1)  # (B, P+L)
    if hints is not None:  # inpainting: the hinted tokens are there from the start (step −1)
        x[:, P:] = hints
    unmask_step = torch.full((B, L), -1, dtype=torch.long, device=x.device)  # (B, L)
    logp_at_reveal = torch.zeros(B, L, device=x.device, dtype=model.embed.weight.dtype)
    blocks = BlockForward(model, prompts, kv_cache and cfg.layout == "block")

    for blk in range(L // b):
        lo, hi = P + blk * b, P + (blk + 1) * b  # the block's columns in x
        r = slice(lo - P, hi - P)  # and in the response
        credit_sum = 0.0  # trace credit of the block's positions (remasking="credit")
        for s, k in enumerate(ks):
            still_masked = x[:, lo:hi] == mask  # (B, b)
            if not still_masked.any():  # parallel rules and hinted blocks can end a block early
                break
            t = blk * T_B + s  # global step index
            logp = F.log_softmax(blocks.logits(x, lo, hi) / tau, dim=-1)  # (B, b, V)
            cand = sample_candidates(logp, temperature, generator)  # (B, b)
            cand_logp = logp.gather(-1, cand[..., None]).squeeze(-1)  # (B, b) log μ_θ(candidate)
            # the position rule's score: confidence log μ_θ(candidate), or a variation of it
            if remasking == "random":  # reveal k positions uniformly at random among the masked
                score = random_scores(B, b, generator, x.device)
            elif remasking == "credit":
                score, credit_sum = credit_scores(cand_logp, logp, cand, credit_sum, credit)
            else:
                score = cand_logp.clone()
            if eos_factor < 1 and remasking != "random":
                score = eos_rejection(score, cand, eos_id, eos_factor, t, (L // b) * T_B)
            score = score.masked_fill(~still_masked, float("-inf"))  # revealed tokens stay
            if k is None:  # threshold, credit: every confident position, at least the best one
                reveal = confident_positions(score, threshold)
            else:  # the k best positions
                reveal = torch.zeros_like(still_masked).scatter_(1, score.topk(k, -1).indices, True)
            # & still_masked: a finished or hinted block may have fewer than k masked positions
            reveal &= still_masked
            x[:, lo:hi] = torch.where(reveal, cand, x[:, lo:hi])
            unmask_step[:, r] = torch.where(reveal, t, unmask_step[:, r])
            logp_at_reveal[:, r] = torch.where(reveal, cand_logp, logp_at_reveal[:, r])
        blocks.finish(x, lo, hi)

    traj = Trajectory(tokens=x, unmask_step=unmask_step, logp_at_reveal=logp_at_reveal,
                      prompt_len=P, block_size=b, steps_per_block=T_B,
                      temperature=float(temperature), remasking=remasking, mask_id=mask,
                      eos_factor=float(eos_factor))
    if remasking in PARALLEL:  # T_B becomes the most steps any block took
        done = unmask_step >= 0
        traj.renumber(int((unmask_step % T_B)[done].max()) + 1 if done.any() else 1)
    return traj


# --------------------------------------------------------------------------------------------------
# generate's parts: each variation of LLaDA's loop is one of these


def _check_options(cfg, prompts, block_size, temperature, remasking, threshold, eos_factor,
                   eos_id):
    """ValueError naming the option for options `generate` cannot decode with."""
    if remasking not in REMASKING:
        raise ValueError(f"remasking={remasking!r} is not one of {REMASKING}")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0")
    if not 0 < threshold <= 1 or not 0 < eos_factor <= 1:
        raise ValueError(f"threshold={threshold} and eos_factor={eos_factor} must be in (0, 1]")
    if eos_factor < 1 and eos_id is None:
        raise ValueError("eos_factor < 1 needs eos_id, the task's EOS token")
    if cfg.layout == "block" and block_size != cfg.block_size:
        raise ValueError(f"block layout: block_size={block_size} "
                         f"must equal the model's {cfg.block_size}")
    if prompts.shape[1] != cfg.prompt_len:
        raise ValueError(f"prompts have length {prompts.shape[1]}, the model expects "
                         f"prompt_len={cfg.prompt_len}")


def step_counts(block_size, steps_per_block, schedule, remasking) -> list:
    """k_s of each within-block step: the schedule's (reveal_schedule), or b steps of None for
    the parallel rules, which decide at each step how many positions to reveal."""
    if remasking not in PARALLEL:
        return reveal_schedule(block_size, steps_per_block, schedule)
    if steps_per_block is not None or schedule != "uniform":
        raise ValueError(f"remasking={remasking!r} chooses how many tokens each step reveals: "
                         "leave steps_per_block and schedule unset")
    return [None] * block_size


class BlockForward:
    """The model's logits at one block's positions, given the whole sequence x (B, P+L).
    With the cache (block layout only): keys and values of the prompt and of finished blocks are
    computed once, since nothing in them attends to later blocks; the block sees them and itself.
    Without: the whole sequence is recomputed at every step."""

    def __init__(self, model, prompts, use_cache):
        self.model, self.past = model, None
        if use_cache:  # the prompt (block 0) only sees itself: its keys/values are final now
            P = prompts.shape[1]
            _, self.past = model(prompts, attn_mask=prompts.new_ones(P, P, dtype=torch.bool),
                                 return_kv=True)

    def _inputs(self, x, lo, hi):
        positions = torch.arange(lo, hi, device=x.device)
        return x[:, lo:hi], positions, torch.ones(hi - lo, hi, dtype=torch.bool, device=x.device)

    def logits(self, x, lo, hi):
        if self.past is None:
            return self.model(x)[:, lo:hi]  # (B, b, V)
        return self.model(*self._inputs(x, lo, hi), self.past)  # (B, b, V)

    def finish(self, x, lo, hi):
        """The block is decoded: append its keys/values, now final, to the cache."""
        if self.past is not None:
            _, kv = self.model(*self._inputs(x, lo, hi), self.past, return_kv=True)
            self.past = [(torch.cat([pk, k], 2), torch.cat([pv, v], 2))
                         for (pk, pv), (k, v) in zip(self.past, kv)]


def random_scores(B, b, generator, device):
    """remasking="random": i.i.d. uniform scores, so the top k are a uniform k-subset."""
    gen_device = generator.device if generator is not None else device
    return torch.rand(B, b, generator=generator, device=gen_device).to(device)  # (B, b)


def credit_scores(cand_logp, logp, cand, credit_sum, credit):
    """remasking="credit" (CreditDecoding): the confidence raised to the candidate's probability
    under the fused distribution log μ_v + λ log(1 + C_v), renormalised -> (score, credit_sum)."""
    decay, fusion, exponent = credit
    credit_sum = trace_credit(credit_sum + torch.zeros_like(logp), logp, decay, exponent)
    fused = F.log_softmax(logp + fusion * credit_sum.log1p(), dim=-1)  # (B, b, V)
    return torch.maximum(cand_logp, fused.gather(-1, cand[..., None]).squeeze(-1)), credit_sum


def eos_rejection(score, cand, eos_id, eos_factor, t, num_steps):
    """CJ-GRPO's EOS early rejection: an EOS candidate's confidence × γ_t, γ_t ramping linearly
    from eos_factor at the first step to 1 at the last (log space: + log γ_t)."""
    gamma = eos_factor + (1 - eos_factor) * t / max(num_steps - 1, 1)
    return torch.where(cand == eos_id, score + math.log(gamma), score)


def confident_positions(score, threshold):
    """The parallel rules: every position whose score clears log(threshold), and the best one."""
    best = F.one_hot(score.argmax(-1), score.shape[-1]).bool()  # (B, b)
    return (score >= math.log(threshold)) | best
