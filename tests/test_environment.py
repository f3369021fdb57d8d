"""The environment the tests need, checked first: without it, one clear failure here instead of an
import error in every test module (conftest.py then collects this file only)."""

import importlib.util
import sys


def test_torch_and_einops_are_installed():
    missing = [name for name in ("torch", "einops") if importlib.util.find_spec(name) is None]
    assert not missing, (
        f"{', '.join(missing)} not installed in this Python ({sys.executable}); run the "
        "quick start's first command (pip install torch==2.13.0 && pip install -r "
        "requirements.txt -e .) in the environment that runs pytest")
