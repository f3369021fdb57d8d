"""The model's layouts and masks (docs/math.md §1)."""

import pytest
import torch

from conftest import random_prompts, tiny_model
from minidtrpo.model import ModelConfig, clean_noisy_mask, layout_mask


@pytest.mark.parametrize("layout", ["block", "full"])
def test_shapes_and_mask_token(layout):
    model = tiny_model(layout)
    tokens = torch.randint(0, 12, (3, 14))
    logits = model(tokens)
    assert logits.shape == (3, 14, 12) and logits.dtype == torch.float64
    assert torch.isneginf(logits[..., 11]).all()  # MASK is never predicted
    assert torch.isfinite(logits[..., :11]).all()


def test_block_layout_is_causal_across_blocks():
    """Changing a token in a later block never changes earlier logits (block); it does in the
    full layout."""
    tokens = torch.randint(0, 11, (2, 14), generator=torch.Generator().manual_seed(1))
    changed = tokens.clone()
    # a token of response block 1 (positions 10..13)
    changed[:, 6 + 5] = (changed[:, 6 + 5] + 1) % 11
    block, full = tiny_model("block"), tiny_model("full")
    diff_block = (block(tokens) - block(changed))[..., :11].abs().amax(dim=(0, 2))  # (N,)
    diff_full = (full(tokens) - full(changed))[..., :11].abs().amax(dim=(0, 2))
    assert diff_block[:10].max() == 0  # prompt and block 0 untouched, exactly
    assert diff_block[10:].max() > 1e-6  # the changed block itself does react
    assert diff_full[:10].min() > 1e-9  # everything reacts in the full layout


def test_layout_mask_by_hand():
    cfg = ModelConfig(vocab_size=8, mask_id=7, prompt_len=2, response_len=4, block_size=2)
    m = layout_mask(cfg).int().tolist()
    assert m == [[1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0],
                 [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]


def test_clean_noisy_mask_by_hand():
    """[x ; y ; ỹ] with P = 1, L = 4, b = 2: rows are queries, columns keys."""
    m = clean_noisy_mask(1, 4, 2).int().tolist()
    #            x  y0 y1 y2 y3 ỹ0 ỹ1 ỹ2 ỹ3
    assert m == [[1, 0, 0, 0, 0, 0, 0, 0, 0],   # x
                 [1, 1, 1, 0, 0, 0, 0, 0, 0],   # y0  clean block 0 -> x + clean block 0
                 [1, 1, 1, 0, 0, 0, 0, 0, 0],   # y1
                 [1, 1, 1, 1, 1, 0, 0, 0, 0],   # y2  clean block 1 -> x + clean blocks 0, 1
                 [1, 1, 1, 1, 1, 0, 0, 0, 0],   # y3
                 [1, 0, 0, 0, 0, 1, 1, 0, 0],   # ỹ0  noisy block 0 -> x + itself
                 [1, 0, 0, 0, 0, 1, 1, 0, 0],   # ỹ1
                 [1, 1, 1, 0, 0, 0, 0, 1, 1],   # ỹ2  noisy block 1 -> x + clean block 0 + itself
                 [1, 1, 1, 0, 0, 0, 0, 1, 1]]   # ỹ3


def test_explicit_positions_and_mask_reproduce_default():
    model = tiny_model("block")
    tokens = random_prompts(2, 14)
    explicit = model(tokens, positions=torch.arange(14), attn_mask=layout_mask(model.config))
    assert torch.equal(explicit, model(tokens))


def test_bad_config_raises():
    with pytest.raises(ValueError, match="layout"):
        ModelConfig(vocab_size=8, mask_id=7, prompt_len=2, response_len=4, layout="causal")
    with pytest.raises(ValueError, match="multiple"):
        ModelConfig(vocab_size=8, mask_id=7, prompt_len=2, response_len=10, block_size=4)


def test_sft_loss_block_layout_matches_naive():
    """The block-layout SFT loss, written out independently: each noisy block k is scored in a
    plain pass over [x ; clean blocks < k ; noisy block k] (the true sampler state), and the loss
    is the 1/t-weighted masked negative log-likelihood. sft_loss's single pass (last clean block
    dropped) must agree."""
    from minidtrpo.sft import sft_loss
    model = tiny_model("block")
    P, L, b = 6, 8, 4
    prompts, answers = (random_prompts(3),
                        torch.randint(0, 11, (3, L), generator=torch.Generator().manual_seed(7)))
    loss, _ = sft_loss(model, prompts, answers, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)  # replay sft_loss's draws: t, then the mask
    t = 1e-3 + (1 - 1e-3) * torch.rand(3, 1, generator=g)
    masked = torch.rand(3, L, generator=g) < t
    noisy = answers.masked_fill(masked, 11)
    total = 0.0
    for i in range(3):
        for k in range(L // b):
            seq = torch.cat([prompts[i], answers[i, :k * b], noisy[i, k * b:(k + 1) * b]])[None]
            n = seq.shape[1]
            # block ids: the true state
            ids = torch.tensor([0] * P + [1 + j // b for j in range((k + 1) * b)])
            logp = torch.log_softmax(
                model(seq, torch.arange(n), ids[None, :] <= ids[:, None])[0, -b:], -1)
            for j in range(b):
                if masked[i, k * b + j]:
                    total -= logp[j, answers[i, k * b + j]] / t[i, 0]
    torch.testing.assert_close(loss, total / 3 / L, rtol=1e-10, atol=1e-12)


def test_sft_at_t_one_is_the_autoregressive_likelihood():
    """Block layout, block size 1, t_min = 1 (every response token masked, weight 1): the loss is
    the negative log-likelihood per token of decoding y left to right, one token per step, which
    estimators.trajectory_logprob computes exactly (docs/math.md §2)."""
    from minidtrpo.estimators import trajectory_logprob
    from minidtrpo.sampling import Trajectory
    from minidtrpo.sft import sft_loss
    model = tiny_model("block", block_size=1)
    L = 8
    prompts = random_prompts(3)
    answers = torch.randint(0, 11, (3, L), generator=torch.Generator().manual_seed(7))
    loss, _ = sft_loss(model, prompts, answers, torch.Generator().manual_seed(1), t_min=1.0)
    left_to_right = Trajectory(tokens=torch.cat([prompts, answers], 1),
                               unmask_step=torch.arange(L).expand(3, L),
                               logp_at_reveal=torch.zeros(3, L, dtype=torch.float64),
                               prompt_len=6, block_size=1, steps_per_block=1, temperature=1.0,
                               remasking="low_confidence", mask_id=11)
    logp = trajectory_logprob(model, left_to_right)  # (3,) Σ_k log μ(y_k | x, y_<k)
    torch.testing.assert_close(loss, -logp.mean() / L, rtol=1e-10, atol=1e-12)
    # any other draw of t is the same loss only in expectation
    other, _ = sft_loss(model, prompts, answers, torch.Generator().manual_seed(1))
    assert not torch.isclose(other, loss)
