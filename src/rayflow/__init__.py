"""rayflow: few-step generators distilled from pretrained diffusion models.

Time convention at every public boundary (as in diffusers): integer timesteps ``0 .. T-1``, large ``t`` means
noise, and ``t = -1`` denotes clean data (``alpha_bar = 1``), as diffusers' ``prev_timestep = -1`` does.
Float timesteps are accepted wherever a tensor of timesteps is (they interpolate the schedule).
"""

from rayflow.errors import RayflowError
from rayflow.schedules import VPSchedule

__version__ = "0.1.0"

__all__ = ["RayflowError", "VPSchedule", "__version__"]
