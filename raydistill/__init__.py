"""raydistill: diffusion-based dataset distillation (IGD, MGD3, Minimax) on Ray.

The core (``data``, ``models``, ``diffusion``, ``guidance``, ``evaluate``, ``outputs``, ``distill``) is plain
torch; only ``raydistill.orchestration`` imports Ray and MLflow.
"""

__version__ = "0.1.0"
