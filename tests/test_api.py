"""The public surface: every name exported, documented, and nothing private leaking."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import atempstore


def test_all_names_exist_and_are_sorted_once() -> None:
    assert isinstance(atempstore.__all__, tuple)
    assert len(set(atempstore.__all__)) == len(atempstore.__all__)
    for name in atempstore.__all__:
        assert hasattr(atempstore, name), name


def test_every_public_module_declares_all_and_exports_only_real_names() -> None:
    for module_info in pkgutil.walk_packages(atempstore.__path__, "atempstore."):
        module = importlib.import_module(module_info.name)
        declared = getattr(module, "__all__", None)
        assert declared is not None, f"{module_info.name} has no __all__"
        for name in declared:
            assert hasattr(module, name), f"{module_info.name}.__all__ names missing {name}"


def test_every_public_name_is_documented_with_an_example() -> None:
    for name in atempstore.__all__:
        if name.startswith(("__", "LOCK_")):
            continue
        obj = getattr(atempstore, name)
        doc = inspect.getdoc(obj) or ""
        assert doc, f"{name} has no docstring"
        assert "Example" in doc or "```" in doc, f"{name}'s docstring has no example"


def test_top_level_names_come_from_private_modules() -> None:
    for name in atempstore.__all__:
        obj = getattr(atempstore, name)
        module = getattr(obj, "__module__", "atempstore")
        if module and module.startswith("atempstore."):
            assert module.split(".")[1].startswith("_"), f"{name} lives in {module}"


def test_version_comes_from_package_metadata() -> None:
    assert atempstore.__version__ != "0.0.0"
