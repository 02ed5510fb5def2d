"""Benchmarks of the profiler (sgm_ext.profile, sgm_ext.auroc).

    pytest bench/bench_profile.py --benchmark-only     # pytest-benchmark groups
    python bench/bench_profile.py                      # interleaved runs, ratios, markdown

AUROC: 100,000 neurons x 2,000 samples (float32 responses, half toxic). sgm-ext computes all
neurons in one call; the baseline is what AurA does, sklearn.metrics.roc_auc_score once per
neuron. sklearn is timed on a subset of neurons and its per-neuron time extrapolated to
100,000 (a full run would take minutes); the values are compared on that subset.

Collection: a small Llama (hidden 512, intermediate 1408, 4 layers, ~14M parameters) over
64 samples of 48 words, batch 8. "forward" is plain forward passes over the same batches,
already tokenized and padded, with logits for the last token only (what collect asks for);
"collect" is sgm_ext.profile.collect end to end (tokenizing, hooks on every mid site, mean
pooling, storing), "collect hooks only" the same forward passes with the pooling hooks but
without collect's tokenizing and storing.
"""
import argparse
import os
import sys

import numpy as np
import pytest
import torch

# bench/ is on sys.path (script or pytest)
from timing import command_line, environment, interleaved, medians, write_section

from sgm_ext import profile as P
from sgm_ext.profile.auroc import auroc
from sgm_ext.profile.pooling import Pooler, pooling_hooks, resolve_sites

NEURONS, SAMPLES, SKLEARN_SUBSET = 100_000, 2_000, 500
N_TEXTS, WORDS, BATCH = 64, 48, 8


# ------------------------------------------------------------------------ AUROC

def auroc_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(SAMPLES, NEURONS, generator=g)
    labels = torch.rand(SAMPLES, generator=g) < 0.5
    return scores, labels


def sklearn_per_neuron(scores, labels, neurons):
    from sklearn.metrics import roc_auc_score

    y = labels.numpy()
    x = scores[:, :neurons].numpy()
    return np.array([roc_auc_score(y, x[:, j]) for j in range(neurons)])


@pytest.fixture(scope="module")
def scores_labels():
    return auroc_data()


@pytest.mark.benchmark(group="auroc 100k neurons x 2k samples")
def test_auroc_sgm_ext(benchmark, scores_labels):
    scores, labels = scores_labels
    benchmark.pedantic(auroc, args=(scores, labels), rounds=3, iterations=1)


@pytest.mark.benchmark(group="auroc sklearn per neuron, 500 of the 100k neurons")
def test_auroc_sklearn_subset(benchmark, scores_labels):
    scores, labels = scores_labels
    benchmark.pedantic(sklearn_per_neuron, args=(scores, labels, SKLEARN_SUBSET), rounds=3,
                       iterations=1)


# ------------------------------------------------------------------------ collection

def small_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8, vocab_size=2048,
                         tie_word_embeddings=False, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]"] + [f"w{i}" for i in range(2000)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


