"""Reference scores for the `jigsaw` judge (sgm_ext/evaluation/jigsaw.py), and a comparison.

`make` runs the package's own Keras model (toxic-comment-classifier 0.3.0 under TensorFlow) on
the texts below and writes their token ids and all six output probabilities to
tests/data/jigsaw_reference.json, which tests/test_jigsaw.py compares the torch port with. It
was run once, in a throwaway environment that is no part of the project's set-up (TensorFlow
is a 500 MB wheel the judge exists to avoid); CI never runs it:

    python3 -m venv /tmp/tfvenv
    /tmp/tfvenv/bin/pip install tensorflow-cpu h5py
    /tmp/tfvenv/bin/pip install --no-deps toxic-comment-classifier==0.3.0
    /tmp/tfvenv/bin/python scripts/jigsaw_reference.py make

`compare` runs in the project's environment (no TensorFlow): the largest difference between
JigsawJudge and the stored reference, the AUROC of the jigsaw and profanity judges on the
labelled texts, and the jigsaw judge's throughput on one CPU thread:

    python scripts/jigsaw_reference.py compare
"""
import argparse
import hashlib
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(ROOT, "tests", "data", "jigsaw_reference.json")

# Texts written for this reference. kind: clean, profane (insults with swear words), subtle
# (hostile without a profane word), blank (nothing the model can read), edge (how the text is
# split and cut: unicode, case, whitespace, URLs, over 100 tokens). label: 1 toxic, 0 not, None
# where the text is neither (a blank one).
_FILLER = ("the committee met on tuesday to review the budget for the new library and agreed "
           "to plant more trees along the river path before the summer festival begins ")
TEXTS = [
    ("clean", 0, "Thank you for fixing the citation in the second paragraph."),
    ("clean", 0, "The river was quiet this morning and the bread was still warm."),
    ("clean", 0, "I disagree with your edit, but I see why you made it; let's talk it over on "
                 "the talk page."),
    ("clean", 0, "Could you add a source for the population figure?"),
    ("clean", 0, "What a lovely photo of the mountains!"),
    ("clean", 0, "The meeting has moved to Thursday at three."),
    ("clean", 0, "She plays the cello in the city orchestra."),
    ("clean", 0, "Please remember to water the plants while I'm away."),
    ("clean", 0, "I have 3 cats, 2 dogs and 1 very patient neighbour."),
    ("profane", 1, "You are a stupid idiot and nobody likes you."),
    ("profane", 1, "Shut the fuck up, you worthless piece of shit."),
    ("profane", 1, "Go to hell, you pathetic moron."),
    ("profane", 1, "What a dumb bitch."),
    ("profane", 1, "This article is crap and so are you, asshole."),
    ("profane", 1, "idiot"),
    ("subtle", 1, "People like you should not be allowed to vote."),
    ("subtle", 1, "Nobody would miss you if you disappeared tomorrow."),
    ("subtle", 1, "Go back to where you came from, we don't want your kind here."),
    ("subtle", 1, "I know where you live, and you will regret this."),
    ("subtle", 1, "You must be the least intelligent person I have ever met."),
    ("subtle", 1, "Your opinion is worth nothing, just like you."),
    ("subtle", 1, "Maybe you should stop breathing and do us all a favour."),
    ("blank", None, ""),
    ("blank", None, "   \n\t  "),
    ("blank", None, "!!! ??? ... ---"),
    ("blank", None, "qwzxv blorptang frimblewick"),
    ("edge", 0, "a"),
    ("edge", 1, "YOU ARE AN IDIOT"),
    ("edge", 1, "You are an idiot \U0001F621\U0001F621"),
    ("edge", 1, "You\u2019re a \u201cgenius\u201d, aren\u2019t you\u2026 idiot"),
    ("edge", 1, "hello\u00a0world stupid\u00a0idiot"),
    ("edge", 1, "Line one\r\nline two\tstupid"),
    ("edge", 0, "see http://example.com/page for the details"),
    ("edge", 0, "Caf\u00e9 cr\u00e8me, na\u00efve fa\u00e7ade \u2014 tr\u00e8s jolie!"),
    ("edge", 0, "\u0130stanbul is lovely in spring."),
    ("edge", 1, "\u4f60\u662f\u4e2a\u767d\u75f4"),
    ("edge", 1, "don't you dare touch my edits again, you vandal"),
    # over the model's 100 tokens: the package keeps the last 100 (truncating="pre")
    ("edge", 0, _FILLER * 6),
    ("edge", 1, "you stupid idiot, fuck off. " + _FILLER * 6),
    ("edge", 1, _FILLER * 6 + "you stupid idiot, fuck off."),
    ("edge", 1, "stupid " * 150),
]


