"""The review web app: ``create_app(run)`` gives a FastAPI app over one run (routers per page
group; templates hold the markup). Requests name images by id only: an id is looked up in the
run's stats (unknown ids are 404), label maps are read under the prefix through ``Store.path``,
and decisions are written to ``review/decisions-<session>.jsonl`` under it. The pictures an id
points at are read from the ``file_name`` the run's own COCO file records for it (resolved
against ``images`` when relative); nothing a request sends becomes a path.
"""

from __future__ import annotations

import base64
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from fastapi import APIRouter, FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel
from starlette.datastructures import Headers
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from pipeline.decode import ImageDecodeError, decode_image
from pipeline.review import render
from pipeline.review.decisions import DecisionLog
from pipeline.review.queries import PAGE_SIZES, GalleryQuery, RunIndex
from pipeline.review.run import ReviewRun, image_url, open_review_run
from pipeline.review.tryit import Trier, TryUnavailable, parse_tags

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
THUMB_CACHE = 4096  # thumbnails kept in memory (about 20 kB each)
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
MAX_UPLOAD = 20 * 1024 * 1024  # bytes of an uploaded "try it" image
FAILED_PAGE = 100
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")  # read only: a page elsewhere may send them, they change nothing
DEFAULT_PORTS = {"http": 80, "https": 443}


class LRU:
    """A small thread-safe least-recently-used cache of computed bytes."""

    def __init__(self, size: int) -> None:
        self.size, self._items, self._lock = size, OrderedDict[Any, bytes](), threading.Lock()

    def get(self, key: Any, make: Callable[[], bytes]) -> bytes:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = make()
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return value


def _origin(url: str) -> tuple[str, str, int | None] | None:
    """(scheme, host, port with the scheme's default filled in) of ``url``; None when it is no origin."""
    try:
        parts = urlsplit(url)
        port = parts.port or DEFAULT_PORTS.get(parts.scheme)
    except ValueError:
        return None
    return (parts.scheme, parts.hostname, port) if parts.scheme and parts.hostname else None


def cross_site(headers: Mapping[str, str], scheme: str) -> str | None:
    """Why a request that changes something (a decision, a try) must be refused as sent by a page
    of another site, or None. Browsers mark such requests: ``Sec-Fetch-Site: cross-site``, or an
    ``Origin`` other than the app's own (``scheme`` and the ``Host`` header; "null" from sandboxed
    pages and files counts as other). Requests without either header (curl, scripts) pass."""
    if headers.get("sec-fetch-site", "").lower() == "cross-site":
        return "Sec-Fetch-Site says the request comes from another site"
    origin = headers.get("origin")
    if origin is None:
        return None
    own = f"{scheme}://{headers.get('host', '')}"
    theirs = _origin(origin.lower())
    if theirs is None or theirs != _origin(own.lower()):
        return f"its Origin {origin!r} is not this app's own ({own})"
    return None


