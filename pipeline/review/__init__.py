"""The review web app over one run (``jobs/review.py``), in the order a request meets it:

    run.py        the run as the app reads it (the only module here that imports pipeline.storage)
    queries.py    DuckDB over the run's Parquet stats: gallery views, image rows, class summaries
    decisions.py  accept / reject / needs-fix, appended under the run prefix, one file per session
    render.py     overlays, masks, heatmaps and histograms: pure functions of arrays
    tryit.py      "try it": the run's labeler, built on first use (the model stack loads only then)
    app.py        ``create_app``: FastAPI routers per page group; templates/ and static/ hold markup

``from pipeline.review import create_app`` needs the ``review`` extra (fastapi, jinja2, duckdb).
"""

from __future__ import annotations

from typing import Any


def create_app(*args: Any, **kwargs: Any) -> Any:
    """``pipeline.review.app.create_app`` (imported on call, so ``pipeline.review`` imports light)."""
    from pipeline.review.app import create_app as make

    return make(*args, **kwargs)
