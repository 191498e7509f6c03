"""Model registry: ``@register_model(name)``, ``get_model(name)``, ``available_models()``, ``model_revision(name)``.

Adding a model is one file in this folder with a :class:`~grcn_bench.models.base.Recommender` subclass decorated
with ``@register_model("name")`` (docs/extending.md, "A model"): every module of this package is imported when the
package is, so nothing else changes. The runner, the grid, the reports and the conformance tests pick it up from the
registry.
"""

from __future__ import annotations

from collections.abc import Callable

from .base import Embeddings, Recommender

_REGISTRY: dict[str, type[Recommender]] = {}


def register_model(name: str) -> Callable[[type[Recommender]], type[Recommender]]:
    """Class decorator that registers a :class:`Recommender` subclass under ``name``."""

    def decorate(cls: type[Recommender]) -> type[Recommender]:
        if not (isinstance(cls, type) and issubclass(cls, Recommender)):
            raise TypeError(f"@register_model({name!r}) needs a Recommender subclass, got {cls!r}")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"a model named {name!r} is already registered ({_REGISTRY[name].__qualname__})")
        _REGISTRY[name] = cls
        cls.registry_name = name
        return cls

    return decorate


def unregister_model(name: str) -> None:
    """Remove a model from the registry (for tests that register throwaway models)."""
    _REGISTRY.pop(name, None)


def get_model(name: str) -> type[Recommender]:
    """The registered class for ``name``; an unknown name lists the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(available_models()) or "none"
        raise KeyError(f"unknown model {name!r}; available models: {known}") from None


def model_revision(name: str) -> int:
    """The registered model's :attr:`~grcn_bench.models.base.Recommender.revision`; 0 for a name not registered."""
    model = _REGISTRY.get(name)
    return model.revision if model is not None else 0


def available_models() -> list[str]:
    """Names of every registered model, sorted."""
    return sorted(_REGISTRY)


def _import_model_modules() -> None:
    """Import every model module of this package, so that each registers itself (one file = one model)."""
    import importlib
    import pkgutil

    for module in pkgutil.iter_modules(__path__):
        if module.name not in _NOT_MODELS and not module.ispkg:
            importlib.import_module(f"{__name__}.{module.name}")


_NOT_MODELS = {"base", "losses"}
_import_model_modules()

__all__ = ["Embeddings", "Recommender", "available_models", "get_model", "model_revision", "register_model",
           "unregister_model"]
