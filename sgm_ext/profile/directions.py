"""A toxicity direction and the recipes built on it, and the dispatch of the recipes that read
the model's own continuations token by token (safe_vectors.py's too).

Lee et al., "A Mechanistic Understanding of Alignment Algorithms: A Case Study on DPO and
Toxicity" (ICML 2024; code ajyl/dpo_toxic) trained a linear probe for toxicity on GPT-2
medium's last-layer residual stream, averaged over positions; subtracting its direction took
the mean toxicity from 0.453 to 0.245, and damping the MLP value vector closest to it helped
too. Here:

- the probe: L2-regularised logistic regression (`fit_probe`: sklearn's objective
  1/2 |w|^2 + C sum_i s_i logloss_i, C = PROBE_C, the intercept not penalised, class-balanced
  weights s_i = N / (2 N_class)), fitted by Newton's method in float64 (deterministic, so no
  seed matters) on the final hidden state of every row: the last decoder layer's output (the
  residual stream before the final norm), mean-pooled over the response tokens. The features
  are centred and divided by one number, their RMS, so that C means the same on any model
  and the direction stays a direction of the residual stream. w: its unit direction (towards
  toxic).
- `toxic_direction`: a shift on the `down` sites of the last L layers (default: the last
  quarter, rounded up), each -(gap / L) w, where gap = w . (mean toxic - mean benign) of the
  pooled final hidden states. The shifts add to the residual stream directly, so at strength 1
  their sum, -gap w, moves every row's final hidden state by exactly that along the direct
  path: the toxic rows' mean projection on w lands where the benign rows' was (with L = 1
  exactly; the later layers' reaction to an earlier shift is not accounted for). Gemma 2 / 3
  normalise the MLP's output (post_feedforward_layernorm) before the residual add, so a shift
  on `down` is not a residual shift there: it goes through that norm's gain g and mean scale,
  b = -(gap / L) w / (g * mean_t 1 / rms(y_t)) (y: the MLP's output over the rows' response
  tokens), right to first order in |b| / |y| only.
- `toxic_direction_neurons`: scale 0 on the k `mid` neurons whose output vectors (W_down[:, i],
  through the post-MLP norm's gain where there is one) have the largest cosine with w (Lee et
  al. damped the value vectors closest to their probe).
"""
import json
import math

import torch

from ..core.fingerprints import config_fingerprint
from ..patching.scales import ScaleSet
from .attribution import inv_rms, post_mlp_norm, rms_gain
from .inputs import encode_batch, input_device
from .pooling import Pooler, language_mlps
from .safe_vectors import DEFAULT_HOLD_AT, DEFAULT_TOP_K, check_hold_at, safe_vectors

DIRECTION_METHODS = ("safe_vectors", "toxic_direction", "toxic_direction_neurons")
DIRECTION_SITES = {"safe_vectors": "mid", "toxic_direction": "down",
                   "toxic_direction_neurons": "mid"}
PROBE_C = 1.0  # sklearn's default inverse regularisation, on the RMS-scaled features


def fit_probe(x, labels, c=PROBE_C, max_iter=100, tol=1e-10):
    """(unit direction [H] float64, accuracy on x): the logistic regression of the module
    docstring on features x [N, H] with labels [N] (1 toxic)."""
    x, y = torch.as_tensor(x).double(), torch.as_tensor(labels).double()
    n, n_toxic = len(y), float(y.sum())
    if not 0 < n_toxic < n:
        raise ValueError("the probe needs rows of both labels (toxic and non-toxic)")
    weight = torch.where(y > 0, n / (2 * n_toxic), n / (2 * (n - n_toxic)))
    centred = x - x.mean(0)
    scale = centred.pow(2).mean().sqrt()
    if scale == 0:
        raise ValueError("every row has the same final hidden state: no direction to probe")
    z = torch.cat([centred / scale, torch.ones(n, 1, dtype=torch.float64)], 1)
    penalised = torch.ones(z.shape[1], dtype=torch.float64)
    penalised[-1] = 0.0

    def objective(theta):
        m = z @ theta
        return 0.5 * (penalised * theta * theta).sum() + \
            c * (weight * (torch.nn.functional.softplus(m) - y * m)).sum()

    theta = torch.zeros(z.shape[1], dtype=torch.float64)
    for _ in range(max_iter):
        p = torch.sigmoid(z @ theta)
        grad = penalised * theta + c * z.T @ (weight * (p - y))
        hess = torch.diag(penalised) + c * (z.T * (weight * p * (1 - p))) @ z
        step, t, before = torch.linalg.solve(hess, grad), 1.0, objective(theta)
        while objective(theta - t * step) > before and t > 1e-12:  # a damped Newton step
            t /= 2
        theta = theta - t * step
        if float((t * step).abs().max()) < tol:
            break
    w = theta[:-1]
    if float(w.norm()) == 0:
        raise ValueError("the probe found no direction (its weights are all zero)")
    accuracy = float(((z @ theta > 0) == (y > 0)).double().mean())
    return w / w.norm(), accuracy


