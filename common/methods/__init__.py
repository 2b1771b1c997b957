"""The federated methods, one module per method (or family), each registering itself with ``@register_method``.

Every module of this package is imported here, so a fifth method is one new module (see base.py for what it
states) and its tests; nothing else in the app names a method.
"""

import importlib
import pkgutil

from common.methods.base import METHODS, Adapter, CrossTask, Method, RoundUpdate, register_method

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "Adapter", "CrossTask", "Method", "RoundUpdate", "register_method"]
