"""The review app's routes (Starlette's TestClient): gallery views, image pages, decisions that
survive a restart, and no route reading or writing outside the run prefix."""

from __future__ import annotations

import html as html_text
import io
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from starlette.testclient import TestClient

from pipeline.review import create_app
from pipeline.review.decisions import DecisionLog
from pipeline.review.queries import GalleryQuery, RunIndex
from pipeline.review.run import image_url, open_review_run
from tests.review_data import IMAGES, label_maps, review_run, tree_digest  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def run_copy(review_run, tmp_path) -> Path:  # noqa: F811
    """A fresh copy of the run (decisions are written under the prefix)."""
    shutil.copytree(review_run.parent, tmp_path / "copy", ignore=shutil.ignore_patterns("tiny*"))
    return tmp_path / "copy" / "run"


def _client(app) -> TestClient:
    return TestClient(app, base_url="http://127.0.0.1")


def _cards(html: str) -> list[str]:
    return [part.split('"', 1)[0] for part in html.split('data-id="')[1:]]


def test_gallery_filters_by_class_and_sorts_by_its_score(run_copy):
    client = _client(create_app(str(run_copy)))
    # dog (7) has pixels in dog-1, both-2, three-4; its score is 0.9, 0.3, 0.6 there (review_data.painted)
    page = client.get("/gallery?cat=7&sort=class_score&desc=1")
    assert page.status_code == 200
    assert _cards(page.text) == ["dog-1", "three-4", "both-2"]
    assert _cards(client.get("/gallery?cat=7&sort=class_score").text) == ["both-2", "three-4", "dog-1"]
    assert _cards(client.get("/gallery?cat=7&min_class_score=0.5").text) == ["dog-1", "three-4"]
    assert _cards(client.get("/gallery?status=decode_error").text) == ["broken"]


def test_range_filters_match_the_label_maps(run_copy):
    maps = label_maps(run_copy)
    background = {k: float(np.mean(v == 0)) for k, v in maps.items()}
    values = sorted(background.values())
    cut = (values[2] + values[3]) / 2  # between the third and fourth: no tie with a stored (rounded) value
    client = _client(create_app(str(run_copy)))
    got = _cards(client.get(f"/gallery?max_background_fraction={cut}&sort=background_fraction").text)
    assert got == sorted((k for k, v in background.items() if v <= cut), key=lambda k: (background[k], k))
    assert len(got) == 3


def test_the_url_holds_the_view_and_bad_values_are_400(run_copy):
    q = GalleryQuery.from_params({"cat": "7", "min_class_score": "0.5", "sort": "class_score", "desc": "1",
                                  "page": "2", "status": "ok"})  # fmt: skip
    assert GalleryQuery.from_params(dict(p.split("=") for p in q.to_params().split("&"))) == q
    client = _client(create_app(str(run_copy)))
    bad = client.get("/gallery?min_ignore_fraction=lots")
    assert bad.status_code == 400 and "min_ignore_fraction='lots' must be a number" in bad.text
    assert client.get("/gallery?sort=nonsense").status_code == 400
    assert "cannot filter on 'drop table'" in client.get("/gallery?min_drop table=1").text


def test_pages_of_a_view_and_neighbours_of_an_image(run_copy):
    index = RunIndex(open_review_run(str(run_copy)))
    q = GalleryQuery(per_page=2, page=2)
    page = index.gallery(q)
    ids = sorted(IMAGES)
    assert [r["image_id"] for r in page.rows] == ids[2:4] and page.total == 6 and page.pages == 3
    assert index.around(q, ids[3], 3) == (ids[2], ids[4], 3)
    assert index.around(q, ids[3], 0) == (ids[2], ids[4], 3)  # a stale position is looked up
    assert index.around(q, ids[0], None) == (None, ids[1], 0)
    client = _client(create_app(str(run_copy)))
    html = client.get("/image?id=cat-0&pos=1&cat=1").text  # cat pixels: both-2, cat-0, three-4
    assert 'data-prev="/image?id=both-2&pos=0&cat=1"' in html
    assert 'data-next="/image?id=three-4&pos=2&cat=1"' in html
    assert 'data-next=""' in client.get("/image?id=three-4&pos=2&cat=1").text


