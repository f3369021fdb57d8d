"""The toy masked-diffusion language model (docs/math.md §1): one file, read top to bottom.

A pre-norm bidirectional transformer over [prompt ; response] with RoPE and SDPA attention, no
time conditioning: the fraction of MASK tokens in the input tells the model how noisy the sequence
is, as in LLaDA (arXiv 2502.09992) and RADD. The output head predicts the clean token everywhere.

Two attention layouts (`ModelConfig.layout`):
- "block" (default, block diffusion / BD3-LM, arXiv 2503.09573): the prompt is block 0; a response
  position in block k sees the prompt and response blocks <= k (bidirectional inside a block,
  causal across blocks). Nothing looks at later blocks, so (a) dTRPO's [prompt ; clean ; re-masked]
  single pass is exact and (b) keys/values of finished blocks never change: the sampler caches them.
- "full" (LLaDA): every position sees every position.

Shapes: B batch, N sequence length, P prompt length, L response length, V vocab, H heads, D head
dim. Attention masks are boolean, True = "may attend", (N_query, N_key) or (B, N_query, N_key).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

LAYOUTS = ("block", "full")


@dataclass
class ModelConfig:
    # The data's shape comes from the caller (sft.model_config reads it off a task): no defaults.
    vocab_size: int  # V: every token id the data uses, MASK included
    mask_id: int  # id of the MASK token (its logit is forced to -inf)
    prompt_len: int  # P: fixed prompt length in tokens
    response_len: int  # L: fixed response length in tokens
    block_size: int = 4  # b: response tokens per semi-autoregressive block (L = N_B·b)
    layout: str = "block"  # "block" (block-causal, cacheable) or "full" (bidirectional everywhere)
    d_model: int = 128  # residual width
    n_layers: int = 4  # transformer blocks
    n_heads: int = 4  # attention heads (head dim = d_model / n_heads)
    mlp_ratio: int = 4  # MLP hidden width = mlp_ratio · d_model
    rope_base: float = 10000.0  # RoPE frequency base
    tie_embeddings: bool = True  # share the token embedding with the output head

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout={self.layout!r} is not one of {LAYOUTS}")
        if self.response_len % self.block_size:
            raise ValueError(f"response_len={self.response_len} "
                             f"is not a multiple of block_size={self.block_size}")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(f"d_model={self.d_model} "
                             f"must split into n_heads={self.n_heads} heads of even size")


# Attention masks. Block ids: prompt = 0, response block k = k + 1 (k = 0..N_B-1). ----------------
def block_ids(prompt_len: int, response_len: int, block_size: int, device=None) -> torch.Tensor:
    """Block id of every position of [prompt ; response]: 0 for the prompt, 1 + k for block k."""
    resp = torch.arange(response_len, device=device) // block_size + 1
    return torch.cat([torch.zeros(prompt_len, dtype=torch.long, device=device), resp])  # (P+L,)


def layout_mask(config: ModelConfig, device=None) -> torch.Tensor:
    """The layout's own (P+L, P+L) mask over [prompt ; response]."""
    n = config.prompt_len + config.response_len
    if config.layout == "full":
        return torch.ones(n, n, dtype=torch.bool, device=device)
    ids = block_ids(config.prompt_len, config.response_len, config.block_size, device)
    # query in block i may look at key in block j iff j <= i (the prompt, block 0, sees only itself)
    return ids[None, :] <= ids[:, None]  # (P+L, P+L)


def clean_noisy_mask(prompt_len: int, response_len: int, block_size: int,
                     device=None, copies: int = 1) -> torch.Tensor:
    """(P+(K+1)L, P+(K+1)L) mask over [prompt ; clean y ; noisy ỹ¹ … ỹᴷ] (BD3-LM's single-pass
    trick; K = `copies` noisy copies, 1 by default).

    prompt -> prompt;  clean block k -> prompt + clean blocks <= k;
    noisy block k of copy c -> prompt + clean blocks < k + noisy block k of copy c.
    Each noisy block sees what it sees in its true state, so one pass scores every block of every
    copy at once (exact in the block layout, docs/math.md §1, used in §4.2–§4.3).
    """
    ids = block_ids(prompt_len, response_len, block_size, device)  # (P+L,)
    resp = ids[prompt_len:]  # (L,) block ids 1..N_B of the response
    q = torch.cat([ids, resp.repeat(copies)])  # (P+(K+1)L,) block id of each query
    # 0 on the prompt and the clean copy, c = 1..K on noisy copy c
    copy = torch.cat([torch.zeros_like(ids),
                      torch.arange(1, copies + 1, device=device).repeat_interleave(response_len)])
    k, k_copy = q[None, :], copy[None, :]
    q, q_copy = q[:, None], copy[:, None]
    q_noisy, k_noisy = q_copy > 0, k_copy > 0
    clean_to_clean = ~q_noisy & ~k_noisy & (k <= q)
    noisy_to_clean = q_noisy & ~k_noisy & ((k < q) | (k == 0))
    noisy_to_self = q_noisy & (k_copy == q_copy) & (k == q)  # its own block in its own copy
    return clean_to_clean | noisy_to_clean | noisy_to_self  # (P+(K+1)L, P+(K+1)L)


