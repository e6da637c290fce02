"""Model families (``model.family``): one module each, registered by name."""
from .base import FAMILIES, NEEDS, Family, build_setup, family_class, register_family

__all__ = ["FAMILIES", "NEEDS", "Family", "build_setup", "family_class", "register_family"]