def test_image_pictures_show_the_label_map(run_copy):
    lm = label_maps(run_copy)["three-4"]
    client = _client(create_app(str(run_copy)))
    html = client.get("/image?id=three-4").text
    for cid, name in ((1, "cat"), (7, "dog"), (15, "person")):
        assert f'data-label="{cid}"' in html and name in html
        mask = np.array(Image.open(io.BytesIO(client.get(f"/picture/mask?id=three-4&label={cid}").content)))
        assert np.array_equal(mask[..., 3] == 255, lm == cid)
    photo = np.array(Image.open(io.BytesIO(client.get("/picture/photo?id=three-4").content)))
    source = np.array(Image.open(run_copy.parent / "images" / "three-4.png"))
    assert np.array_equal(photo, source)
    thumb = np.array(Image.open(io.BytesIO(client.get("/thumb?id=three-4").content)).convert("RGB"))
    assert thumb.shape[:2] == lm.shape  # smaller than a thumbnail already: kept as is
    assert (np.abs(thumb.astype(int) - source).sum(axis=2)[(lm != 0) & (lm != 255)] > 30).all()
    assert np.array_equal(thumb[lm == 0], source[lm == 0])
    assert "decode_error" in client.get("/image?id=broken").text
    assert client.get("/thumb?id=broken").status_code == 404


def test_decisions_survive_a_restart_and_the_latest_wins(run_copy):
    client = _client(create_app(str(run_copy), session="s1"))
    assert client.post("/api/decision", json={"image_id": "cat-0", "decision": "reject", "note": "leg"}).json()[
        "counts"] == {"accept": 0, "reject": 1, "needs_fix": 0}  # fmt: skip
    client.post("/api/decision", json={"image_id": "dog-1", "decision": "needs_fix"})
    maybe = client.post("/api/decision", json={"image_id": "dog-1", "decision": "maybe"})
    assert maybe.status_code == 400
    assert maybe.json()["detail"] == "decision 'maybe' must be one of ['accept', 'reject', 'needs_fix']"
    long_note = {"image_id": "dog-1", "decision": "accept", "note": "x" * 2001}
    assert "a note must be text of at most 2000 characters" in client.post("/api/decision", json=long_note).text
    lines = (run_copy / "review" / "decisions-s1.jsonl").read_text().splitlines()
    assert [json.loads(x)["decision"] for x in lines] == ["reject", "needs_fix"]
    again = _client(create_app(str(run_copy), session="s2"))  # a restarted server
    assert "reject" in again.get("/image?id=cat-0").text and "leg" in again.get("/image?id=cat-0").text
    again.post("/api/decision", json={"image_id": "cat-0", "decision": "accept"})
    assert (run_copy / "review" / "decisions-s1.jsonl").read_text().splitlines() == lines  # never edited
    latest = {k: d.decision for k, d in DecisionLog(open_review_run(str(run_copy))).latest().items()}
    assert latest == {"cat-0": "accept", "dog-1": "needs_fix"}
    assert _cards(again.get("/gallery?decision=needs_fix").text) == ["dog-1"]
    assert _cards(again.get("/gallery?decision=none").text) == ["both-2", "broken", "person-3", "three-4"]
    summary = again.get("/decisions").text
    assert "<th>accepted</th><td>1</td>" in summary and "<th>needs fix</th><td>1</td>" in summary