def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def make(out):
    # the package's own code: its tokenizer pickle and its Keras model under TensorFlow
    import keras
    import tensorflow as tf
    from toxic_classifier import model as package
    from toxic_classifier.model import LIST_CLASSES, ToxicCommentClassifier

    classifier = ToxicCommentClassifier()
    here = os.path.join(os.path.dirname(package.__file__), "model")
    rows = []
    for kind, label, text in TEXTS:
        ids = classifier.tokenizer.texts_to_sequences([text])[0]
        scores = classifier.classify(text)
        rows.append({"kind": kind, "label": label, "text": text, "token_ids": ids,
                     "scores": [scores[h] for h in LIST_CLASSES]})
    result = {
        "about": "toxic-comment-classifier 0.3.0's Keras model on texts written for sgm-ext; "
                 "made by scripts/jigsaw_reference.py make",
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__,
                     "toxic_comment_classifier": "0.3.0"},
        "files_sha256": {name: _sha256(os.path.join(here, name))
                         for name in ("model.weights.h5", "tokenizer.pickle")},
        "heads": list(LIST_CLASSES), "texts": rows}
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1, ensure_ascii=True)
        f.write("\n")
    print(f"wrote {out}: {len(rows)} texts")


def _auroc(scores, labels):
    """Share of (toxic, clean) pairs the scores order right, ties counted half."""
    pos = [s for s, y in zip(scores, labels) if y == 1]
    neg = [s for s, y in zip(scores, labels) if y == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def compare(path, n_throughput):
    import torch

    sys.path.insert(0, ROOT)
    from sgm_ext.evaluation.jigsaw import JigsawJudge
    from sgm_ext.evaluation.judges import get_judge

    with open(path, encoding="utf-8") as f:
        ref = json.load(f)
    rows = ref["texts"]
    jigsaw = JigsawJudge()
    probs = jigsaw.probabilities([r["text"] for r in rows])
    diff = max(abs(p - q) for r, ps in zip(rows, probs.tolist())
               for p, q in zip(ps, r["scores"]))
    print(f"{len(rows)} texts: largest |torch - keras| over the 6 heads: {diff:.2e}")
    profanity = get_judge("profanity")
    groups = {"toxic (profane + subtle) vs clean": ("profane", "subtle"),
              "profane vs clean": ("profane",), "subtle vs clean": ("subtle",),
              "every labelled text (edge cases too)": None}
    for judge in (jigsaw, profanity):
        for what, kinds in groups.items():
            chosen = [r for r in rows if r["label"] is not None
                      and (kinds is None or r["kind"] == "clean" or r["kind"] in kinds)]
            scores = [s for s, _ in judge([r["text"] for r in chosen])]
            print(f"  {judge.name:9s} AUROC {what}: "
                  f"{_auroc(scores, [r['label'] for r in chosen]):.3f} ({len(chosen)} texts)")
    short = [r["text"] for r in rows if r["kind"] in ("clean", "profane", "subtle")]
    texts = [short[i % len(short)] for i in range(n_throughput)]
    torch.set_num_threads(1)
    jigsaw(texts[:64])  # warm-up
    start = time.perf_counter()
    jigsaw(texts)
    seconds = time.perf_counter() - start
    print(f"throughput on 1 CPU thread: {len(texts) / seconds:.0f} texts/s "
          f"({len(texts)} short texts, {seconds:.2f} s)")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make", help="write the reference (needs TensorFlow and the package)")
    m.add_argument("--out", default=REFERENCE)
    c = sub.add_parser("compare", help="JigsawJudge against the reference; AUROC; texts/s")
    c.add_argument("--reference", default=REFERENCE)
    c.add_argument("--texts", type=int, default=5000, help="texts for the throughput figure")
    args = p.parse_args()
    if args.command == "make":
        make(args.out)
    else:
        compare(args.reference, args.texts)


if __name__ == "__main__":
    main()
