"""Where the neurons of an MLP live: one declarative table of MLP classes, and the site names.

A row says, for one Hugging Face MLP class, which layout its forward computes and under
which attribute names the pieces sit:
- "gated":     down(act(gate(x)) * up(x))        roles gate, up, down
- "packed":    down(act(g) * u), [g | u] = gate_up(x)   roles gate_up, down (Phi-3)
- "non_gated": fc2(act(fc1(x)))                   roles fc1, fc2 (CLIP / SigLIP towers)
and which attribute holds the activation module. Classes not in the table are recognised
by the generic rule: a module with gate_proj / up_proj / down_proj linear sub-modules and an
act_fn computes the gated layout (it is how HF writes every Llama-family MLP).

Site names (the keys of a ScaleSet): a Linear's outputs are named by the Linear's module path
(`model.layers.3.mlp.up_proj`), the product act(gate) * up (act(fc1) for non-gated) by the
MLP's path plus ".mid", the MLP's input x (hidden-size units: the output of the norm that feeds
the MLP, post_attention_layernorm in Llama, pre_feedforward_layernorm in Gemma 2 / 3) by the
MLP's path plus ".input". For the packed layout the gate_up Linear is one site of 2 I values,
gate half first, as the Linear's outputs are laid out.
"""
import re
from typing import NamedTuple

import torch

from ..core.activations import canonical_activation


class Layout(NamedTuple):
    kind: str  # "gated" | "packed" | "non_gated"
    roles: dict  # role -> attribute name of the sub-module
    act_attr: str  # attribute holding the activation module (or function)


GATED = Layout("gated", {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}, "act_fn")
GATED_ACTIVATION_FN = GATED._replace(act_attr="activation_fn")
PACKED = Layout("packed", {"gate_up": "gate_up_proj", "down": "down_proj"}, "activation_fn")
NON_GATED = Layout("non_gated", {"fc1": "fc1", "fc2": "fc2"}, "activation_fn")

# MLP class name -> layout. Copies of a class under another model's module (Qwen2-VL's and
# Qwen2.5-VL's own Qwen2MLP) share the name and so the row.
REGISTRY = {
    # language models (gated)
    "LlamaMLP": GATED,
    "MistralMLP": GATED,
    "Qwen2MLP": GATED,
    "Qwen3MLP": GATED,
    "Qwen3VLTextMLP": GATED,
    "GemmaMLP": GATED,
    "Gemma2MLP": GATED,
    "Gemma3MLP": GATED,
    "MllamaTextMLP": GATED,
    "Llama4TextMLP": GATED_ACTIVATION_FN,
    "Phi3MLP": PACKED,
    # vision towers
    "Qwen2_5_VLMLP": GATED,  # Qwen2.5-VL vision blocks (gated, with biases)
    "VisionMlp": NON_GATED._replace(act_attr="act"),  # Qwen2-VL vision blocks
    "Qwen3VLVisionMLP": Layout("non_gated", {"fc1": "linear_fc1", "fc2": "linear_fc2"}, "act_fn"),
    "CLIPMLP": NON_GATED,
    "SiglipMLP": NON_GATED,
    "Siglip2MLP": NON_GATED,
    "InternVLVisionMLP": NON_GATED,
    "Idefics2VisionMLP": NON_GATED,
    "Idefics3VisionMLP": NON_GATED,
    "SmolVLMVisionMLP": NON_GATED,
    "MllamaVisionMLP": NON_GATED,
    "Llama4VisionMLP": NON_GATED,
}

# Site kinds per layout, in the order they act in the forward.
SITE_KINDS = {
    "gated": ("input", "gate", "up", "mid", "down"),
    "packed": ("input", "gate_up", "mid", "down"),
    "non_gated": ("input", "fc1", "mid"),
}
MID = "mid"
INPUT = "input"
# The Linear whose input is the mid site, per layout (mid has no module of its own).
_MID_INPUT_ROLE = {"gated": "down", "packed": "down", "non_gated": "fc2"}
# The Linears that read the MLP's input, per layout (the input site's is the MLP's own input).
_FIRST_ROLES = {"gated": ("gate", "up"), "packed": ("gate_up",), "non_gated": ("fc1",)}
# The norm whose output a decoder layer hands to its MLP, by attribute of the layer, first
# found first: Gemma 2 / 3 layers also have a post_attention_layernorm, but it normalises the
# attention's output before the residual add; there pre_feedforward_layernorm feeds the MLP.
# The vision towers' layers name theirs layer_norm2 (CLIP, SigLIP, Idefics3), norm2 (Qwen2-VL,
# Qwen2.5-VL), layernorm_after (InternVL); SigLIP's attention-pooling head, layernorm.
# tests/test_registry.py checks each against the MLP's input on every test model.
MLP_INPUT_NORMS = ("pre_feedforward_layernorm", "post_attention_layernorm", "layer_norm2",
                   "norm2", "layernorm_after", "layernorm")