def test_a_line_cut_short_by_a_crash_is_skipped(run_copy):
    folder = run_copy / "review"
    folder.mkdir()
    good = json.dumps({"image_id": "cat-0", "decision": "reject", "note": "", "time": 1.0})
    (folder / "decisions-a.jsonl").write_text(good + '\n{"image_id": "dog-1", "deci')
    assert {k: d.decision for k, d in DecisionLog(open_review_run(str(run_copy))).latest().items()} == {
        "cat-0": "reject"}  # fmt: skip
    (folder / "decisions-b.jsonl").write_text('{"nonsense": 1}\n' + good + "\n")
    with pytest.raises(ValueError, match="decisions-b.jsonl line 1: not a decision"):
        DecisionLog(open_review_run(str(run_copy)))


EVIL = ["../run.json", "/etc/passwd", "..%2f..%2fetc%2fpasswd", "%2e%2e/run.json", "labels/cat-0.png",
        "shards/../../x", "cat-0/../../../x", "\\..\\run.json"]  # fmt: skip


def test_no_route_reads_or_writes_outside_the_run_prefix(run_copy):
    before = tree_digest(run_copy.parent)
    client = _client(create_app(str(run_copy), session="s1"))
    for evil in EVIL:
        for url in ("/thumb?id=", "/picture/photo?id=", "/picture/gt?id=", "/image?id="):
            assert client.get(url + evil).status_code == 404, url + evil
        assert client.get(f"/picture/mask?id={evil}&label=1").status_code == 404
        assert client.post("/api/decision", json={"image_id": evil, "decision": "reject"}).status_code == 404
        assert "no labelled image" in client.post("/try", data={"image_id": evil, "tags": "cat"}).text
    for path in ("/static/../app.py", "/static/..%2fapp.py", "/static/%2e%2e/app.py", "/static//etc/passwd",
                 "/static/..%2f..%2f..%2frun.json"):  # fmt: skip
        response = client.get(path)
        assert response.status_code == 404 and "create_app" not in response.text, path
    assert tree_digest(run_copy.parent) == before  # nothing written, not even under the prefix


def test_image_url_keeps_relative_names_under_the_root():
    assert image_url("a/b.png", "s3://bucket/imgs/") == "s3://bucket/imgs/a/b.png"
    for climbing in ("../run.json", "../../run.json", "a/../../x.png", "a/b/../../../x.png", "..", "a/.."):
        assert image_url(climbing, "/data/images") is None, climbing
    assert image_url("a/b.png", None) is None  # a relative name without --images: unknown
    assert image_url(None, "/data/images") is None and image_url("", "/data/images") is None
    # absolute names and URLs are the run's own record of where its image is (the manifest's uri)
    assert image_url("/data/coco/x.jpg", "/data/images") == "/data/coco/x.jpg"
    assert image_url("s3://b/x.jpg", None) == "s3://b/x.jpg"


def _set_file_name(run: Path, image_id: str, file_name: str) -> None:
    """Rewrite the image's ``file_name`` in its shard's COCO file (as a tampered or odd run would hold)."""
    for path in run.glob("shards/*/annotations.json"):
        doc = json.loads(path.read_text())
        for image in doc["images"]:
            if str(image.get("source_id", image["id"])) == image_id:
                image["file_name"] = file_name
                path.write_text(json.dumps(doc))
                return
    raise AssertionError(f"no image {image_id} in {run}")


