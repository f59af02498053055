"""Labeling methods: a registry maps the config's ``method`` to a class (``base.Method``).

Adding a method = one module in this package + one line in ``REGISTRY`` + its tests
(docs/METHODS.md, "How to add a method").
"""

from __future__ import annotations

from pipeline.config import Config
from pipeline.methods.base import Assembly, Item, Method, MethodOutput
from pipeline.methods.clip_es import ClipEs
from pipeline.methods.cliper import Cliper

REGISTRY: dict[str, type[Method]] = {
    "cliper": Cliper,
    "clip-es": ClipEs,
}


def get(name: str) -> type[Method]:
    """The method class registered under ``name``; ValueError naming the known ones otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(sorted(REGISTRY))}") from None


def needs_sd(config: Config) -> bool:
    """Whether the configured method uses Stable Diffusion (``models.load_models(need_sd=...)``)."""
    return get(config.method).needs_sd(config)


__all__ = ["REGISTRY", "Assembly", "Item", "Method", "MethodOutput", "get", "needs_sd"]
