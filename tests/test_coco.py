import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from pycocotools.coco import COCO

from pipeline import coco
from pipeline.types import Category

CATS = [{"id": 3, "name": "cat"}, {"id": 90, "name": "toothbrush", "supercategory": "indoor"}, {"id": 7, "name": "dog"}]


def tiny_map() -> np.ndarray:
    """4 x 5: class 3 in a 2x2 block, class 7 one pixel, one ignore pixel, the rest background."""
    m = np.zeros((4, 5), np.uint8)
    m[1:3, 1:3] = 3
    m[0, 4] = 7
    m[3, 0] = 255
    return m


def test_annotations_of_a_hand_made_map():
    ignore, anns = coco.image_annotations(tiny_map(), 12, {3: 0.912345678, 7: 0.5}, {3, 7, 90}, first_id=5)
    assert [a["category_id"] for a in anns] == [3, 7]
    assert [a["id"] for a in anns] == [5, 6]
    cat, dog = anns
    assert cat["area"] == 4 and cat["bbox"] == [1.0, 1.0, 2.0, 2.0]
    assert dog["area"] == 1 and dog["bbox"] == [4.0, 0.0, 1.0, 1.0]
    assert cat["score"] == 0.912346 and cat["iscrowd"] == 0 and cat["image_id"] == 12
    assert isinstance(cat["segmentation"]["counts"], str) and cat["segmentation"]["size"] == [4, 5]
    assert ignore is not None and coco.decode_rle(ignore).sum() == 1 and coco.decode_rle(ignore)[3, 0] == 1


def test_no_ignore_entry_without_ignore_pixels():
    ignore, anns = coco.image_annotations(np.zeros((3, 3), np.uint8), 1, {}, {3})
    assert ignore is None and anns == []


def test_unknown_category_in_map_is_rejected():
    with pytest.raises(ValueError, match=r"ids \[7\]"):
        coco.image_annotations(tiny_map(), 1, {}, {3})


@pytest.mark.parametrize("bad", [[{"id": 0, "name": "x"}], [{"id": 255, "name": "x"}], [{"id": "3", "name": "x"}]])
def test_category_ids_must_fit_a_label_map(bad):
    with pytest.raises(ValueError, match="1..254"):
        coco.categories_json(bad)


def test_categories_keep_input_ids_sorted_and_accept_labeler_categories():
    assert [c["id"] for c in coco.categories_json(CATS)] == [3, 7, 90]
    assert coco.categories_json([Category(5, "bus", "a bus")]) == [{"id": 5, "name": "bus", "supercategory": ""}]
    with pytest.raises(ValueError, match="unique"):
        coco.categories_json([{"id": 3, "name": "a"}, {"id": 3, "name": "b"}])


def test_image_ids_keep_coco_integers_else_count():
    assert coco.coco_image_ids(["397133", "42"]) == [397133, 42]
    assert coco.coco_image_ids(["0042", "42"]) == [1, 2]
    assert coco.coco_image_ids(["a", "b", "c"]) == [1, 2, 3]


label_maps = st.integers(1, 12).flatmap(
    lambda h: st.integers(1, 12).flatmap(
        lambda w: arrays(np.uint8, (h, w), elements=st.sampled_from([0, 3, 7, 90, 255]))
    )
)


@settings(max_examples=60, deadline=None)
@given(maps=st.lists(label_maps, min_size=1, max_size=4))
def test_rle_round_trip_through_pycocotools(maps, tmp_path_factory):
    items = [(f"img{i}", m, {3: 0.5}, f"labels/img{i}.png") for i, m in enumerate(maps)]
    doc = coco.build_coco(items, CATS)
    path = tmp_path_factory.mktemp("coco") / "a.json"
    path.write_text(json.dumps(doc))
    api = COCO(str(path))
    for img_id, m in zip(api.getImgIds(), maps, strict=True):
        out = np.zeros(m.shape, np.uint8)
        for ann in api.loadAnns(api.getAnnIds(imgIds=[img_id])):
            out[api.annToMask(ann) == 1] = ann["category_id"]
        out[m == 255] = 255  # pycocotools knows no ignore; the image entry below carries it
        assert np.array_equal(out, m)
        assert np.array_equal(coco.decode_label_map(api.imgs[img_id], api.imgToAnns[img_id]), m)
        assert all(a["area"] == int((m == a["category_id"]).sum()) for a in api.imgToAnns[img_id])


