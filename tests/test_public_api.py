"""Every public name (in a module's ``__all__``) is documented with an ``Example:`` that runs (as a doctest)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import lightning_txopt


def _public() -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = []
    for info in pkgutil.walk_packages(lightning_txopt.__path__, "lightning_txopt."):
        module = importlib.import_module(info.name)
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name, None)
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and obj.__module__ == module.__name__:
                out.append((f"{module.__name__}.{name}", obj))
    return out


def test_every_public_class_and_function_has_an_example():
    public = _public()
    assert len(public) > 100  # the walk found the package
    missing = [name for name, obj in public if "Example:" not in (obj.__doc__ or "")]
    assert not missing, f"public names without an Example: {missing}"


def test_the_top_level_exports_exist():
    for name in lightning_txopt.__all__:
        assert hasattr(lightning_txopt, name), name