def test_a_coco_file_name_that_climbs_out_of_the_images_root_is_not_read(run_copy, tmp_path):
    """The run's COCO file names ``../x/secret.png`` and ``../../run.json`` (both exist from
    --images): the app shows no picture and the exports copy none."""
    from pipeline import export

    root = run_copy / "x" / "y"  # --images; ../../run.json from here is the run's run.json
    root.mkdir(parents=True)  # there, so the OS could resolve the climb
    Image.fromarray(np.full((48, 64, 3), 7, np.uint8)).save(run_copy / "x" / "secret.png")  # cat-0's size
    _set_file_name(run_copy, "cat-0", "../secret.png")
    _set_file_name(run_copy, "dog-1", "../../run.json")
    client = _client(create_app(str(run_copy), images=str(root)))
    photo = np.array(Image.open(io.BytesIO(client.get("/picture/photo?id=cat-0").content)))
    assert (photo == 96).all()  # the grey stand-in, not the secret's 7s
    assert "cannot be read" in client.post("/try", data={"image_id": "cat-0", "tags": "cat"}).text
    summary = export.export(str(run_copy), "fiftyone", tmp_path / "fo", images=str(root))
    assert summary.missing_pictures == ["cat-0", "dog-1"] and summary.exported == 3
    assert sorted(p.name for p in (tmp_path / "fo" / "data").iterdir()) == ["both-2.png", "person-3.png",
                                                                            "three-4.png"]  # fmt: skip
    assert export.export(str(run_copy), "labelstudio", tmp_path / "ls", images=str(root)).missing_pictures == [
        "cat-0", "dog-1"]  # fmt: skip
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text())
    assert {t["data"]["image_id"]: t["data"]["image"] for t in tasks}["dog-1"] == ""


def test_classes_and_failed_pages(run_copy):
    client = _client(create_app(str(run_copy)))
    classes = client.get("/classes").text
    # cat is tagged on cat-0, both-2, three-4 and broken (failed: no class row), with pixels on the first three
    row = classes.split(">cat</a>")[1].split("</tr>")[0]
    assert "<td>3</td><td>3</td>" in row and row.count("<rect") == 10
    failed = client.get("/failed").text
    assert "broken" in failed and "decode_error" in failed and "cannot decode image" in failed
    assert "Failed images (1)" in failed


def _audit_folder(run_copy: Path, folder: Path) -> None:
    """An audit output as audit_masks.py writes it, keyed by file stem: mIoU 0.1 * image index."""
    from pipeline import audit

    rows = [dict.fromkeys(audit.IMAGE_SCHEMA.names) | {"image_id": k, "status": "ok", "miou": 0.1 * i}
            for i, k in enumerate(sorted(label_maps(run_copy)))]  # fmt: skip
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=audit.IMAGE_SCHEMA), folder / "images.parquet")
    classes = [{"category_id": 7, "name": "dog", "gt_pixels": 1, "pred_pixels": 1, "true_positive": 1,
                "ignored_by_us": 0, "iou": 0.625, "precision": 1.0, "recall": 1.0}]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(classes, schema=audit.CLASS_SCHEMA), folder / "classes.parquet")


def test_an_audit_adds_image_iou_and_ground_truth(run_copy, tmp_path):
    _audit_folder(run_copy, tmp_path / "audit")
    gt = tmp_path / "gt"
    gt.mkdir()
    truth = np.zeros((48, 64), np.uint8)
    truth[10:20, 5:30] = 1
    Image.fromarray(truth, mode="L").save(gt / "cat-0.png")
    client = _client(create_app(str(run_copy), str(tmp_path / "audit"), gt=str(gt)))
    order = _cards(client.get("/gallery?sort=miou&desc=1").text)
    assert order == ["three-4", "person-3", "dog-1", "cat-0", "both-2", "broken"]  # broken: no mIoU, last
    assert "image mIoU 0.100" in client.get("/image?id=cat-0").text
    shown = np.array(Image.open(io.BytesIO(client.get("/picture/gt?id=cat-0").content)))
    assert (shown[truth == 1] == (128, 0, 0)).all() and (shown[truth == 0] == 0).all()
    assert client.get("/picture/gt?id=dog-1").status_code == 404
    assert "<td>0.625</td>" in client.get("/classes").text.split(">dog</a>")[1].split("</tr>")[0]


