"""Labelled data readers: JSONL / CSV / iterables, label spellings, bad rows named by number."""
import json

import pytest
from PIL import Image

from sgm_ext.profile.data import BadRowError, load_rows


@pytest.fixture
def image_dir(tmp_path):
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    return tmp_path


def _jsonl(path, records):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def test_jsonl_and_csv_rows(image_dir):
    p = _jsonl(image_dir / "d.jsonl", [
        {"text": "a", "label": 1}, "", {"text": "b", "label": "non-toxic", "image": "ok.png"},
        {"text": "c", "label": "Toxic", "response": "r"}, {"text": "d", "label": False}])
    ds = load_rows(p)
    assert [(r.number, r.text, r.label) for r in ds.rows] == [(1, "a", 1), (2, "b", 0),
                                                               (3, "c", 1), (4, "d", 0)]
    assert ds.rows[1].image == str(image_dir / "ok.png")  # relative to the data file
    assert ds.rows[2].response == "r"
    c = image_dir / "d.csv"
    c.write_text('text,label,image\n"x, y",0,\nz,toxic,ok.png\n')
    rows = load_rows(c).rows
    assert [(r.text, r.label, r.image) for r in rows] == [("x, y", 0, None),
                                                          ("z", 1, str(image_dir / "ok.png"))]
    assert load_rows(p, max_samples=2).rows[-1].text == "b"
    assert load_rows(p).fingerprint() == load_rows(p).fingerprint()
    assert load_rows(p).fingerprint() != load_rows(p, max_samples=3).fingerprint()


@pytest.mark.parametrize("bad, message", [
    ({"text": "", "label": 1}, "empty text"),
    ({"label": 1}, "empty text"),
    ({"text": "t", "label": "maybe"}, "unknown label 'maybe'"),
    ({"text": "t", "label": 2}, "unknown label 2"),
    ({"text": "t"}, "missing label"),
    ({"text": "t", "label": 1, "image": "gone.png"}, "image 'gone.png' not found"),
    ({"text": "t", "label": 1, "image": "broken.png"},
     "image .broken.png. is not a readable image"),
    ("{not json", "not valid JSON"),
])
def test_bad_row_named_by_number(image_dir, bad, message):
    p = _jsonl(image_dir / "d.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": 0}, bad,
                                       {"text": "c", "label": 0}])
    with pytest.raises(BadRowError, match=rf"d.jsonl row 3 \(line 3\): {message}"):
        load_rows(p)
    ds = load_rows(p, skip_bad_rows=True)
    assert [r.number for r in ds.rows] == [1, 2, 4]
    assert len(ds.skipped) == 1 and ds.skipped[0][0] == 3 and ds.skipped[0][1]


def test_bad_rows_in_csv_and_iterables(image_dir):
    c = image_dir / "d.csv"
    c.write_text("text,label\na,1\n,0\n")
    with pytest.raises(BadRowError, match=r"row 2 \(line 3\): empty text"):
        load_rows(c)
    (image_dir / "h.csv").write_text("sentence,label\na,1\n")
    with pytest.raises(ValueError, match="header has no text column"):
        load_rows(image_dir / "h.csv")
    with pytest.raises(BadRowError, match=r"^row 2: unknown label 'bad'"):
        load_rows([{"text": "a", "label": 1}, {"text": "b", "label": "bad"}])
    with pytest.raises(ValueError, match=r"no usable rows \(1 bad rows skipped\)"):
        load_rows([{"text": "", "label": 1}], skip_bad_rows=True)
    with pytest.raises(ValueError, match="unknown data file type"):
        load_rows(image_dir / "d.txt")