def texts(seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(N_TEXTS):
        n = WORDS - int(torch.randint(0, 8, (1,), generator=g))  # some padding in each batch
        words = torch.randint(0, 2000, (n,), generator=g).tolist()
        rows.append({"text": " ".join(f"w{w}" for w in words), "label": i % 2})
    return rows


def encoded_batches(tok, rows):
    return [tok([r["text"] for r in rows[i:i + BATCH]], padding=True, return_tensors="pt")
            for i in range(0, len(rows), BATCH)]


def plain_forward(model, batches):
    with torch.inference_mode():
        for b in batches:
            model(**b, use_cache=False, logits_to_keep=1)


def hooked_forward(model, batches):
    site_map = resolve_sites(model)
    pooler = Pooler("mean")
    with pooling_hooks(model, site_map, pooler), torch.inference_mode():
        for b in batches:
            pooler.start(b["attention_mask"].bool())
            model(**b, use_cache=False, logits_to_keep=1)


def collect(model, tok, rows, input_format="raw"):
    """The profiler on the rows; raw text by default, the inputs the plain forward sees."""
    return P.collect(model, rows, processor=tok, batch_size=BATCH, input_format=input_format)


@pytest.fixture(scope="module")
def collection_setup():
    model, tok, rows = small_llama(), word_tokenizer(), texts()
    return model, tok, rows, encoded_batches(tok, rows)


@pytest.mark.benchmark(group="collection: 64 samples, small Llama")
def test_plain_forward(benchmark, collection_setup):
    model, _, _, batches = collection_setup
    benchmark.pedantic(plain_forward, args=(model, batches), rounds=5, warmup_rounds=1)


@pytest.mark.benchmark(group="collection: 64 samples, small Llama")
def test_hooked_forward(benchmark, collection_setup):
    model, _, _, batches = collection_setup
    benchmark.pedantic(hooked_forward, args=(model, batches), rounds=5, warmup_rounds=1)


@pytest.mark.benchmark(group="collection: 64 samples, small Llama")
def test_collect(benchmark, collection_setup):
    model, tok, rows, _ = collection_setup
    benchmark.pedantic(collect, args=(model, tok, rows), rounds=5, warmup_rounds=1)


# ------------------------------------------------------------------------ side-by-side run

def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--collection-rounds", type=int, default=7)
    parser.add_argument("--only", choices=("auroc", "collection"), default=None)
    parser.add_argument("--real", action="store_true",
                        help="collection on the pretrained SmolLM2-135M-Instruct")
    parser.add_argument("--write", action="store_true",
                        help="put each table into its section of bench/RESULTS.md")
    args = parser.parse_args()
    if os.environ.get("SGM_BENCH_THREADS"):  # e.g. 1 on a loaded machine (see bench_patch.py)
        torch.set_num_threads(int(os.environ["SGM_BENCH_THREADS"]))
    sections = {}
    if args.only != "collection":
        sections["bench_profile.py auroc"] = bench_auroc(args)
    if args.only != "auroc":
        sections["bench_profile.py collection" + (" real" if args.real else "")] = \
            bench_collection(args)
    threads = os.environ.get("SGM_BENCH_THREADS")
    prefix = f"SGM_BENCH_THREADS={threads} " if threads else ""
    header = f"`{prefix}{command_line('bench_profile.py', sys.argv[1:])}`; {environment()}"
    for name, body in sections.items():
        print(f"\n{header}\n\n{body}")
        if args.write:
            write_section(name, f"{header}\n\n{body}")


def bench_auroc(args):
    """sgm_ext.auroc on all neurons against sklearn per neuron, and on bf16-valued responses
    (many ties: the tie correction runs), interleaved."""
    scores, labels = auroc_data()
    tied = scores.bfloat16().float()
    ours = auroc(scores, labels)
    ref = sklearn_per_neuron(scores, labels, SKLEARN_SUBSET)
    diff = float(np.abs(ours[:SKLEARN_SUBSET].numpy() - ref).max())
    t = medians(interleaved({"sgm": lambda: auroc(scores, labels),
                             "ties": lambda: auroc(tied, labels),
                             "sklearn": lambda: sklearn_per_neuron(scores, labels, SKLEARN_SUBSET)},
                            rounds=args.rounds, clock="both"))
    scale = NEURONS / SKLEARN_SUBSET
    sk_wall, sk_cpu = (v * scale for v in t["sklearn"])
    lines = [f"AUROC {NEURONS} neurons x {SAMPLES} samples (median of {args.rounds}, interleaved)",
             "",
             "| implementation | wall | CPU (all threads) | wall vs sklearn | CPU vs sklearn |",
             "|---|---|---|---|---|",
             f"| sklearn roc_auc_score per neuron ({SKLEARN_SUBSET} timed, x{scale:.0f}) "
             f"| {sk_wall:.1f} s | {sk_cpu:.1f} s | 1x | 1x |"]
    for name, label in (("sgm", "sgm_ext.auroc (all neurons)"),
                        ("ties", "sgm_ext.auroc, bf16-valued responses (ties)")):
        wall, cpu = t[name]
        lines.append(f"| {label} | {wall:.2f} s | {cpu:.2f} s | {sk_wall / wall:.0f}x "
                     f"| {sk_cpu / cpu:.0f}x |")
    lines += ["", f"Largest difference from sklearn on the {SKLEARN_SUBSET} timed neurons: "
              f"{diff:.2e}; ties cost {t['ties'][1] / t['sgm'][1]:.2f}x the CPU time of "
              "continuous responses."]
    return "\n".join(lines)


def real_setup():
    """The pretrained SmolLM2-135M-Instruct, its tokenizer, and the bundled labelled rows of
    `sgm-ext demo --real` (raw text, as the forward-only baseline sees them)."""
    import json

    from sgm_ext.app import realmodel
    from sgm_ext.app.loading import load_model

    model, tok = load_model(realmodel.checkpoint(), "cpu", "float32")
    path = os.path.join(os.path.dirname(P.__file__), "resources", "real_profile.jsonl")
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    return model, tok, rows


def bench_collection(args):
    model, tok, rows = real_setup() if args.real else (small_llama(), word_tokenizer(), texts())
    batches = encoded_batches(tok, rows)
    fns = {"forward": lambda: plain_forward(model, batches),
           "hooks": lambda: hooked_forward(model, batches),
           "collect": lambda: collect(model, tok, rows)}
    t = medians(interleaved(fns, rounds=args.collection_rounds, warmup=1, clock="both"))
    what = "SmolLM2-135M-Instruct, the demo's labelled rows" if args.real else \
        f"{N_TEXTS} samples x ~{WORDS} tokens"
    lines = [f"Collection ({what}: {len(rows)} rows), batch {BATCH} (median of "
             f"{args.collection_rounds}, interleaved)", "",
             "| run | wall | vs plain forward | CPU | vs plain forward |", "|---|---|---|---|---|"]
    for name, label in [("forward", "plain forward passes"),
                        ("hooks", f"forward + pooling hooks ({len(resolve_sites(model))} mid "
                                  "sites)"),
                        ("collect", "sgm_ext.profile.collect end to end")]:
        (w, c), (w0, c0) = t[name], t["forward"]
        lines.append(f"| {label} | {w * 1000:.0f} ms | {w / w0:.3f} | {c * 1000:.0f} ms "
                     f"| {c / c0:.3f} |")
    lines += ["", f"collect throughput: {len(rows) / t['collect'][0]:.1f} rows/s"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