def _layer_of(mlp_path):
    return mlp_path.rpartition(".")[0]


def final_hidden_states(model, processor, rows, *, shifted=(), batch_size=8,
                        input_format="raw", limit=None):
    """(x [N, H] float64: the last decoder layer's output mean-pooled over each row's response
    tokens, labels [N], {mlp path: mean over the response tokens of 1 / rms of the MLP's output
    as its post-MLP norm sees it} for the MLPs of `shifted` that have such a norm)."""
    mlps = list(language_mlps(model))
    last = model.get_submodule(_layer_of(mlps[-1]))
    pooler = Pooler("mean")
    posts = {path: post_mlp_norm(model, path) for path in shifted}
    posts = {path: norm for path, norm in posts.items() if norm is not None}
    inverse = {path: [0.0, 0] for path in posts}
    hidden, dtype = model.get_output_embeddings().weight.shape[1], next(model.parameters()).dtype
    eps = {path: rms_gain(norm, hidden, dtype)[1] for path, norm in posts.items()}

    def on_post(path, x):
        sel = pooler.select.to(x.device)
        inverse[path][0] += float(inv_rms(x, eps[path])[..., 0][sel].sum())
        inverse[path][1] += int(sel.sum())

    handles = [last.register_forward_hook(lambda m, a, out: pooler(
        "final", out[0] if isinstance(out, tuple) else out))]
    handles += [norm.register_forward_pre_hook(lambda m, a, path=path: on_post(path, a[0]))
                for path, norm in posts.items()]
    pooled, labels, device = [], [], input_device(model)
    try:
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            inputs, select = encode_batch(model, processor, batch, "response", "left", limit,
                                          input_format)
            pooler.start(select)
            with torch.no_grad():
                model(**{k: v.to(device) for k, v in inputs.items()}, use_cache=False)
            pooled.append(pooler.out["final"].double().cpu())
            labels += [int(r.label) for r in batch]
    finally:
        for h in handles:
            h.remove()
    return torch.cat(pooled), torch.tensor(labels), \
        {path: total / count for path, (total, count) in inverse.items()}


def direction_shift_scales(model, w, gap, mlp_paths, post_inverse, metadata=None):
    """ScaleSet: shifts on the `down` sites of `mlp_paths` that sum to -gap w along the direct
    path (the module docstring), through the post-MLP norm where `post_inverse` has the MLP."""
    mlps = language_mlps(model)
    per_layer = gap / len(mlp_paths)
    shifts, through = {}, []
    for path in mlp_paths:
        b = -per_layer * w
        if path in post_inverse:
            norm = post_mlp_norm(model, path)
            gain = rms_gain(norm, len(w), next(norm.parameters()).dtype)[0]
            b = b / (gain * post_inverse[path])
            through.append(path)
        if not torch.isfinite(b).all():
            raise ValueError(f"{path}: the shift through its post-MLP norm is not finite (a "
                             "gain of 0)")
        shifts[mlps[path].site("down")] = b
    meta = {"method": "toxic_direction", **(metadata or {}), "gap": gap,
            "shift_per_layer": per_layer,
            "layers": ",".join(_layer_of(p).rsplit(".", 1)[-1] for p in mlp_paths),
            "shift_through": ("post_feedforward_layernorm: its gain and mean scale (first "
                              "order)" if through else "the residual stream (direct)")}
    return ScaleSet({}, meta, shifts=shifts).validate()


def direction_neuron_scales(model, w, k, metadata=None):
    """ScaleSet: scale 0 on the k mid neurons whose output vectors have the largest cosine
    with w (through the post-MLP norm's gain where there is one), 1 elsewhere."""
    cosines = {}
    for path, info in language_mlps(model).items():
        down = getattr(model.get_submodule(path), info.site_point("mid")[0])
        v = down.weight.detach().double()
        norm = post_mlp_norm(model, path)
        if norm is not None:
            v = v * rms_gain(norm, v.shape[0], down.weight.dtype)[0][:, None]
        cosines[info.site("mid")] = (w @ v) / v.norm(dim=0).clamp(min=1e-30)
    flat = torch.cat(list(cosines.values()))
    order = torch.sort(flat, descending=True, stable=True).indices[:k]
    scales, start, chosen = {}, 0, []
    for site, cos in cosines.items():
        picked = order[(order >= start) & (order < start + len(cos))] - start
        scales[site] = torch.ones(len(cos))
        scales[site][picked] = 0.0
        chosen += [(float(cos[i]), site, int(i)) for i in picked]
        start += len(cos)
    chosen.sort(key=lambda c: -c[0])
    meta = {"method": "toxic_direction_neurons", "top_k": k, **(metadata or {}),
            "neurons": json.dumps([{"site": s, "neuron": i, "cosine": round(c, 6)}
                                   for c, s, i in chosen])}
    return ScaleSet(scales, meta).validate()


