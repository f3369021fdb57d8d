"""minidtrpo: reinforcement learning for a toy masked-diffusion language model.

dTRPO (arXiv 2603.18806), BGPO (arXiv 2510.11683), the exact full-trajectory objective and the
baselines (d1, arXiv 2504.12216; VRPO, arXiv 2505.19223) on a tiny LLaDA-style model (arXiv
2502.09992). The mathematics: docs/math.md.
"""

from .model import MaskedDiffusionTransformer, ModelConfig
from .sampling import Trajectory, generate
from .tasks import get_task
from .train import load

__all__ = ["MaskedDiffusionTransformer", "ModelConfig", "Trajectory", "generate", "get_task",
           "load"]
