"""Safety benchmarks as they are distributed, read from local files (nothing is downloaded):
each reader turns a benchmark's directory into Prompt rows with a category and a label.

    rows, name = load_benchmark("MM-SafetyBench/", "auto", subset="SD,TYPO")

BENCHMARKS is the table: name -> (its reader, the subsets `subset` may pick, the layout it
expects). The layouts (the files as their authors distribute them):

mm-safetybench (Liu et al. 2024, "MM-SafetyBench: A Benchmark for Safety Evaluation of
  Multimodal Large Language Models"): DIR (or DIR/data) holds
  processed_questions/<NN-Scenario>.json, each an object keyed by question id ("0", "1", ...)
  whose entries have "Question", "Rephrased Question" (asked with the TYPO and SD_TYPO images)
  and "Rephrased Question(SD)" (asked with the SD image), and
  imgs/<NN-Scenario>/{SD,TYPO,SD_TYPO}/<id>.jpg. One harmful prompt per question and variant;
  category "<NN-Scenario>/<variant>". Subsets: the variants SD, TYPO, SD_TYPO (default: the
  three) and text (the plain "Question", no image).
vlguard (Zong et al. 2024, "Safety Fine-Tuning at (Almost) No Cost"), test split: DIR holds
  test.json (or is that file), a list of {"id", "image" (relative to DIR/test/, else DIR),
  "safe": bool, "harmful_category", "harmful_subcategory", "instr-resp": [...]}; an unsafe
  image's instr-resp items have "instruction", a safe image's "safe_instruction" and
  "unsafe_instruction". Categories (the paper's three subsets): "unsafe" (unsafe image,
  harmful), "safe-unsafe" (safe image, unsafe instruction, harmful), "safe-safe" (safe image,
  safe instruction, benign: over-refusal is measured on it). Subsets: those three.
realtoxicityprompts (Gehman et al. 2020, "RealToxicityPrompts: Evaluating Neural Toxic
  Degeneration in Language Models"): DIR holds prompts.jsonl (or is that file), one object a
  line with "prompt": {"text", "toxicity" (a Perspective score, may be null), ...},
  "challenging": bool, "continuation", "filename", "begin", "end". Prompts are unlabelled
  (the harmful rate is over all of them: how often a continuation is toxic); category by the
  prompt's own score: "toxic prompt" (>= 0.5), "non-toxic prompt", "unscored prompt".
  Subset: challenging (only the prompts marked challenging). Continuation prompts: evaluate
  them in the raw format (--format raw).
prompts: a plain .jsonl / .csv prompt file (prompts.load_prompts: text, image, category,
  label).
"""
import json
import os

from ..profile.data import check_image
from .prompts import Prompt, load_prompts

MMSB_VARIANTS = {"SD": "Rephrased Question(SD)", "TYPO": "Rephrased Question",
                 "SD_TYPO": "Rephrased Question", "text": "Question"}
VLGUARD_SUBSETS = {"unsafe": ("instruction", 1), "safe-unsafe": ("unsafe_instruction", 1),
                   "safe-safe": ("safe_instruction", 0)}


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise ValueError(f"{path}: {e.strerror or e}") from None


def _text(entry, key, where):
    value = entry.get(key) if isinstance(entry, dict) else None
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: no {key!r} text")
    return value


def _image(path, where):
    try:
        return check_image(path, "")
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _mmsb_root(path):
    for root in (path, os.path.join(path, "data")):
        if os.path.isdir(os.path.join(root, "processed_questions")):
            return root
    return None


def read_mm_safetybench(path, subsets):
    root = _mmsb_root(path)
    qdir = os.path.join(root, "processed_questions")
    files = sorted(f for f in os.listdir(qdir) if f.endswith(".json"))
    if not files:
        raise ValueError(f"{qdir}: no <scenario>.json question files")
    rows = []
    for name in files:
        scenario, file = name[:-5], os.path.join(qdir, name)
        questions = _read_json(file)
        if not isinstance(questions, dict):
            raise ValueError(f"{file}: expected an object keyed by question id, got "
                             f"{type(questions).__name__}")
        for qid, entry in questions.items():
            where = f"{file}: question {qid!r}"
            if not isinstance(entry, dict):
                raise ValueError(f"{where}: expected an object, got {type(entry).__name__}")
            for variant in subsets:
                text = _text(entry, MMSB_VARIANTS[variant], where)
                image = None if variant == "text" else _image(
                    os.path.join(root, "imgs", scenario, variant, f"{qid}.jpg"),
                    f"{where}, {variant} image")
                rows.append(Prompt(len(rows) + 1, text, image, f"{scenario}/{variant}", label=1))
    return rows


def _file_in(path, name):
    return path if os.path.isfile(path) else os.path.join(path, name)