def toxic_direction(model, processor, rows, method, *, top_k=None, last_layers=None,
                    batch_size=8, input_format="raw", limit=None, metadata=None):
    """The toxic_direction / toxic_direction_neurons ScaleSet from labelled rows with
    responses: (ScaleSet, lines to print)."""
    mlps = list(language_mlps(model))
    n_layers = len(mlps)
    if last_layers is None:
        last_layers = math.ceil(n_layers / 4)
    if method == "toxic_direction" and last_layers > n_layers:
        raise ValueError(f"last_layers (--last-layers) is {last_layers}; the model has "
                         f"{n_layers} layers")
    shifted = mlps[-last_layers:] if method == "toxic_direction" else []
    x, labels, post_inverse = final_hidden_states(
        model, processor, rows, shifted=shifted, batch_size=batch_size,
        input_format=input_format, limit=limit)
    w, accuracy = fit_probe(x, labels)
    toxic = labels.bool()
    gap = float(w @ (x[toxic].mean(0) - x[~toxic].mean(0)))
    meta = {**(metadata or {}), "probe": "logistic regression, L2, class-balanced, on the "
            "last layer's output mean-pooled over the response", "probe_c": PROBE_C,
            "probe_accuracy": round(accuracy, 4)}
    lines = [f"probe (logistic regression, C = {PROBE_C:g}): accuracy {accuracy:.3f} on its own "
             f"{len(labels)} rows; toxic - benign mean along it: {gap:.4g}"]
    if method == "toxic_direction":
        scales = direction_shift_scales(model, w, gap, shifted, post_inverse, meta)
        lines.append(f"shift -{gap / last_layers:.4g} w on down of the last {last_layers} "
                     f"layers (layers {scales.metadata['layers']}), through "
                     f"{scales.metadata['shift_through']}")
        return scales, lines
    k = DEFAULT_TOP_K if top_k is None else top_k
    scales = direction_neuron_scales(model, w, k, meta)
    lines.append(f"{k} mid neurons damped (scale 0), their output vectors closest to w:")
    lines += [f"  {n['site']}[{n['neuron']}]  cosine {n['cosine']:+.3f}"
              for n in json.loads(scales.metadata["neurons"])[:10]]
    return scales, lines


def check_direction_options(method, *, sites, pooling, modality, top_k, hold_at, last_layers,
                            alpha):
    """ValueError naming the option that a direction method does not take or takes otherwise;
    nothing for the other methods (nor for their hold_at / last_layers left None)."""
    if hold_at is not None and method != "safe_vectors":
        raise ValueError(f"hold_at (--hold-at) is for method safe_vectors, not {method}")
    if last_layers is not None and method != "toxic_direction":
        raise ValueError(f"last_layers (--last-layers) is for method toxic_direction, not "
                         f"{method}")
    if method not in DIRECTION_METHODS:
        return
    kind = DIRECTION_SITES[method]
    if list(sites) != [kind]:
        raise ValueError(f"method {method} works on the {kind} sites; sites (--sites) is "
                         f"{' '.join(sites)}")
    if modality != "response" or pooling != "mean":
        raise ValueError(f"method {method} reads the rows' responses (the model's own "
                         f"continuations), mean-pooled where it pools; modality (--modality) "
                         f"is {modality}, pooling (--pooling) {pooling}")
    if alpha is not None:
        raise ValueError(f"alpha (--alpha) is for method damp, not {method}")
    if method == "toxic_direction" and top_k is not None:
        raise ValueError("top_k (--top-k) is for the neuron methods, not toxic_direction")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)
                              or top_k < 1):
        raise ValueError(f"top_k (--top-k) must be a positive integer, got {top_k!r}")
    if hold_at is not None:
        check_hold_at(hold_at)
    if last_layers is not None and (isinstance(last_layers, bool) or
                                    not isinstance(last_layers, int) or last_layers < 1):
        raise ValueError(f"last_layers (--last-layers) must be a positive integer, got "
                         f"{last_layers!r}")


def direction_scales(model, processor, dataset, options, input_format, limit=None):
    """(ScaleSet at options.strength, lines to print) of a direction method on a data.Dataset
    of rows with responses: what profile_model does for DIRECTION_METHODS."""
    o = options
    labels = [r.label for r in dataset.rows]
    meta = {"model_type": str(getattr(model.config, "model_type", "")),
            "config_fingerprint": config_fingerprint(model.config),
            "data_fingerprint": dataset.fingerprint(), "pooling": o.pooling,
            "modality": o.modality, "input_format": input_format,
            "n_toxic": sum(labels), "n_non_toxic": len(labels) - sum(labels), "strength": 1.0}
    if o.recipe:
        meta["recipe"] = o.recipe
    common = dict(batch_size=o.batch_size, input_format=input_format, limit=limit,
                  metadata=meta)
    if o.method == "safe_vectors":
        scales, lines = safe_vectors(
            model, processor, dataset.rows, top_k=DEFAULT_TOP_K if o.top_k is None else o.top_k,
            hold_at=DEFAULT_HOLD_AT if o.hold_at is None else o.hold_at, **common)
    else:
        scales, lines = toxic_direction(model, processor, dataset.rows, o.method,
                                        top_k=o.top_k, last_layers=o.last_layers, **common)
    return scales.at_strength(o.strength), lines
