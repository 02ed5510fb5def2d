"""Labelled profiling data: JSONL / CSV files or iterables of rows, checked before any forward.

A row has `text` (non-empty), `label` (1 / 0, true / false, "toxic" / "non-toxic"), and
optionally `image` (a path, relative to the data file, or a PIL image) and `response` (an
assistant reply: the chat is then user text + assistant response, and pooling can be limited
to the response). Rows are numbered from 1 in the order they come (a file's header and blank
lines are not rows); a bad row stops the read with its number, or with skip_bad_rows=True is
left out and counted.
"""
import codecs
import csv
import hashlib
import json
import os
import re
from typing import Any, NamedTuple, Optional

# How a data file was made, beside it: `<file>.provenance.json` (sgm-ext sample and the efficacy
# benchmark write one); its `format` is the input format the rows were sampled in.
PROVENANCE_SUFFIX = ".provenance.json"

LABELS = {"1": 1, "0": 0, "true": 1, "false": 0, "toxic": 1, "non-toxic": 0, "non_toxic": 0,
          "nontoxic": 0, "not toxic": 0}


_ESCAPED = re.compile("[\udc80-\udcff]")  # bytes that were not UTF-8, after surrogateescape


class BadRowError(ValueError):
    """A data row that cannot be profiled; the message names the row."""


class Row(NamedTuple):
    number: int  # 1-based position among the data rows
    text: str
    label: int  # 1 toxic, 0 non-toxic
    image: Any = None  # None, an absolute path, or a PIL image
    response: Optional[str] = None


class Dataset(NamedTuple):
    rows: list
    skipped: list  # [(row number, reason)] of the rows left out by skip_bad_rows
    source: str

    def fingerprint(self):
        """Hash of the rows' contents (image bytes included): equal data, equal fingerprint."""
        h = hashlib.sha256()
        for row in self.rows:
            h.update(json.dumps([row.text, row.label, row.response]).encode())
            h.update(_image_digest(row.image))
        return h.hexdigest()[:16]


def _image_digest(image):
    if image is None:
        return b"-"
    if isinstance(image, str):
        with open(image, "rb") as f:
            return hashlib.sha256(f.read()).digest()
    return hashlib.sha256(image.tobytes() + str((image.mode, image.size)).encode()).digest()


