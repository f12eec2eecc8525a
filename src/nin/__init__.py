"""nin: Network in Network (Lin, Chen & Yan, 2013), as the d2l chapter builds it."""

from nin.errors import NinError
from nin.models import NiN, create_model, list_models, nin_block

__all__ = ["NiN", "NinError", "create_model", "list_models", "nin_block"]
__version__ = "0.1.0"