class SameOriginMiddleware:
    """Refuses (403) any request but GET/HEAD/OPTIONS that a page of another site sends (``cross_site``):
    a plain form or a ``no-cors`` fetch elsewhere could otherwise write decisions or load the
    model stack through ``/try``, since the app has no login."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] not in SAFE_METHODS:
            reason = cross_site(Headers(scope=scope), scope.get("scheme", "http"))
            if reason is not None:
                message = (f"cross-site request refused: {reason}; this app takes changes only from its own "
                           "pages (open it at the address it serves and use the page's buttons)")  # fmt: skip
                await PlainTextResponse(message, status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)


@dataclass
class Review:
    """What every route shares: the run, its query index, the decision log, pictures' sources."""

    run: ReviewRun
    index: RunIndex
    decisions: DecisionLog
    trier: Trier
    images: str | None = None
    gt: Any = None  # an audit.LabelSource when ground truth is given
    gt_keys: set[str] = field(default_factory=set)
    thumbs: LRU = field(default_factory=lambda: LRU(THUMB_CACHE))

    def row(self, image_id: str) -> dict[str, Any]:
        row = self.index.image(image_id)
        if row is None:
            raise HTTPException(404, f"no image {image_id!r} in this run")
        return row

    def label_map(self, row: dict[str, Any]) -> np.ndarray:
        if row["status"] != "ok" or not row["label_file"]:
            raise HTTPException(404, f"image {row['image_id']} has no label map ({row['status']})")
        return self.run.label_map(row["label_file"])

    def picture(self, row: dict[str, Any], shape: tuple[int, int]) -> np.ndarray | None:
        """The image (HWC uint8 RGB, oriented to the label map's ``shape``), or None when it cannot be read."""
        name = self.run.file_names(row["shard_id"]).get(row["image_id"])
        url = image_url(name, self.images)
        if url is None:
            return None
        try:
            with self.run.filesystem_for(url).open(url, "rb") as f:
                return decode_image(f.read(), expected_size=(shape[1], shape[0]))
        except (OSError, ImageDecodeError) as err:
            log.info("image %s: cannot show %s (%s)", row["image_id"], url, err)
            return None

    def ground_truth(self, row: dict[str, Any]) -> np.ndarray | None:
        if self.gt is None:
            return None
        for key in (row["image_id"], Path(row["label_file"] or "").stem):
            if key in self.gt_keys:
                return self.gt.read(key)
        return None

    def refresh(self) -> None:
        self.index.set_decisions({k: d.decision for k, d in self.decisions.latest().items()})


def _review(request: Request) -> Review:
    return request.app.state.review


def _templates() -> Jinja2Templates:
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.globals.update(fmt=_fmt, colour=render.hex_colour, page_sizes=PAGE_SIZES)
    return templates


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


TEMPLATES = _templates()
pages = APIRouter()
pictures = APIRouter()
api = APIRouter()
trying = APIRouter()


def _page(request: Request, name: str, **context: Any) -> HTMLResponse:
    review = _review(request)
    context.update(run_url=review.run.url, counts=review.decisions.counts())
    return TEMPLATES.TemplateResponse(request, name, context)


def _query(request: Request) -> GalleryQuery:
    params = {k: v for k, v in request.query_params.items() if k not in ("id", "pos")}
    try:
        return GalleryQuery.from_params(params)
    except ValueError as err:
        raise HTTPException(400, str(err)) from err


@pages.get("/")
def home() -> RedirectResponse:
    return RedirectResponse("/gallery")


@pages.get("/gallery", response_class=HTMLResponse)
def gallery(request: Request) -> HTMLResponse:
    review, q = _review(request), _query(request)
    try:
        page = review.index.gallery(q)
    except ValueError as err:
        raise HTTPException(400, str(err)) from err
    return _page(request, "gallery.html", page=page, q=q, ranges=review.index.slider_ranges(),
                 statuses=review.index.statuses(), categories=review.index.categories,
                 audit=review.index.audit_key is not None)  # fmt: skip


@pages.get("/image", response_class=HTMLResponse)
def image_page(request: Request, id: str, pos: int | None = None) -> HTMLResponse:  # noqa: A002
    review, q = _review(request), _query(request)
    row = review.row(id)
    try:
        prev_id, next_id, pos = review.index.around(q, id, pos)
    except ValueError as err:
        raise HTTPException(400, str(err)) from err
    classes = [dict(c, name=review.index.categories.get(c["category_id"], str(c["category_id"])))
               for c in review.index.image_classes(id)]  # fmt: skip
    decision = review.decisions.latest().get(id)
    stats = {k: v for k, v in row.items() if k not in ("decision",)}
    ok = row["status"] == "ok" and row["label_file"]
    suggestions = review.run.suggestions(row["shard_id"], id) if ok else []
    has_regions = bool(ok) and review.run.has_region_map(row["shard_id"], row["label_file"])
    return _page(request, "image.html", row=row, stats=stats, classes=classes, q=q, pos=pos, prev_id=prev_id,
                 next_id=next_id, decision=decision, has_gt=review.gt is not None,
                 audit=review.index.audit_key is not None, suggestions=suggestions,
                 has_regions=has_regions)  # fmt: skip


