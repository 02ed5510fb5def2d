"""Activation names and their math in torch: the one place every backend takes them from.

The kernels implement the same five canonical activations (kernels/elementwise.py); the
names Hugging Face configs use (`hidden_act`) map onto them here.
"""
import math

import torch

# Canonical name -> the HF / PyTorch names that mean the same function.
_ALIASES = {
    "silu": ("silu", "swish"),
    "gelu": ("gelu", "gelu_python"),  # exact, erf form
    # tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    "gelu_tanh": ("gelu_tanh", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu_accurate"),
    "quick_gelu": ("quick_gelu",),  # x * sigmoid(1.702 x): OpenAI CLIP towers
    "relu": ("relu",),
}
ACTIVATIONS = tuple(_ALIASES)
_CANONICAL = {alias: name for name, aliases in _ALIASES.items() for alias in aliases}

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_QUICK_GELU_K = 1.702


def canonical_activation(name):
    """Map an activation name (ours or a HF config's `hidden_act`) to its canonical name."""
    try:
        return _CANONICAL[name]
    except (KeyError, TypeError):
        known = ", ".join(sorted(_CANONICAL))
        raise ValueError(f"unknown activation {name!r}; supported: {known}") from None


def activation(x, act):
    """act(x) for a canonical name, in x's dtype."""
    if act == "silu":
        return x * torch.sigmoid(x)
    if act == "gelu":
        return 0.5 * x * (1.0 + torch.erf(x * _INV_SQRT_2))
    if act == "gelu_tanh":
        # 0.5 (1 + tanh(z)) == sigmoid(2 z): the form the kernels use too.
        return x * torch.sigmoid(2.0 * _SQRT_2_OVER_PI * (x + 0.044715 * x * x * x))
    if act == "quick_gelu":
        return x * torch.sigmoid(_QUICK_GELU_K * x)
    if act == "relu":
        return torch.relu(x)
    raise ValueError(f"not a canonical activation: {act!r}")


def activation_grad(x, act):
    """d act(x) / dx for a canonical name, in x's dtype."""
    if act == "silu":
        s = torch.sigmoid(x)
        return s * (1.0 + x * (1.0 - s))
    if act == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(x * _INV_SQRT_2))
        pdf = torch.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
        return cdf + x * pdf
    if act == "gelu_tanh":
        z2 = 2.0 * _SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)
        dz2 = 2.0 * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * x * x)
        s = torch.sigmoid(z2)
        return s + x * s * (1.0 - s) * dz2
    if act == "quick_gelu":
        s = torch.sigmoid(_QUICK_GELU_K * x)
        return s + _QUICK_GELU_K * x * s * (1.0 - s)
    if act == "relu":
        return (x > 0).to(x.dtype)
    raise ValueError(f"not a canonical activation: {act!r}")
