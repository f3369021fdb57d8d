"""Shared fixtures: tiny float64 models on the CPU (tests are numerical proofs, docs/math.md
§6), defined in fixtures.py. Without torch or einops in the running Python only
test_environment.py is collected, and it fails with one line naming the install command."""

import importlib.util
import os

MISSING = [name for name in ("torch", "einops") if importlib.util.find_spec(name) is None]
if MISSING:
    collect_ignore = [f for f in os.listdir(os.path.dirname(__file__))
                      if f.startswith("test_") and f != "test_environment.py"]
else:
    from fixtures import (M, P, assert_grads_close, block_model, full_model,  # noqa: F401
                          grads, naive_logmu, perturbed, random_prompts, rollout, single_thread,
                          tiny_model)