# Modules ------------------------------------------------------------------------------------------
def rope_angles(positions: torch.Tensor, head_dim: int, base: float,
                dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of RoPE's angles at integer positions (B, N), each (B, 1, N, D), computed once
    per forward for all layers; θ_f = base^(−2f/D), f < D/2, used by both halves (rotate half)."""
    fdtype = torch.float64 if dtype == torch.float64 else torch.float32  # angles in at least fp32
    two_f = torch.arange(0, head_dim, 2, device=positions.device, dtype=fdtype)  # (D/2,) 2f
    inv_freq = base ** (-two_f / head_dim)  # (D/2,) θ_f
    angles = positions[:, None, :, None].to(fdtype) * inv_freq  # (B, 1, N, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (B, 1, N, D)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., N, D) with each pair (x_f, x_{f+D/2}) rotated: x·cos + rotate_half(x)·sin."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(self, x, rotation, attn_mask, past=None):
        qkv = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.n_heads)
        qk = rope(qkv[:2], *rotation)  # queries and keys rotated together: (2, B, H, N, D)
        q, k, v = qk[0], qk[1], qkv[2]
        new_kv = (k, v)  # keys/values of these N tokens, for a caller that caches them
        if past is not None:  # prepend cached keys/values of finished blocks
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)  # (B, H, S+N, D)
        if attn_mask.dim() == 3:
            attn_mask = attn_mask[:, None]  # (B, 1, N, S+N): same mask for every head
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, N, D)
        return self.proj(rearrange(y, "b h n d -> b n (h d)")), new_kv  # heads merged back


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(config.d_model), nn.LayerNorm(config.d_model)
        self.attn = Attention(config)
        hidden = config.mlp_ratio * config.d_model
        self.mlp = nn.Sequential(nn.Linear(config.d_model, hidden), nn.GELU(),
                                 nn.Linear(hidden, config.d_model))

    def forward(self, x, rotation, attn_mask, past=None):
        a, new_kv = self.attn(self.ln1(x), rotation, attn_mask, past)  # pre-norm residual branches
        x = x + a
        return x + self.mlp(self.ln2(x)), new_kv


class MaskedDiffusionTransformer(nn.Module):
    """p_θ(clean token | partially masked sequence) at every position (docs/math.md §1)."""

    def __init__(self, config: ModelConfig, verbose: bool = True):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList([TransformerBlock(config) for _ in range(config.n_layers)])
        self.ln_f = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: shrink residual projections with depth
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * config.n_layers))
        self.register_buffer("default_mask", layout_mask(config), persistent=False)
        is_mask = torch.arange(config.vocab_size) == config.mask_id  # (V,)
        self.register_buffer("is_mask_token", is_mask, persistent=False)
        if verbose:
            print(f"MaskedDiffusionTransformer: {self.num_params() / 1e6:.2f}M parameters, "
                  f"layout={config.layout}")

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, tokens, positions=None, attn_mask=None, past=None, return_kv=False):
        """tokens (B, N) -> logits (B, N, V).

        positions: (B, N) or (N,) integer position ids; default 0..N-1 (S..S+N-1 after S cached).
        attn_mask: (N, S+N) or (B, N, S+N) bool; default the layout's mask over [prompt ; response].
        past: optional list (one per layer) of cached (keys, values), each (B, H, S, D), that every
            query may look at as allowed by attn_mask's first S columns. return_kv=True also returns
            the new tokens' (keys, values) per layer so the caller can extend its cache.
        """
        B, N = tokens.shape
        S = 0 if past is None else past[0][0].shape[2]
        if positions is None:
            positions = torch.arange(S, S + N, device=tokens.device)
        if positions.dim() == 1:
            positions = positions.expand(B, N)
        if attn_mask is None:
            if S + N != self.default_mask.shape[0]:
                raise ValueError(f"no attn_mask given and length {S + N} != prompt_len + "
                                 f"response_len = {self.default_mask.shape[0]}; "
                                 "pass attn_mask explicitly")
            attn_mask = self.default_mask[S:]
        x = self.embed(tokens)  # (B, N, C)
        head_dim = x.shape[-1] // self.config.n_heads  # D
        rotation = rope_angles(positions, head_dim, self.config.rope_base, x.dtype)
        new_kvs = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, rotation, attn_mask, None if past is None else past[i])
            new_kvs.append(kv)
        logits = self.head(self.ln_f(x))  # (B, N, V)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()  # softmax and log-probs in float32 even under autocast
        # the MASK token is never a valid prediction: remove it before any softmax
        logits = logits.masked_fill(self.is_mask_token, float("-inf"))
        return (logits, new_kvs) if return_kv else logits
