""" "Try it": label one image with typed tags, with the run's own method, config and categories,
and show its coarse, compensated and final maps. The model stack (torch, open_clip,
diffusers) is imported here only when the page is first used, so the app starts without it.
Missing weights give ``TryUnavailable`` with the loader's own message, naming what is missing."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


class TryUnavailable(RuntimeError):
    """The labeler cannot be built here (weights missing, or the run's config unusable)."""


@dataclass(frozen=True)
class TryResult:
    """What one try gives: ``names`` of the C classes labelled; ``coarse`` [C, h, w] and
    ``compensated`` [C, s, s] float32 maps; ``label_map`` [H, W] uint8; ``scores`` [C] final scores."""

    names: tuple[str, ...]
    class_ids: tuple[int, ...]
    coarse: np.ndarray
    compensated: np.ndarray
    label_map: np.ndarray
    scores: tuple[float, ...]


def parse_tags(text: str, categories: Sequence[Mapping[str, Any]]) -> tuple[int, ...]:
    """ "cat, 7" -> category ids (names or ids of the run's categories); raises ValueError naming
    the tags that are none of them."""
    by_name = {str(c["name"]).lower(): int(c["id"]) for c in categories}
    ids = {int(c["id"]) for c in categories}
    out, unknown = [], []
    for tag in (t.strip() for t in text.split(",")):
        if not tag:
            continue
        cid = by_name.get(tag.lower(), int(tag) if tag.isdigit() and int(tag) in ids else None)
        (unknown.append(tag) if cid is None else out.append(cid))
    if unknown:
        raise ValueError(f"tags {unknown} are none of the run's classes: {', '.join(by_name)}")
    if not out:
        raise ValueError("type at least one tag (a class name of the run, comma-separated)")
    return tuple(dict.fromkeys(out))


class Trier:
    """Builds the run's labeler on first use (once; later calls share it)."""

    def __init__(self, config: Mapping[str, Any], categories: Sequence[Mapping[str, Any]]) -> None:
        self.config = dict(config)
        self.categories = list(categories)
        self._labeler: Any = None
        self._lock = threading.Lock()

    def _build(self) -> Any:
        from pipeline.config import build_config
        from pipeline.labeler import Labeler
        from pipeline.models import WeightsUnavailableError
        from pipeline.prompts import class_prompt
        from pipeline.types import Category

        if not self.config:
            raise TryUnavailable("the run has no run.json config, so the labeler that made it is unknown")
        try:
            cfg = build_config(self.config.get("preset"), self.config)
            cats = [Category(int(c["id"]), str(c["name"]), class_prompt(str(c["name"]), cfg.cliper.prompt_set))
                    for c in self.categories]  # fmt: skip
            return Labeler.from_config(cfg, cats)
        except WeightsUnavailableError as err:
            raise TryUnavailable(str(err)) from err

    def labeler(self) -> Any:
        with self._lock:
            if self._labeler is None:
                self._labeler = self._build()
            return self._labeler

    def run(self, image: np.ndarray, tags: Sequence[int]) -> TryResult:
        """Label ``image`` (HWC uint8 RGB) with ``tags`` (category ids)."""
        from pipeline.types import LabelRequest

        labeler = self.labeler()
        with self._lock:  # one image at a time through the models
            (res,) = labeler.label([LabelRequest("try", image, tuple(tags))])
        names = {int(c["id"]): str(c["name"]) for c in self.categories}
        return TryResult(tuple(names[c] for c in res.class_ids), tuple(res.class_ids), res.coarse, res.compensated,
                         res.label_map, tuple(float(s) for s in res.final_scores))  # fmt: skip
