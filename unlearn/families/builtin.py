"""The families shipped with the package: every module of :mod:`unlearn.families` is imported
(importing a module registers its family), so a new family is one module and its model config."""
import importlib
import pkgutil

from .. import families as _pkg

for _m in pkgutil.iter_modules(_pkg.__path__):
    if _m.name not in ("base", "builtin"):
        importlib.import_module(f"{_pkg.__name__}.{_m.name}")