def test_merge_renumbers_images_and_annotations():
    a = coco.build_coco([("x", tiny_map(), {}, "x.png")], CATS)
    b = coco.build_coco([("y", tiny_map(), {}, "y.png"), ("z", np.full((2, 2), 90, np.uint8), {}, "z.png")], CATS)
    merged = coco.merge_coco([a, b], {"description": "t"})
    assert [i["id"] for i in merged["images"]] == [1, 2, 3]
    assert [i["source_id"] for i in merged["images"]] == ["x", "y", "z"]
    assert [a["id"] for a in merged["annotations"]] == [1, 2, 3, 4, 5]
    assert [a["image_id"] for a in merged["annotations"]] == [1, 1, 2, 2, 3]
    assert merged["info"] == {"description": "t"}


def test_merge_refuses_different_categories():
    a = coco.build_coco([("x", tiny_map(), {}, "x.png")], CATS)
    b = coco.build_coco([("y", tiny_map(), {}, "y.png")], CATS[:1] + CATS[2:])
    with pytest.raises(ValueError, match="different categories"):
        coco.merge_coco([a, b])


def test_label_map_type_is_checked():
    with pytest.raises(ValueError, match="uint8"):
        coco.image_annotations(tiny_map().astype(np.int32), 1, {}, {3, 7})


def _old_image_annotations(label_map, image_id, scores, known, first_id=1):
    """The formula ``image_annotations`` had before its masks were built column-major in one pass."""
    from pycocotools import mask as mask_utils

    present = np.unique(label_map)
    ids = [int(v) for v in present if v not in (0, 255)]
    rles = coco.encode_masks(label_map[:, :, None] == np.array(ids + [255], dtype=np.uint8))
    raw = [{"size": r["size"], "counts": r["counts"].encode()} for r in rles]
    areas, boxes = mask_utils.area(raw), mask_utils.toBbox(raw)
    anns = [{"id": first_id + i, "image_id": image_id, "category_id": cid, "segmentation": rles[i],
             "area": int(areas[i]), "bbox": [float(v) for v in boxes[i]], "iscrowd": 0,
             "score": round(float(scores.get(cid, 0.0)), coco.SCORE_DIGITS)} for i, cid in enumerate(ids)]  # fmt: skip
    return (rles[-1] if 255 in present else None), anns


@settings(max_examples=60, deadline=None)
@given(
    arrays(np.uint8, st.tuples(st.integers(1, 23), st.integers(1, 23)), elements=st.sampled_from([0, 3, 7, 90, 255])),
    st.integers(1, 5),
)
def test_image_annotations_equal_the_unique_and_fortran_copy_formula(label_map, first_id):
    scores = {3: 0.25, 7: 0.5, 90: 0.125}
    got = coco.image_annotations(label_map, 4, scores, {3, 7, 90}, first_id)
    want = _old_image_annotations(label_map, 4, scores, {3, 7, 90}, first_id)
    assert json.dumps(got) == json.dumps(want)


def test_masks_are_built_column_major_as_pycocotools_reads_them():
    m = np.arange(12, dtype=np.uint8).reshape(3, 4) % 3
    masks = coco._fortran_masks(m, [0, 2])
    assert masks.flags.f_contiguous and masks.dtype == np.uint8 and masks.shape == (3, 4, 2)
    assert np.array_equal(masks[:, :, 1], (m == 2).astype(np.uint8))
