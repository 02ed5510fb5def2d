"""Neurons ranked by what they do to generation, from the model's own labelled continuations.

`gradient_attribution`: the first-order effect of damping each neuron on the likelihood of the
toxic continuations against the benign ones. `direct_logit_attribution`: what each neuron
writes into the logits of toxic tokens. `top_k_scales` turns either ranking into a ScaleSet.
`LogitReadout` and `response_forwards` read the direct path during forwards over the rows'
responses; safe_vectors.py ranks its neurons with them too.

Direct logit attribution.

A `mid` neuron i of layer l adds a_i * W_down[:, i] to the residual stream; read through the
final norm (its scale frozen at the position's value, as logit-lens analyses do) and the
unembedding, that is a direct contribution to every token's logit. Geva et al., "Transformer
Feed-Forward Layers Build Predictions by Promoting Concepts in the Vocabulary Space" (EMNLP
2022) found a handful of such value vectors that promote toxic words and switched them off to
lower toxicity at a small cost in perplexity; this ranks them from the model's own labelled
continuations instead of by reading projections:

    score_i = mean over toxic targets of c_i  -  mean over benign targets of c_i
    c_i(t) = a_i(t) * <g_f * (U[y] - mean_v U[v]) / rms(h_t), W_down[:, i]>

where a toxic target is a response position of a toxic row whose next token y is one of
`toxic_ids` (the caller decides which tokens are toxic, e.g. with its judge), a benign target
any response position of a non-toxic row (y its actual next token), g_f and rms(h_t) the final
RMS norm's gain and the norm of its input at t, U the output embedding, centred so that a
neuron that shifts every logit alike scores 0. The subtraction drops neurons that carry the
model's ordinary predictions. Architectures with a norm after the MLP (Gemma 2 / 3:
`post_feedforward_layernorm`) get that norm's gain and frozen scale on the way.
Direct effects only: a neuron whose effect runs through later layers is not seen.
"""
import contextlib
import math

import torch

from ..patching.scales import ScaleSet
from .expertise import top_k_over_sites
from .inputs import encode_batch, input_device
from .pooling import resolve_sites

POST_MLP_NORM = "post_feedforward_layernorm"  # Gemma 2 / 3: an RMS norm on the MLP's output


def rms_gain(norm, width, dtype):
    """(gain [width], eps) of an RMS norm module, read by applying it to a vector of ones:
    RMSNorm(1) = gain / sqrt(1 + eps), whichever way the class stores its weight."""
    eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
    ones = torch.ones(1, width, dtype=dtype, device=next(norm.parameters()).device)
    with torch.no_grad():
        gain = norm(ones)[0].double() * math.sqrt(1.0 + eps)
    return gain, eps


def post_mlp_norm(model, mlp_path):
    """The norm a decoder layer applies to its MLP's output before the residual sum, or None."""
    if "." not in mlp_path:
        return None
    return getattr(model.get_submodule(mlp_path.rsplit(".", 1)[0]), POST_MLP_NORM, None)


def inv_rms(x, eps):
    return torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + eps)


