"""The trajectory-recording sampler (docs/math.md §3) and its KV cache (P9)."""

import pytest
import torch
import torch.nn.functional as F

from conftest import random_prompts, tiny_model
from minidtrpo.sampling import generate, reveal_schedule


def test_reveal_schedule():
    assert reveal_schedule(8, 8) == [1] * 8
    assert reveal_schedule(8, 3) == [3, 3, 2]
    assert reveal_schedule(4, 1) == [4]
    with pytest.raises(ValueError, match="steps_per_block"):
        reveal_schedule(4, 5)


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
    from minidtrpo.sampling import sample_hints
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