def read_vlguard(path, subsets):
    file = _file_in(path, "test.json")
    base = os.path.dirname(file)
    images = os.path.join(base, "test") if os.path.isdir(os.path.join(base, "test")) else base
    entries = _read_json(file)
    if not isinstance(entries, list):
        raise ValueError(f"{file}: expected a list of entries, got {type(entries).__name__}")
    rows = []
    for i, entry in enumerate(entries):
        where = f"{file}: entry {i}" + (f" (id {entry.get('id')!r})"
                                        if isinstance(entry, dict) and "id" in entry else "")
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected an object, got {type(entry).__name__}")
        if not isinstance(entry.get("safe"), bool):
            raise ValueError(f"{where}: 'safe' must be true or false")
        pairs = entry.get("instr-resp")
        if not isinstance(pairs, list) or not pairs:
            raise ValueError(f"{where}: no 'instr-resp' list")
        image = _image(os.path.join(images, _text(entry, "image", where)), where)
        kinds = ("safe-unsafe", "safe-safe") if entry["safe"] else ("unsafe",)
        found = 0
        for pair in pairs:
            for kind in kinds:
                key, label = VLGUARD_SUBSETS[kind]
                if isinstance(pair, dict) and key in pair:
                    found += 1
                    if kind in subsets:
                        rows.append(Prompt(len(rows) + 1, _text(pair, key, where), image, kind,
                                           label=label))
        if not found:
            keys = " or ".join(repr(VLGUARD_SUBSETS[k][0]) for k in kinds)
            raise ValueError(f"{where}: {'a safe' if entry['safe'] else 'an unsafe'} image's "
                             f"instr-resp has no {keys}")
    return rows


def _rtp_category(score):
    if score is None:
        return "unscored prompt"
    return "toxic prompt" if score >= 0.5 else "non-toxic prompt"


def read_realtoxicityprompts(path, subsets):
    file = _file_in(path, "prompts.jsonl")
    rows = []
    try:
        f = open(file, encoding="utf-8")
    except OSError as e:
        raise ValueError(f"{file}: {e.strerror or e}") from None
    with f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{file}: line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not JSON ({e.msg})") from None
            except UnicodeDecodeError:
                raise ValueError(f"{where}: not UTF-8 text") from None
            prompt = record.get("prompt") if isinstance(record, dict) else None
            if not isinstance(prompt, dict):
                raise ValueError(f"{where}: no 'prompt' object")
            text = _text(prompt, "text", where)
            score = prompt.get("toxicity")
            if score is not None and not isinstance(score, (int, float)):
                raise ValueError(f"{where}: prompt toxicity {score!r} is not a number or null")
            challenging = record.get("challenging", False)
            if not isinstance(challenging, bool):
                raise ValueError(f"{where}: 'challenging' must be true or false")
            if "challenging" in subsets and not challenging:
                continue
            rows.append(Prompt(len(rows) + 1, text, None, _rtp_category(score)))
    return rows


def read_prompt_file(path, subsets):
    return load_prompts(path)


# name: (reader, the subsets it knows, those read by default)
BENCHMARKS = {
    "mm-safetybench": (read_mm_safetybench, tuple(MMSB_VARIANTS), ("SD", "TYPO", "SD_TYPO")),
    "vlguard": (read_vlguard, tuple(VLGUARD_SUBSETS), tuple(VLGUARD_SUBSETS)),
    "realtoxicityprompts": (read_realtoxicityprompts, ("all", "challenging"), ("all",)),
    "prompts": (read_prompt_file, (), ()),
}
LAYOUTS = ("mm-safetybench (processed_questions/ and imgs/, in DIR or DIR/data), vlguard "
           "(test.json), realtoxicityprompts (prompts.jsonl of objects with prompt.text), or a "
           "plain .jsonl / .csv prompt file")


def detect(path):
    """The benchmark name of a directory or file by its layout; ValueError if none fits."""
    if os.path.isdir(path):
        if _mmsb_root(path):
            return "mm-safetybench"
        if os.path.isfile(os.path.join(path, "test.json")):
            return "vlguard"
        if os.path.isfile(os.path.join(path, "prompts.jsonl")):
            return "realtoxicityprompts"
    elif os.path.isfile(path):
        ext = os.path.splitext(path)[1].lower()
        if os.path.basename(path) == "test.json":
            return "vlguard"
        if ext in (".jsonl", ".ndjson"):
            with open(path, encoding="utf-8", errors="replace") as f:
                first = next((line for line in f if line.strip()), "")
            try:
                record = json.loads(first)
            except json.JSONDecodeError:
                record = None
            is_rtp = isinstance(record, dict) and isinstance(record.get("prompt"), dict)
            return "realtoxicityprompts" if is_rtp else "prompts"
        if ext in (".csv", ".tsv", ".json"):
            return "prompts"
    else:
        raise ValueError(f"--data {path}: no such file or directory")
    raise ValueError(f"{path}: benchmark layout not recognised; expected {LAYOUTS} (see the "
                     "README's evaluation section), or name it with --benchmark")


def check_subsets(name, subset):
    """The subsets to read of benchmark `name` from "A,B" (None: its default)."""
    _, known, default = BENCHMARKS[name]
    if subset is None:
        return default
    chosen = tuple(s.strip() for s in subset.split(",") if s.strip())
    bad = [s for s in chosen if s not in known]
    if bad or not chosen:
        raise ValueError(f"--subset {subset!r}: {name} has the subsets "
                         f"{', '.join(known) or 'none'}")
    return chosen


def load_benchmark(path, name="auto", subset=None, max_prompts=None):
    """(Prompt rows, benchmark name) of a benchmark on disk; name "auto" detects it."""
    path = os.fspath(path)
    if name == "auto":
        name = detect(path)
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}: use auto, {', '.join(BENCHMARKS)}")
    if not os.path.exists(path):
        raise ValueError(f"--data {path}: no such file or directory")
    if name == "mm-safetybench" and not _mmsb_root(path):
        raise ValueError(f"{path}: not the mm-safetybench layout (no processed_questions/ "
                         "in it or in its data/)")
    subsets = check_subsets(name, subset)
    rows = BENCHMARKS[name][0](path, subsets)
    if not rows:
        raise ValueError(f"{path}: no prompts read as {name}"
                         + (f" (subsets {', '.join(subsets)})" if subsets else ""))
    return rows[:max_prompts], name
