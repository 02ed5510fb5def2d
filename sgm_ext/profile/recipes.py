"""The peers' recipes by name: every profile option a published method sets, so that
`sgm-ext profile --recipe aura` (or ProfileOptions.for_recipe("aura")) reproduces it without
a list of flags to remember.

Each entry names its source. Sites are given as this package's site kinds: ml-aura observes
the outputs of an MLP's first and last projections (GPT-2's `mlp.c_fc` and `mlp.c_proj` in its
configs/responses.yaml), which on a gated MLP are `up` and `down`. The last four read the
model's own labelled continuations (rows with a `response`, as `sgm-ext sample` writes them);
`sgm-ext calibrate` sets the strength of each recipe's full-strength map afterwards.
"""
RECIPES = {
    "aura": (
        "AurA, apple/ml-aura (Suau et al., ICML 2024): max pooling over every token, experts by "
        "the threshold rule AUROC > 0.5, alpha = 1 - Gini, on the up and down projections",
        dict(sites=("up", "down"), pooling="max", modality="all", method="aura",
             selection="threshold", threshold=0.5, top_k=None, balanced=False,
             allow_amplify=False)),
    "aura-vl": (
        "ml-aura-vl (the SGM authors' earlier code): mean pooling, AurA's alpha for every "
        "neuron with AUROC > 0.3 (alphas above 1 between 0.3 and 0.5), on the up projection",
        dict(sites=("up",), pooling="mean", modality="all", method="aura",
             selection="threshold", threshold=0.3, top_k=None, balanced=False,
             allow_amplify=True)),
    "act-linear": (
        "AcT, apple/ml-act (Rodriguez et al., ICLR 2025): linear transport maps (scale and "
        "shift per neuron) from mean-pooled responses of balanced classes, on gate, up and down",
        dict(sites=("gate", "up", "down"), pooling="mean", modality="all", method="linear_ot",
             balanced=True, allow_amplify=True)),
    "act-gaussian": (
        "AcT, apple/ml-act: Gaussian transport maps from mean-pooled responses of balanced "
        "classes, on gate, up and down",
        dict(sites=("gate", "up", "down"), pooling="mean", modality="all", method="gaussian_ot",
             balanced=True, allow_amplify=True)),
    "act-top": (
        "sgm-ext's measured recipe (bench/bench_efficacy.py, chosen on validation on "
        "SmolLM2-135M-Instruct, 46,080 mid neurons): AcT linear maps of the 3,000 mid neurons "
        "whose toxic and benign responses are furthest apart (Cohen's d), mean-pooled over "
        "the responses (the model's own continuations, labelled by a judge), balanced classes",
        dict(sites=("mid",), pooling="mean", modality="response", method="linear_ot",
             balanced=True, top_k=3000, allow_amplify=True)),
    "act-input": (
        "AcT, apple/ml-act (Rodriguez et al., ICLR 2025; their layer-norm result, Tables 2 and "
        "8): linear transport maps on every layer's MLP input (the output of the norm that "
        "feeds the MLP), mean pooling over every token, balanced classes",
        dict(sites=("input",), pooling="mean", modality="all", method="linear_ot",
             balanced=True, allow_amplify=True)),
    "aura-input": (
        "AurA's rule (apple/ml-aura, Suau et al., ICML 2024) on the MLP input units: max "
        "pooling over every token, experts by AUROC > 0.5, alpha = 1 - Gini",
        dict(sites=("input",), pooling="max", modality="all", method="aura",
             selection="threshold", threshold=0.5, top_k=None, balanced=False,
             allow_amplify=False)),
    "safe-vectors": (
        "safe value vectors (Geva et al., EMNLP 2022, aviclu/ffn-values): the 10 mid neurons "
        "whose output vectors, read through the final norm and the unembedding, most raise "
        "the benign continuations' tokens over the toxic ones, held at 10 x their RMS "
        "activation (scale 0 and a shift)",
        dict(sites=("mid",), pooling="mean", modality="response", method="safe_vectors",
             top_k=10, hold_at=10.0)),
    "toxic-direction": (
        "a toxicity probe's direction (Lee et al., ICML 2024, ajyl/dpo_toxic): logistic "
        "regression on the last layer's output mean-pooled over the response, its direction "
        "subtracted as a shift on down of the last quarter of the layers",
        dict(sites=("down",), pooling="mean", modality="response", method="toxic_direction")),
    "toxic-direction-neurons": (
        "the same probe (Lee et al., ICML 2024): the 10 mid neurons whose output vectors are "
        "closest (cosine) to its direction damped to 0",
        dict(sites=("mid",), pooling="mean", modality="response",
             method="toxic_direction_neurons", top_k=10)),
}


def recipe(name):
    """(description, {ProfileOptions field: value}) of a recipe; ValueError naming the known
    ones for another name."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; the recipes are {', '.join(RECIPES)}")
    description, options = RECIPES[name]
    return description, dict(options)


def describe(name):
    """One line per option the recipe sets, for printing."""
    description, options = recipe(name)
    settings = ", ".join(f"{key}={' '.join(value) if isinstance(value, tuple) else value}"
                         for key, value in options.items())
    return f"recipe {name}: {description}\n  sets {settings}"
