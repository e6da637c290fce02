"""The families shipped with the package (importing a module registers its family)."""
from . import classcond, ddpm, digits, gmm, text2img  # noqa: F401