def test_try_it_without_weights_says_which_are_missing(run_copy, tmp_path):
    opened = open_review_run(str(run_copy))
    config = json.loads(json.dumps(opened.config))
    config["model"]["clip"]["checkpoint"] = str(tmp_path / "no-such-clip.pt")
    config["model"]["sd"]["checkpoint"] = str(tmp_path / "no-such-sd")
    client = _client(create_app(replace(opened, config=config)))
    html = client.post("/try", data={"image_id": "cat-0", "tags": "cat"}).text
    assert "Missing model weights" in html and "no-such-clip.pt" in html and "no-such-sd" in html
    answer = html_text.unescape(client.post("/try", data={"image_id": "cat-0", "tags": "zebra"}).text)
    assert "tags ['zebra'] are none of the run's classes: cat, dog, person" in answer


def test_the_app_and_exports_import_without_the_model_stack():
    code = ("import sys, pipeline.review.app, pipeline.export; "
            "heavy = ('torch', 'open_clip', 'diffusers', 'pipeline.labeler'); "
            "print(sorted(m for m in heavy if m in sys.modules))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def _review_job():
    from pipeline.usecases import review as command

    return command


def test_review_job_binds_loopback_and_refuses_a_prefix_without_a_run(tmp_path, capsys):
    job = _review_job()
    assert job.build_parser().parse_args(["--run", "x"]).host == "127.0.0.1"
    assert job.main(["--run", str(tmp_path / "nothing")]) == 2
    assert "no shards committed by the run" in capsys.readouterr().err


def test_a_run_on_s3_is_read_through_fsspec(run_copy, s3_endpoint, monkeypatch):
    """DuckDB reads the Parquet stats through the run's fsspec filesystem; decisions land in the bucket."""
    import s3fs

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    options = {"client_kwargs": {"endpoint_url": s3_endpoint}}
    fs = s3fs.S3FileSystem(**options)
    fs.mkdir("review-bucket")
    fs.put(str(run_copy), "review-bucket/run", recursive=True)
    client = _client(create_app("s3://review-bucket/run", session="s3", storage_options=options))
    assert _cards(client.get("/gallery?cat=7&sort=class_score&desc=1").text) == ["dog-1", "three-4", "both-2"]
    lm = label_maps(run_copy)["dog-1"]
    mask = np.array(Image.open(io.BytesIO(client.get("/picture/mask?id=dog-1&label=7").content)))
    assert np.array_equal(mask[..., 3] == 255, lm == 7)
    client.post("/api/decision", json={"image_id": "dog-1", "decision": "accept"})
    assert json.loads(fs.cat("review-bucket/run/review/decisions-s3.jsonl"))["decision"] == "accept"


def test_only_loopback_host_names_are_served(run_copy):
    """A page elsewhere that rebinds its DNS name to 127.0.0.1 sends its own Host: refused."""
    app = create_app(str(run_copy), session="s1")
    assert TestClient(app, base_url="http://evil.example").get("/gallery").status_code == 400
    assert TestClient(app, base_url="http://evil.example").post(
        "/api/decision", json={"image_id": "cat-0", "decision": "reject"}).status_code == 400  # fmt: skip
    assert not (run_copy / "review").exists()
    assert TestClient(app, base_url="http://localhost:8000").get("/gallery").status_code == 200


def test_a_page_of_another_site_cannot_write_or_try(run_copy):
    """A form or a ``no-cors`` fetch on another site reaches the app through the user's browser
    with the page's own Origin (or ``Sec-Fetch-Site: cross-site``): refused, nothing written; the
    app's own pages (same Origin) and clients sending no Origin (curl, scripts) are served."""
    before = tree_digest(run_copy.parent)
    client = _client(create_app(str(run_copy), session="s1"))
    decision = {"image_id": "cat-0", "decision": "reject"}
    for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"}, {"Origin": "http://127.0.0.1:8001"},
                    {"Origin": "https://127.0.0.1"}, {"Sec-Fetch-Site": "cross-site"}):  # fmt: skip
        refused = client.post("/api/decision", json=decision, headers=headers)
        assert refused.status_code == 403 and "cross-site request refused" in refused.text, headers
        as_text = client.post("/api/decision", content=json.dumps(decision), headers={**headers,
                              "Content-Type": "text/plain"})  # fmt: skip
        assert as_text.status_code == 403, headers
        tried = client.post("/try", data={"image_id": "cat-0", "tags": "cat"}, headers=headers)
        assert tried.status_code == 403 and "Try it" not in tried.text, headers
    assert client.get("/gallery", headers={"Origin": "http://evil.example"}).status_code == 200  # reads pass
    assert tree_digest(run_copy.parent) == before
    same = client.post("/api/decision", json=decision, headers={"Origin": "http://127.0.0.1",
                                                                 "Sec-Fetch-Site": "same-origin"})  # fmt: skip
    assert same.status_code == 200
    assert client.post("/api/decision", json={"image_id": "dog-1", "decision": "accept"}).status_code == 200
    lines = (run_copy / "review" / "decisions-s1.jsonl").read_text().splitlines()
    assert [json.loads(x)["image_id"] for x in lines] == ["cat-0", "dog-1"]


