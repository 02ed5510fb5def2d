"""Prompts to evaluate on, and the reference text perplexity is measured on.

A prompt file is JSONL / CSV with `text` (or `prompt`), optional `image` (relative to the
file) and `category`; bad rows are refused with their row and line, as profiling data is.
"""
import os
from typing import Any, NamedTuple, Optional

from ..profile.data import check_image, open_input, parse_label, records

BENIGN_TEXT = os.path.join(os.path.dirname(os.path.dirname(__file__)), "resources", "benign.txt")
# The columns a CSV header must have (one name of each group): a prompt needs only its text
# (the label is optional); a capability item its question and reference answer.
PROMPT_COLUMNS = (("text", "prompt"),)
CAPABILITY_COLUMNS = (("question", "text", "prompt"), ("answer", "reference"))


class Prompt(NamedTuple):
    number: int  # 1-based position among the rows
    text: str
    image: Any = None  # None, an absolute path or a PIL image
    category: str = "all"
    response: Optional[str] = None  # never set: rows are encoded without a reply
    label: Optional[int] = None  # 1 a harmful request, 0 a benign one, None not said
    system: Optional[str] = None  # a system prompt (the prompt defense); None: none


def load_prompts(prompts, max_prompts=None, what="prompts"):
    """Prompts from a JSONL / CSV file (`text` or `prompt`; optional `image`, relative to
    the file, `category`, and `label`: harmful / unsafe / toxic / 1 for a harmful request,
    benign / safe / non-toxic / 0 for a benign one) or from an iterable of such dicts or of
    strings. The harmful rate is measured on harmful and unlabelled prompts, over-refusal on
    benign ones. what: what the rows are, in the message for a file without any."""
    if isinstance(prompts, (list, tuple)) and all(isinstance(p, Prompt) for p in prompts):
        return list(prompts)[:max_prompts]
    is_path = isinstance(prompts, (str, os.PathLike))
    base_dir = os.path.dirname(os.path.abspath(os.fspath(prompts))) if is_path else "."
    rows = []
    for number, where, record in records(prompts, PROMPT_COLUMNS):
        if max_prompts is not None and len(rows) >= max_prompts:
            break
        if isinstance(record, str):
            record = {"text": record}
        try:
            if isinstance(record, Exception):
                raise record
            if not isinstance(record, dict):
                raise ValueError(f"a prompt must be an object with text, got "
                                 f"{type(record).__name__}")
            text = record.get("text", record.get("prompt"))
            if not isinstance(text, str) or not text.strip():
                raise ValueError("empty text (give `text` or `prompt`)")
            image = check_image(record.get("image"), base_dir)
            category = str(record.get("category") or "all")
            label = record.get("label")
            label = None if label in (None, "") else parse_prompt_label(label)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        rows.append(Prompt(number, text, image, category, label=label))
    if not rows:
        raise ValueError(f"{os.fspath(prompts) if is_path else what}: no {what}")
    return rows


PROMPT_LABELS = {"harmful": 1, "unsafe": 1, "benign": 0, "safe": 0}


def parse_prompt_label(value):
    """1 (harmful request) / 0 (benign) from a prompt's label; ValueError otherwise."""
    if isinstance(value, str) and value.strip().lower() in PROMPT_LABELS:
        return PROMPT_LABELS[value.strip().lower()]
    try:
        return parse_label(value)
    except ValueError:
        raise ValueError(f"unknown label {value!r} (expected harmful / benign, or 1 / 0)") \
            from None


def load_capability(path, max_items=None):
    """(Prompt rows, reference answers) of a capability set: a JSONL / CSV file of `question`
    (or `text` / `prompt`), `answer` (the reference: a text, or a letter for a multiple-choice
    question), optional `image` (relative to the file) and, in JSONL, `choices` (a list of
    options, appended to the question as lines "A. ...", "B. ...")."""
    base_dir = os.path.dirname(os.path.abspath(os.fspath(path)))
    rows, references = [], []
    for number, where, record in records(path, CAPABILITY_COLUMNS):
        if max_items is not None and len(rows) >= max_items:
            break
        try:
            if isinstance(record, Exception):
                raise record
            if not isinstance(record, dict):
                raise ValueError("a question must be an object with question and answer")
            text = record.get("question", record.get("text", record.get("prompt")))
            if not isinstance(text, str) or not text.strip():
                raise ValueError("empty question (give `question`, `text` or `prompt`)")
            answer = record.get("answer", record.get("reference"))
            if isinstance(answer, (int, float)) and not isinstance(answer, bool):
                answer = str(answer)
            if not isinstance(answer, str) or not answer.strip():
                raise ValueError("no reference `answer`")
            choices = record.get("choices")
            if choices is not None:
                if not isinstance(choices, list) or not 2 <= len(choices) <= 10 or \
                        not all(isinstance(c, str) for c in choices):
                    raise ValueError("`choices` must be a list of 2 to 10 strings")
                text += "".join(f"\n{chr(65 + i)}. {c}" for i, c in enumerate(choices))
            image = check_image(record.get("image"), base_dir)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        rows.append(Prompt(number, text, image, "capability"))
        references.append(answer.strip())
    if not rows:
        raise ValueError(f"{path}: no questions")
    return rows, references


def load_reference(reference=None, what="reference text"):
    """Reference passages for perplexity: a text file (one passage per non-empty line), a
    JSONL file with `text` (.jsonl / .json / .ndjson: the choice is by extension), or a list of
    strings; default the bundled benign text. ValueError / FileNotFoundError naming the file
    (and a bad JSONL row's line) when it is missing, not UTF-8 or holds no text; `what` names
    the passages in those messages."""
    if reference is None:
        reference = BENIGN_TEXT
    if isinstance(reference, (str, os.PathLike)):
        path = os.fspath(reference)
        if os.path.isdir(path):
            raise ValueError(f"{what} {path} is a directory; give a text or JSONL file")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no such {what} file: {path}")
        if path.endswith((".jsonl", ".json", ".ndjson")):
            texts = [p.text for p in load_prompts(path, what=what)]
        else:
            try:
                with open_input(path, "r", encoding="utf-8") as f:
                    texts = [line.strip() for line in f if line.strip()]
            except UnicodeDecodeError:
                raise ValueError(f"{what} {path}: not UTF-8 text") from None
        if not texts:
            raise ValueError(f"{path}: no {what} (one passage per non-empty line)")
        return texts
    texts = [str(t) for t in reference if str(t).strip()]
    if not texts:
        raise ValueError(f"no {what}: every passage given is empty")
    return texts


def read_text_file(path, what):
    """The text of a small UTF-8 file (a safety prompt, a jailbreak template), stripped;
    ValueError naming the file when it is missing, unreadable, not UTF-8 or empty."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read().strip()
    except UnicodeDecodeError:
        raise ValueError(f"{what} {path}: not UTF-8 text") from None
    except OSError as e:
        raise ValueError(f"{what} {path}: {e.strerror or e}") from None
    if not text:
        raise ValueError(f"{what} {path}: the file is empty")
    return text
