"""Shared fixtures: tiny float64 models on the CPU (tests are numerical proofs, SPEC §6)."""

import pytest
import torch

from minidtrpo.model import MaskedDiffusionTransformer, ModelConfig


def tiny_model(layout="block", prompt_len=6, response_len=8, block_size=4, seed=0, dtype=torch.float64, **kw):
    """A small random model: 2 layers, width 32, vocabulary of 12 with MASK = 11."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=12, mask_id=11, prompt_len=prompt_len, response_len=response_len,
                      block_size=block_size, layout=layout, d_model=32, n_layers=2, n_heads=4, **kw)
    model = MaskedDiffusionTransformer(cfg, verbose=False).to(dtype)
    # spread the logits so that trajectories are not all ties (a fresh init predicts nearly uniform)
    with torch.no_grad():
        model.head.weight.mul_(20.0)
    return model


def random_prompts(batch, prompt_len=6, vocab=11, seed=0):
    return torch.randint(0, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(seed))


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
    """Run a module's tests on one intra-op thread: for these tiny models thread synchronisation costs far
    more than it saves, and on a busy 2-core machine two threads made a test 16× slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