@pages.get("/decisions", response_class=HTMLResponse)
def decisions_page(request: Request) -> HTMLResponse:
    review = _review(request)
    latest = sorted(review.decisions.latest().values(), key=lambda d: -d.time)
    return _page(request, "decisions.html", latest=latest[:200], total=len(latest),
                 session=review.decisions.rel)  # fmt: skip


@pages.get("/classes", response_class=HTMLResponse)
def classes_page(request: Request) -> HTMLResponse:
    review = _review(request)
    rows = review.index.class_summary()
    for row in rows:
        row["svg"] = render.histogram_svg(row["histogram"], title=f"class score histogram of {row['name']}")
    return _page(request, "classes.html", rows=rows, audit=bool(review.index.audit_classes))


@pages.get("/failed", response_class=HTMLResponse)
def failed_page(request: Request, page: int = 1) -> HTMLResponse:
    rows, total = _review(request).index.failed(FAILED_PAGE, (max(page, 1) - 1) * FAILED_PAGE)
    return _page(request, "failed.html", rows=rows, total=total, page=max(page, 1),
                 pages=max(1, -(-total // FAILED_PAGE)))  # fmt: skip


def _png(data: bytes) -> Response:
    return Response(data, media_type="image/png", headers={"Cache-Control": "max-age=3600"})


@pictures.get("/thumb")
def thumb(request: Request, id: str) -> Response:  # noqa: A002
    review = _review(request)
    row = review.row(id)

    def make() -> bytes:
        lm = review.label_map(row)
        return render.thumbnail_png(review.picture(row, lm.shape), lm)

    return _png(review.thumbs.get(("thumb", id), make))


@pictures.get("/picture/photo")
def photo(request: Request, id: str) -> Response:  # noqa: A002
    review = _review(request)
    row = review.row(id)
    lm = review.label_map(row)
    pic = review.picture(row, lm.shape)
    return _png(render.photo_png(pic if pic is not None else np.full((*lm.shape, 3), 96, np.uint8)))


@pictures.get("/picture/mask")
def mask(request: Request, id: str, label: int) -> Response:  # noqa: A002
    review = _review(request)
    row = review.row(id)
    if not 0 <= label <= 255:
        raise HTTPException(400, "label must be a label value 0..255")
    return _png(review.thumbs.get(("mask", id, label), lambda: render.class_mask_png(review.label_map(row), label)))


@pictures.get("/picture/regions")
def regions(request: Request, id: str) -> Response:  # noqa: A002
    """The image's discovered regions (discovery, ``unknown: regions``) as a toggle layer."""
    review = _review(request)
    row = review.row(id)
    region_map = review.run.region_map(row["shard_id"], row["label_file"]) if row["label_file"] else None
    if region_map is None:
        raise HTTPException(404, f"no region map for image {id!r} (discovery with --unknown regions writes one)")
    return _png(render.regions_png(region_map))


@pictures.get("/picture/gt")
def ground_truth(request: Request, id: str) -> Response:  # noqa: A002
    review = _review(request)
    gt = review.ground_truth(review.row(id))
    if gt is None:
        raise HTTPException(404, f"no ground truth for image {id!r}")
    return _png(render.colour_png(gt))


class DecisionIn(BaseModel):
    image_id: str
    decision: str
    note: str = ""


@api.post("/api/decision")
def decide(request: Request, body: DecisionIn) -> JSONResponse:
    review = _review(request)
    review.row(body.image_id)
    try:
        d = review.decisions.record(body.image_id, body.decision, body.note)
    except ValueError as err:  # Decision checks the decision and the note
        raise HTTPException(400, str(err)) from err
    review.refresh()
    return JSONResponse({"image_id": d.image_id, "decision": d.decision, "counts": review.decisions.counts()})


@trying.get("/try", response_class=HTMLResponse)
def try_form(request: Request, id: str | None = None) -> HTMLResponse:  # noqa: A002
    return _page(request, "try.html", image_id=id or "", tags="", result=None, error=None,
                 categories=_review(request).index.categories)  # fmt: skip


@trying.post("/try", response_class=HTMLResponse)
def try_run(request: Request, tags: str = Form(""), image_id: str = Form(""),
            upload: UploadFile | None = File(None)) -> HTMLResponse:  # noqa: B008  # fmt: skip
    review = _review(request)
    context: dict[str, Any] = {"image_id": image_id, "tags": tags, "result": None, "error": None,
               "categories": review.index.categories}  # fmt: skip
    try:
        image = _try_image(review, image_id, upload)
        result = review.trier.run(image, parse_tags(tags, review.run.categories))
        context["result"] = _try_pictures(image, result)
    except (ValueError, TryUnavailable) as err:
        context["error"] = str(err)
    return _page(request, "try.html", **context)


def _try_image(review: Review, image_id: str, upload: UploadFile | None) -> np.ndarray:
    if upload is not None and upload.filename:
        data = upload.file.read(MAX_UPLOAD + 1)
        if len(data) > MAX_UPLOAD:
            raise ValueError(f"the upload is larger than {MAX_UPLOAD // 2**20} MiB")
        return decode_image(data)
    if not image_id.strip():
        raise ValueError("upload an image or give the id of one of the run's images")
    row = review.index.image(image_id.strip())
    if row is None or row["status"] != "ok":
        raise ValueError(f"no labelled image {image_id.strip()!r} in this run")
    pic = review.picture(row, (int(row["height"]), int(row["width"])))
    if pic is None:
        raise ValueError(f"image {image_id.strip()!r} cannot be read (start the app with --images ROOT)")
    return pic


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _try_pictures(image: np.ndarray, result: Any) -> dict[str, Any]:
    h, w = result.label_map.shape
    size = (min(w, 256), max(1, round(h * min(w, 256) / w)))
    classes = [{"name": name, "id": cid, "score": result.scores[k],
                "coarse": _data_uri(render.heatmap_png(result.coarse[k], size)),
                "compensated": _data_uri(render.heatmap_png(result.compensated[k], size))}
               for k, (name, cid) in enumerate(zip(result.names, result.class_ids, strict=True))]  # fmt: skip
    final = _data_uri(render.thumbnail_png(image, result.label_map, size=max(size)))
    return {"classes": classes, "final": final}


def create_app(run: str | ReviewRun, audit: str | None = None, *, gt: str | None = None, gt_format: str = "png",
               images: str | None = None, session: str | None = None, storage_options: dict | None = None,
               allowed_hosts: Sequence[str] = LOOPBACK_HOSTS) -> FastAPI:  # fmt: skip
    """The review app over ``run`` (an output prefix, local or fsspec URL, or an opened run).
    ``audit``: the ``--out`` folder of ``audit_masks.py`` (per-image and per-class IoU);
    ``gt``: ground truth as the audit reads it, shown beside the labels; ``images``: the root
    that relative image file names (COCO inputs) are under; ``session``: the decisions file's
    name (default: start time + random); ``allowed_hosts``: the Host headers served (loopback
    names by default, so a web page cannot reach the app through DNS rebinding). Requests that
    change something are refused when a page of another site sends them (``SameOriginMiddleware``)."""
    opened = run if isinstance(run, ReviewRun) else open_review_run(run, **(storage_options or {}))
    index = RunIndex(opened, audit)
    truth = None
    if gt:
        from pipeline import audit as audit_mod  # ground truth is read as the audit reads it

        truth = audit_mod.open_ground_truth(gt, fmt=gt_format)
    review = Review(opened, index, DecisionLog(opened, session), Trier(opened.config, opened.categories), images,
                    truth, set(truth.image_ids()) if truth is not None else set())  # fmt: skip
    review.refresh()
    app = FastAPI(title="tag2mask review", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.review = review
    app.add_middleware(SameOriginMiddleware)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))  # added last: checked first
    for router in (pages, pictures, api, trying):
        app.include_router(router)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    return app


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the app with uvicorn (blocking)."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="info")


__all__ = ["create_app", "serve"]
