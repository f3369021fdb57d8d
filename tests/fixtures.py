"""Shared fixtures and helpers: tiny float64 models on the CPU (tests are numerical proofs,
docs/math.md §6). conftest.py re-exports them when torch is installed."""

import pytest
import torch
import torch.nn.functional as F

from minidtrpo.model import MaskedDiffusionTransformer, ModelConfig
from minidtrpo.sampling import generate

P, M = 6, 11  # prompt length and MASK id of tiny_model


def tiny_model(layout="block", prompt_len=6, response_len=8, block_size=4, seed=0,
               dtype=torch.float64, **kw):
    """A small random model: 2 layers, width 32, vocabulary of 12 with MASK = 11."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=12, mask_id=11, prompt_len=prompt_len,
                      response_len=response_len, block_size=block_size, layout=layout,
                      d_model=32, n_layers=2, n_heads=4, **kw)
    model = MaskedDiffusionTransformer(cfg, verbose=False).to(dtype)
    # spread the logits so that trajectories are not all ties (a fresh init predicts nearly
    # uniform)
    with torch.no_grad():
        model.head.weight.mul_(20.0)
    return model


def random_prompts(batch, prompt_len=6, vocab=11, seed=0):
    return torch.randint(0, vocab, (batch, prompt_len),
                         generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def block_model():
    return tiny_model("block")


@pytest.fixture
def full_model():
    return tiny_model("full")


def perturbed(model, scale=0.02, seed=1):
    """A copy of model with N(0, scale²) noise added to every parameter: a nearby policy."""
    import copy

    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return other


@pytest.fixture(scope="module")
def single_thread():
    """Run a module's tests on one intra-op thread: for these tiny models thread synchronisation
    costs far more than it saves, and on a busy 2-core machine two threads made a test 16×
    slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# Helpers of the estimator tests (test_estimators.py, test_elbo.py)


def rollout(model, steps_per_block=2, temperature=1.0, remasking="low_confidence", batch=4,
            seed=0, **decoding):
    return generate(model, random_prompts(batch, seed=seed), steps_per_block=steps_per_block,
                    temperature=temperature, remasking=remasking,
                    generator=torch.Generator().manual_seed(seed), **decoding)


def grads(value, model):
    return torch.autograd.grad(value, list(model.parameters()), allow_unused=True)


def assert_grads_close(g1, g2, atol=1e-10):
    for a, b in zip(g1, g2):
        if a is None or b is None:
            assert (a is None or a.abs().max() == 0) and (b is None or b.abs().max() == 0)
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=atol)


def naive_logmu(model, tokens, tau=1.0):
    """log μ_θ(· | tokens) at the response positions, from one plain pass with the layout's own
    mask."""
    return F.log_softmax(model(tokens[None])[0, P:] / tau, dim=-1)  # (L, V)