# Activation module class name -> canonical activation (transformers.activations and torch.nn).
_ACTIVATION_CLASSES = {
    "SiLUActivation": "silu",
    "SiLU": "silu",
    "GELUActivation": "gelu",
    "GELUTanh": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh",
    "NewGELUActivation": "gelu_tanh",
    "FastGELUActivation": "gelu_tanh",
    "AccurateGELUActivation": "gelu_tanh",
    "QuickGELUActivation": "quick_gelu",
    "ReLU": "relu",
}


class MLPInfo(NamedTuple):
    """One MLP of a model, as find_mlps reports it."""
    path: str  # module path of the MLP in the model
    class_name: str
    layout: str  # "gated" | "packed" | "non_gated"
    roles: dict  # role -> attribute name (gate/up/down, gate_up/down, fc1/fc2)
    act_attr: str
    act: str  # canonical activation name
    intermediate_size: int  # I: neurons at the mid site
    hidden_size: int  # outputs of the down / fc2 Linear
    input_size: int  # what the first projections read: the input site's width

    def site(self, kind):
        """The site name of one site kind of this MLP ("input", "gate", "up", "mid", ...)."""
        self._check_kind(kind)
        if kind in (MID, INPUT):
            return own_site(self.path, kind)
        return linear_site(self.path, self.roles[kind])

    def _check_kind(self, kind):
        if kind not in SITE_KINDS[self.layout]:
            raise ValueError(f"{self.path} ({self.class_name}, {self.layout}) has no {kind!r} "
                             f"site; its sites: {', '.join(SITE_KINDS[self.layout])}")

    def sites(self):
        """{site name: site kind} for every site of this MLP."""
        return {self.site(kind): kind for kind in SITE_KINDS[self.layout]}

    def site_point(self, kind):
        """(attribute of the sub-module, reads_input) where a site kind is observed or changed:
        input is the MLP's own input (attribute "": the MLP module itself, a forward pre-hook
        point), mid the input of the last Linear (down / fc2), every other kind the output of
        the sub-module of its role. Hooks and the profiler go by this (site_module)."""
        self._check_kind(kind)
        if kind == INPUT:
            return "", True
        if kind == MID:
            return self.roles[_MID_INPUT_ROLE[self.layout]], True
        return self.roles[kind], False

    def site_module(self, mlp, kind):
        """(module, reads_input) of site_point in the MLP module `mlp` itself."""
        attr, reads_input = self.site_point(kind)
        return (getattr(mlp, attr) if attr else mlp), reads_input

    def fold_points(self, kind):
        """[(attribute of a Linear, reads_input)]: the Linears a site kind folds into. A site
        that is a Linear's output scales that Linear's rows (and bias); one that is Linears'
        input scales their columns, and a shift b enters their biases as W b: mid is the input
        of down / fc2, input that of the first projections (gate and up, gate_up, fc1)."""
        self._check_kind(kind)
        if kind == INPUT:
            return [(self.roles[r], True) for r in _FIRST_ROLES[self.layout]]
        return [self.site_point(kind)]

    def site_size(self, kind):
        """How many values a scale for this site kind has: the hidden size for down, the first
        projections' input width for input (the same residual stream in every registry MLP)."""
        if kind == INPUT:
            return self.input_size
        if kind == "down":
            return self.hidden_size
        if kind == "gate_up":
            return 2 * self.intermediate_size
        return self.intermediate_size


def linear_site(mlp_path, attr):
    """Site name of a sub-Linear's outputs: the Linear's module path."""
    return f"{mlp_path}.{attr}" if mlp_path else attr


def own_site(mlp_path, kind):
    """Site name of an MLP site with no module of its own: the product act(gate) * up
    (non-gated: act(fc1)), kind "mid", or the MLP's input, kind "input"."""
    return f"{mlp_path}.{kind}" if mlp_path else kind


def input_norm(model, mlp_path):
    """The module path of the norm whose output the MLP at `mlp_path` receives (MLP_INPUT_NORMS,
    a sibling of the MLP in its layer), or None where the layer has none of those names."""
    layer, _, _ = mlp_path.rpartition(".")
    for attr in MLP_INPUT_NORMS:
        path = f"{layer}.{attr}" if layer else attr
        try:
            model.get_submodule(path)
        except AttributeError:
            continue
        return path
    return None


def site_layer(site):
    """Layer number in a site name (the first `.N.` after layers / layer / h / blocks), or None."""
    m = re.search(r"\.(?:layers|layer|h|blocks)\.(\d+)\.", "." + site)
    return int(m.group(1)) if m else None


def site_order(site):
    """Sort key that orders site names as the model does: numbers by value (layers.2 before
    layers.10), the kinds of one MLP in the order they act (gate, up, mid, down)."""
    parts = re.split(r"(\d+)", site)
    key = [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts[:-1]]
    last = parts[-1].rsplit(".", 1)
    rank = {"input": -1, "gate_proj": 0, "up_proj": 1, "gate_up_proj": 1, "fc1": 1, "mid": 2,
            "down_proj": 3, "fc2": 3}
    return key + [(1, 0, last[0]) if len(last) > 1 else (1, 0, ""),
                  (2, rank.get(last[-1], 9), last[-1])]