class LogitReadout:
    """The direct path from every `mid` neuron to the logits, read during forwards (the module
    docstring's d): `hooks()` captures the mid activations (down's input), the post-MLP norm's
    input where the layer has one, and the final norm's input; `directions(site, b, t, y)`
    gives the rows g_f * (U[y] - mean U) / rms(h_t) (times the post-MLP norm's gain over its
    frozen scale) at positions (b, t) for target tokens y. downs: {site: W_down float64}."""

    def __init__(self, model):
        self.sites = resolve_sites(model, ("mid",))
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        self.final_norm = getattr(decoder, "norm", None)
        unembed = model.get_output_embeddings()
        if self.final_norm is None or unembed is None:
            raise ValueError(f"{type(model).__name__}: no final norm / output embedding to "
                             "read direct logit effects through")
        u = unembed.weight.detach().double()
        self.u = u - u.mean(0, keepdim=True)
        self.gain, self.eps = rms_gain(self.final_norm, u.shape[1], unembed.weight.dtype)
        self.downs, self.posts, self._points = {}, {}, []
        for site, (info, kind) in self.sites.items():
            down = getattr(model.get_submodule(info.path), info.site_point(kind)[0])
            self.downs[site] = down.weight.detach().double()
            self._points.append((down, site))
            post = post_mlp_norm(model, info.path)
            if post is not None:
                self.posts[site] = rms_gain(post, u.shape[1], unembed.weight.dtype)
                self._points.append((post, site + "#post"))
        self._points.append((self.final_norm, "#final"))
        self.captured = {}

    @contextlib.contextmanager
    def hooks(self):
        handles = [module.register_forward_pre_hook(
            lambda m, args, key=key: self.captured.__setitem__(key, args[0].detach()))
            for module, key in self._points]
        try:
            yield self.captured
        finally:
            for h in handles:
                h.remove()

    def final_directions(self, b, t, targets):
        """[P, hidden] float64: g_f * U[y] / rms(h_t), the part every site shares."""
        return self.gain * self.u[targets] * inv_rms(self.captured["#final"][b, t], self.eps)

    def directions(self, site, shared, b, t):
        """`shared` (final_directions) through the site's post-MLP norm, if it has one."""
        if site not in self.posts:
            return shared
        gain, eps = self.posts[site]
        return shared * gain * inv_rms(self.captured[site + "#post"][b, t], eps)

    def activations(self, site, b, t):
        """[P, intermediate] float64: the site's mid activations at positions (b, t)."""
        return self.captured[site][b, t].double()


def response_forwards(model, processor, rows, readout, *, batch_size=8, input_format="raw",
                      limit=None):
    """Forward the rows (prompt + response, left padded) under `readout`'s hooks, yielding per
    batch (rows, next [B, T-1]: the token position t predicts, keep [B, T-1]: whether that
    token is a response token, select [B, T]: the response tokens themselves); the captured
    tensors are the batch's while its tuple is handled."""
    device = input_device(model)
    with readout.hooks():
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            inputs, select = encode_batch(model, processor, batch, "response", "left", limit,
                                          input_format)
            inputs = {k: v.to(device) for k, v in inputs.items()}
            readout.captured.clear()
            with torch.no_grad():
                model(**inputs, use_cache=False)
            yield batch, inputs["input_ids"].cpu()[:, 1:], select[:, 1:], select


def direct_logit_attribution(model, processor, rows, toxic_ids, *, batch_size=8,
                             input_format="raw"):
    """{mid site: [n] float64} scores as in the module docstring, and the number of toxic and
    benign targets seen ({"toxic": int, "benign": int}); ValueError when the toxic rows hold
    no toxic target or the model has no final RMS norm the ranking can read."""
    readout = LogitReadout(model)
    toxic_ids = torch.as_tensor(sorted(set(int(t) for t in toxic_ids)), dtype=torch.long)
    sums = {label: {site: torch.zeros(w.shape[1], dtype=torch.float64)
                    for site, w in readout.downs.items()} for label in (0, 1)}
    counts = {0: 0, 1: 0}
    for batch, nxt, keep, _ in response_forwards(model, processor, rows, readout,
                                                 batch_size=batch_size,
                                                 input_format=input_format):
        for label, mask in target_masks(batch, nxt, keep, toxic_ids).items():
            b, t = mask.nonzero(as_tuple=True)
            if len(b) == 0:
                continue
            counts[label] += len(b)
            shared = readout.final_directions(b, t, nxt[b, t])
            for site, w in readout.downs.items():
                d = readout.directions(site, shared, b, t)
                sums[label][site] += (readout.activations(site, b, t) * (d @ w)).sum(0)
    if counts[1] == 0:
        raise ValueError("no toxic target: none of the toxic rows' responses has a token of "
                         "the toxic token set")
    scores = {site: sums[1][site] / counts[1] - sums[0][site] / max(1, counts[0])
              for site in readout.downs}
    return scores, {"toxic": counts[1], "benign": counts[0]}