def test_allowed_host_names_join_the_host_check(run_copy, monkeypatch, capsys):
    """``--host 0.0.0.0`` alone answers loopback names only (and says so); an ``--allowed-host``
    name is what remote browsers send as Host, so it is served, writes included."""
    job = _review_job()
    served = []
    monkeypatch.setattr(job, "serve", lambda app, host, port: served.append(app))
    assert job.main(["--run", str(run_copy), "--host", "0.0.0.0"]) == 0
    warning = capsys.readouterr().err
    assert "0.0.0.0, 127.0.0.1, [::1], localhost;" in warning and "--allowed-host NAME" in warning
    assert job.main(["--run", str(run_copy), "--host", "0.0.0.0", "--allowed-host", "review.lab",
                     "--allowed-host", "10.0.0.5"]) == 0  # fmt: skip
    assert "0.0.0.0, 10.0.0.5, 127.0.0.1, [::1], localhost, review.lab;" in capsys.readouterr().err
    without, with_names = served
    for name in ("review.lab", "10.0.0.5"):
        url = f"http://{name}:8000"
        assert TestClient(without, base_url=url).get("/gallery").status_code == 400
        assert TestClient(with_names, base_url=url).get("/gallery").status_code == 200
        decision = {"image_id": "cat-0", "decision": "accept"}
        decided = TestClient(with_names, base_url=url).post("/api/decision", headers={"Origin": url}, json=decision)
        assert decided.status_code == 200
    assert TestClient(with_names, base_url="http://evil.example").get("/gallery").status_code == 400
    for bad in ("http://review.lab", "review.lab:8000", ""):
        assert job.main(["--run", str(run_copy), "--host", "0.0.0.0", "--allowed-host", bad]) == 2
        assert "give a bare host name" in capsys.readouterr().err
    assert len(served) == 2


def test_a_local_decisions_file_grows_by_appends(run_copy, monkeypatch):
    """Each decision appends its line: the bytes written before stay the file's prefix, and no
    whole-file write happens (a session of n decisions costs n lines, not n squared / 2)."""
    run = open_review_run(str(run_copy))
    whole = []
    monkeypatch.setattr(run.store, "write_many", whole.append)
    log = DecisionLog(run, "s1")
    path = run_copy / "review" / "decisions-s1.jsonl"
    before = b""
    for n, image_id in enumerate(["cat-0", "dog-1", "cat-0"]):
        log.record(image_id, ("accept", "reject")[n % 2], when=float(n))
        after = path.read_bytes()
        assert after.startswith(before) and after.count(b"\n") == n + 1 and after.endswith(b"\n")
        before = after
    assert whole == []
    sync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(OSError, match="No space left"):
        log.record("both-2", "reject", when=3.0)
    assert path.read_bytes() == before  # the failed line is cut back off: no half line for the next to continue
    monkeypatch.setattr(os, "fsync", sync)
    log.record("both-2", "accept", when=4.0)
    assert [d.image_id for d in DecisionLog(run, "s2").all] == ["cat-0", "dog-1", "cat-0", "both-2"]
    with pytest.raises(ValueError, match="session name '../x': use letters, digits"):
        DecisionLog(run, "../x")


