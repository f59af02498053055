"""The HTML report: self-contained (every image an embedded PNG, no URL), every section present, no
script; and, where Chromium is installed, it renders headless without page errors."""

from __future__ import annotations

import base64
import io
import os
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipeline import audit, report
from pipeline.types import IGNORE

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
import render_report  # noqa: E402

CATS = [{"id": 1, "name": "cat"}, {"id": 7, "name": "dog"}]


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.imgs: list[str] = []
        self.sections: list[str] = []
        self.tags: set[str] = set()
        self.attr_values: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        values = dict(attrs)
        self.attr_values += [v for v in values.values() if v]
        if tag == "img":
            self.imgs.append(values.get("src") or "")
        if tag == "section":
            self.sections.append(values.get("id") or "")


@pytest.fixture(scope="module")
def report_html(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A report over 12 random images, with statistics, overlays (one over a picture) and a missing image."""
    rng = np.random.default_rng(0)
    ids = (0, 1, 7)
    result = audit.Audit(ids)
    maps = {}
    for i in range(12):
        gt = np.array([0, 1, 7, IGNORE], np.uint8)[rng.integers(0, 4, (30, 40))]
        pred = np.where(rng.random(gt.shape) < i / 12, np.uint8(7), gt)
        maps[f"im{i:02d}"] = (gt, pred)
        result.add(f"im{i:02d}", gt, pred)
    result.add_unscored("lost", audit.MISSING_PRED, "not in the prediction")
    rows = result.sorted_rows()
    stats = pa.table({"image_id": list(maps), "agreement": rng.random(12), "n_kept": [2] * 12})
    corr = audit.correlations(stats, rows)
    scored = sorted((r for r in rows if r["miou"] is not None), key=lambda r: r["miou"])
    picture = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
    worst = [report.Overlay(r["image_id"], r["miou"], *maps[r["image_id"]], picture) for r in scored[:2]]
    best = [report.Overlay(r["image_id"], r["miou"], *maps[r["image_id"]]) for r in scored[-2:]]
    page = report.build_report("test <audit>", audit.summary(result), audit.class_table(result.matrix, CATS), rows,
                               result.matrix, corr, stats, worst, best)  # fmt: skip
    path = tmp_path_factory.mktemp("report") / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


def test_report_is_self_contained_with_every_section(report_html: Path) -> None:
    text = report_html.read_text(encoding="utf-8")
    parser = _Collector()
    parser.feed(text)
    assert parser.sections == list(report.SECTIONS)
    assert "script" not in parser.tags and "link" not in parser.tags  # no JavaScript, no external stylesheet
    assert "http://" not in text and "https://" not in text
    assert len(parser.imgs) == 4 + 4  # class bars, histogram, confusion, scatters + 2 worst + 2 best
    for src in parser.imgs:
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix)
        with Image.open(io.BytesIO(base64.b64decode(src[len(prefix) :], validate=True))) as im:
            assert im.format == "PNG"
            im.verify()
    assert all(not v.startswith(("http:", "https:", "//")) for v in parser.attr_values)
    assert "test &lt;audit&gt;" in text and "lost" in text


# CI installs chromium (.ci/run) and never skips this; elsewhere it runs where chromium exists.
@pytest.mark.skipif(
    not Path("/usr/bin/chromium").exists() and not os.environ.get("CI"),
    reason="needs Debian's chromium (apt-get install chromium)",
)
def test_report_renders_in_headless_chromium(report_html: Path, tmp_path: Path) -> None:
    png = tmp_path / "report.png"
    assert render_report.render(report_html, png, "/usr/bin/chromium") == []
    with Image.open(png) as im:
        assert im.size == (1280, 2000)
        assert len(set(im.convert("L").getdata())) > 10  # something was drawn, not a blank page