def site_kind(site):
    """The last part of a site name: `mid`, `input`, or the Linear's attribute (`up_proj`,
    `fc1`, ...)."""
    return site.rsplit(".", 1)[-1]


def supported_classes():
    """The MLP class names of the registry table (the generic rule covers more)."""
    return tuple(REGISTRY)


def out_features(module):
    """Output width of a linear-like module: nn.Linear, quantized Linear, PEFT LoRA Linear."""
    n = getattr(module, "out_features", None)
    if isinstance(n, int):
        return n
    w = getattr(module, "weight", None)
    if isinstance(w, torch.Tensor) and w.dim() == 2:
        return int(w.shape[0])
    return None


def in_features(module):
    """Input width of a linear-like module (as out_features), or None."""
    n = getattr(module, "in_features", None)
    if isinstance(n, int):
        return n
    w = getattr(module, "weight", None)
    if isinstance(w, torch.Tensor) and w.dim() == 2:
        return int(w.shape[1])
    return None


def activation_name(fn):
    """Canonical activation of an activation module or function, or None if not known."""
    if isinstance(fn, torch.nn.GELU):
        return "gelu_tanh" if fn.approximate == "tanh" else "gelu"
    name = _ACTIVATION_CLASSES.get(type(fn).__name__)
    if name is None and callable(fn) and getattr(fn, "__module__", "").startswith("torch"):
        name = {"silu": "silu", "gelu": "gelu", "relu": "relu"}.get(getattr(fn, "__name__", ""))
    return name


def layout_of(module):
    """The registry row for a module, the generic rule's row, or None (not an MLP we know)."""
    for cls in type(module).__mro__:
        if cls.__name__ in REGISTRY:
            return REGISTRY[cls.__name__]
    if all(out_features(getattr(module, a, None)) for a in GATED.roles.values()) \
            and hasattr(module, "act_fn"):
        return GATED
    return None


def describe(module, path, layout=None):
    """MLPInfo for `module` at `path`; ValueError naming the class when it cannot be used."""
    layout = layout or layout_of(module)
    cls = type(module).__name__
    if layout is None:
        raise ValueError(f"{path or '<model>'} is a {cls}, not an MLP class the sgm-ext registry "
                         f"knows (supported: {', '.join(supported_classes())}, and any module "
                         "with gate_proj / up_proj / down_proj Linears and an act_fn)")
    subs = {}
    for role, attr in layout.roles.items():
        sub = getattr(module, attr, None)
        if out_features(sub) is None:
            raise ValueError(f"{path}: {cls}.{attr} is {type(sub).__name__}, not a linear layer")
        subs[role] = sub
    fn = getattr(module, layout.act_attr, None)
    act = activation_name(fn)
    if act is None:
        act = _config_activation(module)
    if act is None:
        raise ValueError(f"{path}: {cls}.{layout.act_attr} is {type(fn).__name__}, an activation "
                         f"sgm-ext does not implement (it has {', '.join(_supported_acts())})")
    if layout.kind == "gated":
        inter, hidden = out_features(subs["gate"]), out_features(subs["down"])
    elif layout.kind == "packed":
        inter, hidden = out_features(subs["gate_up"]) // 2, out_features(subs["down"])
    else:
        inter, hidden = out_features(subs["fc1"]), out_features(subs["fc2"])
    first = subs[_FIRST_ROLES[layout.kind][0]]
    return MLPInfo(path, cls, layout.kind, dict(layout.roles), layout.act_attr, act, inter, hidden,
                   in_features(first) or hidden)


def _config_activation(module):
    """Fallback: the activation a module's config names (hidden_act / hidden_activation)."""
    config = getattr(module, "config", None)
    for key in ("hidden_act", "hidden_activation"):
        name = getattr(config, key, None)
        if isinstance(name, str):
            try:
                return canonical_activation(name)
            except ValueError:
                return None
    return None


def _supported_acts():
    return sorted(set(_ACTIVATION_CLASSES) | {"GELU", "torch silu/gelu/relu functions"})


def find_mlps(model):
    """{module path: MLPInfo} for every MLP of the model the registry recognises.

    Modules nested inside a recognised MLP are not searched (an MLP's Linears are not MLPs).
    A recognised MLP whose activation or sub-modules cannot be used raises ValueError.
    """
    found = {}
    inside = None  # prefix of the last MLP found: named_modules lists its children right after it
    for path, module in model.named_modules():
        if inside is not None and path.startswith(inside):
            continue
        layout = layout_of(module)
        if layout is not None:
            found[path] = describe(module, path, layout)
            inside = path + "." if path else ""
    return found


def site_index(mlps):
    """{site name: (MLPInfo, site kind)} over all MLPs of find_mlps."""
    return {site: (info, kind) for info in mlps.values() for site, kind in info.sites().items()}
