"""Methods: how a formulation's problem is solved (one module each, chosen by ``configs/method/``).

``constrained``: dual ascent on the multipliers (the paper's constrained method); ``fixed``: fixed
equal weights on the Lagrangian; ``esd``: ESD-style distillation of a fixed target; ``baseline``:
the paper's weight-based baseline of each formulation (``Formulation.paper_baseline``).
"""
from .base import METHODS, Method, build_method, method_class  # noqa: F401
from .base import import_methods as _import_methods  # noqa: E402

_import_methods()  # every module of the package registers its method