def parse_label(value):
    """1 / 0 from the accepted label spellings; ValueError otherwise."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return int(value)
    if isinstance(value, str) and value.strip().lower() in LABELS:
        return LABELS[value.strip().lower()]
    raise ValueError(f"unknown label {value!r} (expected 1 / 0 or 'toxic' / 'non-toxic')")


def check_image(image, base_dir):
    """An absolute path of a readable image, or the PIL image itself; ValueError otherwise."""
    if image is None or (isinstance(image, str) and not image.strip()):
        return None
    if isinstance(image, (str, os.PathLike)):
        path = os.path.join(base_dir, os.fspath(image))
        if not os.path.isfile(path):
            raise ValueError(f"image {os.fspath(image)!r} not found (looked for {path})")
        from PIL import Image

        try:
            Image.open(path).close()  # reads the header only
        except Exception as e:
            raise ValueError(f"image {os.fspath(image)!r} is not a readable image ({e})") from None
        return os.path.abspath(path)
    if hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image
        return image
    raise ValueError(f"image must be a path or a PIL image, got {type(image).__name__}")


def check_row(record, number, base_dir="."):
    """Row from one raw record (a dict); ValueError saying what is wrong with it."""
    if not isinstance(record, dict):
        raise ValueError("a row must be an object with text and label, got "
                         f"{type(record).__name__}")
    text = record.get("text")
    if not isinstance(text, str) or not text.strip():
        raise ValueError("empty text" if text is None or isinstance(text, str)
                         else f"text must be a string, got {type(text).__name__}")
    if "label" not in record or record["label"] in (None, ""):
        raise ValueError("missing label")
    label = parse_label(record["label"])
    response = record.get("response") or None
    if response is not None and not isinstance(response, str):
        raise ValueError(f"response must be a string, got {type(response).__name__}")
    return Row(number, text, label, check_image(record.get("image"), base_dir), response)


# The columns a CSV header must have: one name of each group (a reader takes the first it
# finds). Labelled rows need text and label; prompt files (evaluation/prompts.py) only text.
ROW_COLUMNS = (("text",), ("label",))


def records(data, columns=ROW_COLUMNS):
    """(row number, where, record or the error reading it) for a path or an iterable.
    columns: the groups of names a CSV header must have one of (ROW_COLUMNS: text and label).
    A file that cannot be opened is a ValueError naming it, not a bare [Errno 2]."""
    if isinstance(data, (str, os.PathLike)):
        path = os.fspath(data)
        ext = os.path.splitext(path)[1].lower()
        if ext in (".jsonl", ".json", ".ndjson"):
            yield from _jsonl(path)
        elif ext in (".csv", ".tsv"):
            yield from _csv(path, "\t" if ext == ".tsv" else ",", columns)
        else:
            raise ValueError(f"{path}: unknown data file type {ext!r} (use .jsonl or .csv)")
    else:
        for i, record in enumerate(data, 1):
            yield i, f"row {i}", record


def _jsonl(path):
    """Rows of a JSONL file, decoded line by line: a line that is not UTF-8 is that row's
    error (skippable), not the whole file's; a UTF-8 byte order mark is accepted."""
    number = 0
    with open_input(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            if line_no == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                number += 1
                yield number, f"{path} row {number} (line {line_no})", _not_utf8(e)
                continue
            if not line.strip():
                continue
            number += 1
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                record = ValueError(f"not valid JSON ({e.msg})")
            yield number, f"{path} row {number} (line {line_no})", record


def _not_utf8(error):
    return ValueError(f"not valid UTF-8 (byte 0x{error.object[error.start]:02x} at column "
                      f"{error.start + 1}); save the file as UTF-8")


def open_input(path, mode, **kwargs):
    """open(), with a file that cannot be opened (missing, a directory, no permission) a
    one-line ValueError naming it."""
    try:
        return open(path, mode, **kwargs)
    except OSError as e:
        raise ValueError(f"{path}: {e.strerror or e}") from None


def _csv(path, delimiter, columns):
    # surrogateescape keeps bytes that are not UTF-8 as lone surrogates, so the row holding
    # them can be named (and skipped) instead of the whole file failing
    with open_input(path, "r", encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        missing = [" or ".join(group) for group in columns
                   if not set(group) & set(reader.fieldnames or ())]
        if missing:
            raise ValueError(f"{path}: the header has no {' / '.join(missing)} column "
                             f"(columns: {reader.fieldnames})")
        for number, record in enumerate(reader, 1):
            where = f"{path} row {number} (line {reader.line_num})"
            bad = next((v for v in record.values() if isinstance(v, str) and _ESCAPED.search(v)),
                       None)
            if bad is not None:
                raw = bad.encode("utf-8", "surrogateescape")
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    record = _not_utf8(e)
            yield number, where, record


def load_rows(data, *, skip_bad_rows=False, max_samples=None):
    """Dataset of checked rows from a JSONL / CSV path or an iterable of dicts.

    A bad row (empty text, unknown or missing label, missing or unreadable image, broken
    JSON) raises BadRowError naming it, or with skip_bad_rows is left out and recorded in
    Dataset.skipped. max_samples keeps the first N good rows.
    """
    is_path = isinstance(data, (str, os.PathLike))
    base_dir = os.path.dirname(os.path.abspath(os.fspath(data))) if is_path else "."
    rows, skipped = [], []
    for number, where, record in records(data):
        if max_samples is not None and len(rows) >= max_samples:
            break
        try:
            if isinstance(record, Exception):
                raise record
            rows.append(check_row(record, number, base_dir))
        except ValueError as e:
            if not skip_bad_rows:
                raise BadRowError(f"{where}: {e} (pass skip_bad_rows / --skip-bad-rows to skip "
                                  "bad rows)") from None
            skipped.append((number, str(e)))
    if not rows:
        raise ValueError(f"{os.fspath(data) if is_path else 'data'}: no usable rows"
                         + (f" ({len(skipped)} bad rows skipped)" if skipped else ""))
    return Dataset(rows, skipped, os.fspath(data) if is_path else "<rows>")


def provenance_of(path):
    """The provenance record beside a data file (`<path>.provenance.json`, a JSON object), or
    None when there is none or it cannot be read as one."""
    try:
        with open(os.fspath(path) + PROVENANCE_SUFFIX, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def recorded_format(path):
    """The input format ("chat" / "raw") the rows of a data file were sampled in, as its
    provenance record says, or None when it says none."""
    info = provenance_of(path) if isinstance(path, (str, os.PathLike)) else None
    fmt = (info or {}).get("format")
    return fmt if fmt in ("chat", "raw") else None
