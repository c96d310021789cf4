"""prunext: depth pruning and depth extension of LLMs with weight-shared blocks.

Importing the package registers the native model with transformers, so a
native folder loads with ``AutoModelForCausalLM.from_pretrained(folder)``.
"""

__version__ = "0.1.0"

from prunext.core.model import PrunextConfig, PrunextForCausalLM, register
from prunext.core.plan import Plan, Position

register()

__all__ = ["Plan", "Position", "PrunextConfig", "PrunextForCausalLM", "register"]