def test_where_the_store_cannot_append_a_session_rolls_to_parts(run_copy, monkeypatch):
    """Object stores (no append): the current part is rewritten with each line, and a new part
    starts every PART_LINES lines, so one decision never rewrites more than PART_LINES lines."""
    from pipeline.review import decisions
    from pipeline.review.run import ReviewRun

    monkeypatch.setattr(ReviewRun, "appends", property(lambda self: False))
    monkeypatch.setattr(decisions, "PART_LINES", 2)
    run = open_review_run(str(run_copy))
    written, write = [], run.store.write_many

    def counting(files: dict[str, bytes]) -> None:
        written.append({k: v.count(b"\n") for k, v in files.items()})
        write(files)

    monkeypatch.setattr(run.store, "write_many", counting)
    log = DecisionLog(run, "s1")
    ids, said = ["cat-0", "dog-1", "both-2", "cat-0", "dog-1"], ["accept", "accept", "reject", "reject", "needs_fix"]
    for n, (image_id, decision) in enumerate(zip(ids, said, strict=True)):
        log.record(image_id, decision, when=float(n))
    first, part = "review/decisions-s1.jsonl", "review/decisions-s1.part{:05d}.jsonl"
    assert written == [{first: 1}, {first: 2}, {part.format(1): 1}, {part.format(1): 2}, {part.format(2): 1}]
    again = DecisionLog(run, "s2")
    assert [d.image_id for d in again.all] == ids
    assert {k: d.decision for k, d in again.latest().items()} == {"cat-0": "reject", "dog-1": "needs_fix",
                                                                   "both-2": "reject"}  # fmt: skip
    DecisionLog(run, "s1").record("both-2", "accept", when=9.0)  # the session named again: after its parts
    assert written[-1] == {part.format(3): 1}
    assert [d.image_id for d in DecisionLog(run, "s3").all] == [*ids, "both-2"]


def test_a_view_count_made_before_decisions_change_is_not_kept(run_copy):
    """A decision that lands while a gallery count is being cached (another request's thread)
    clears the cache after that count, never before it: the next page counts again."""
    import threading

    index = RunIndex(open_review_run(str(run_copy)))
    view = GalleryQuery(decision="reject")
    racers: list[threading.Thread] = []

    class Racing(dict):
        def __setitem__(self, key, value):  # between counting and keeping: another thread decides
            if not racers:
                racers.append(threading.Thread(target=index.set_decisions, args=({"cat-0": "reject"},)))
                racers[0].start()
                racers[0].join(timeout=0.5)  # it waits for the lock where the count is kept under it
            super().__setitem__(key, value)

    index._counts = Racing()
    assert index.gallery(view).total == 0  # counted before the decision
    racers[0].join()
    assert index.gallery(view).total == 1 and [r["image_id"] for r in index.gallery(view).rows] == ["cat-0"]


def test_the_image_page_looks_the_region_map_up_without_reading_it(run_copy):
    """The page only needs to know a region map is there (the picture route decodes it): a file
    that is no PNG still gives the toggle, and only the picture route says what is wrong."""
    from pipeline.storage import layout

    row = RunIndex(open_review_run(str(run_copy))).image("cat-0")
    region = run_copy / layout.region_file(row["shard_id"], layout.label_name(row["label_file"]))
    region.parent.mkdir(parents=True)
    region.write_bytes(b"not a png")
    client = _client(create_app(str(run_copy)))
    assert 'id="regions-toggle"' in client.get("/image?id=cat-0").text
    assert 'id="regions-toggle"' not in client.get("/image?id=dog-1").text
    with pytest.raises(OSError, match="cannot identify image"):  # the file is bad: the page never decoded it
        client.get("/picture/regions?id=cat-0")
