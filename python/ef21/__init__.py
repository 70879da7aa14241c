"""ef21: EF21 error feedback as a drop-in communication hook for DistributedDataParallel."""

import torch  # noqa: F401  (loads libtorch before the extension)

from ef21 import _C  # noqa: F401
from ef21.config import Config, k_for
from ef21.hook import hook, register
from ef21.state import EF21State

__all__ = ["Config", "EF21State", "hook", "k_for", "register"]
__version__ = "0.1.0"