def target_masks(batch, nxt, keep, toxic_ids):
    """{1: toxic targets, 0: benign targets} [B, T-1] bool: a toxic target is a position of a
    toxic row whose next token is a response token in `toxic_ids`, a benign one any position
    of a non-toxic row whose next token is a response token."""
    labels = torch.tensor([int(r.label) for r in batch], dtype=torch.bool)[:, None]
    return {1: torch.isin(nxt, toxic_ids) & keep & labels, 0: keep & ~labels}


def gradient_attribution(model, processor, rows, *, batch_size=8, sites=("mid",), safe=True):
    """{site: [neurons] float64}: the first-order effect of damping each neuron on the
    log-likelihood of the model's own continuations: d(mean response-token log p)/d(scale) at
    scale 1, averaged over the toxic rows, minus the same over the non-toxic rows. A large
    value: damping the neuron lowers the toxic continuations' likelihood more than the benign
    ones'. safe: -inf (never chosen) where damping would lower the non-toxic continuations'
    likelihood too (their derivative > 0). rows: data.Row with responses (raw format)."""
    site_map = resolve_sites(model, sites)
    params = {site: torch.ones(info.site_size(kind), dtype=torch.float32, requires_grad=True)
              for site, (info, kind) in site_map.items()}
    handles = []
    for site, (info, kind) in site_map.items():
        module, reads_input = info.site_module(model.get_submodule(info.path), kind)
        s = params[site]
        if reads_input:
            handles.append(module.register_forward_pre_hook(
                lambda m, args, s=s: (args[0] * s.to(args[0].dtype),) + tuple(args[1:])))
        else:
            handles.append(module.register_forward_hook(
                lambda m, args, out, s=s: out * s.to(out.dtype)))
    grads = {}
    device = input_device(model)
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        for label in (1, 0):
            chosen = [r for r in rows if r.label == label]
            total = {site: torch.zeros_like(p, dtype=torch.float64) for site, p in params.items()}
            for start in range(0, len(chosen), batch_size):
                batch_rows = chosen[start:start + batch_size]
                inputs, select = encode_batch(model, processor, batch_rows, "response", "left",
                                              None, "raw")
                inputs = {k: v.to(device) for k, v in inputs.items()}
                logits = model(**inputs, use_cache=False).logits[:, :-1].float()
                target = inputs["input_ids"][:, 1:]
                mask = select[:, 1:].to(device).float()
                logp = torch.log_softmax(logits, -1).gather(-1, target[..., None])[..., 0]
                per_row = (logp * mask).sum(1) / mask.sum(1).clamp(min=1)
                for p in params.values():
                    p.grad = None
                per_row.sum().backward()
                for site, p in params.items():
                    total[site] += p.grad.double()
            grads[label] = {site: t / max(1, len(chosen)) for site, t in total.items()}
    finally:
        for h in handles:
            h.remove()
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
    if not safe:
        return {site: grads[1][site] - grads[0][site] for site in params}
    return {site: torch.where(grads[0][site] <= 0, grads[1][site] - grads[0][site],
                              float("-inf")) for site in params}


def top_k_scales(scores, k, alpha=0.0, metadata=None):
    """ScaleSet: `alpha` for the k highest-scoring neurons over all sites, 1 elsewhere."""
    out = {site: torch.where(keep, torch.tensor(float(alpha)), torch.tensor(1.0)).float()
           for site, keep in top_k_over_sites(scores, k).items()}
    meta = {"method": "damp", "alpha": alpha, "top_k": k, **(metadata or {})}
    return ScaleSet(out, meta).validate()
