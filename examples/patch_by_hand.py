"""Damp chosen MLP neurons of a tiny Llama with the fused op, by hand, and check it against
the forward-hook way (what AurA does).

    .venv/bin/python examples/patch_by_hand.py

The model is a random-weight LlamaForCausalLM built from a config (no download). Each MLP's
forward becomes down_proj(act_mul_scale(gate_proj(x), up_proj(x), scale)): activation,
product and per-neuron scale in one pass over the [tokens, intermediate] activations.
"""
import time
import types

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import sgm_ext


def fused_forward(mlp, x):
    h = sgm_ext.act_mul_scale(mlp.gate_proj(x), mlp.up_proj(x), mlp.sgm_scale, act="silu")
    return mlp.down_proj(h)


def main():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(config).eval()
    mlps = [layer.mlp for layer in model.model.layers]
    # 5% of each layer's neurons are "experts", damped to 0.2 of their output
    scales = []
    for _ in mlps:
        s = torch.ones(config.intermediate_size)
        s[torch.randperm(config.intermediate_size)[: config.intermediate_size // 20]] = 0.2
        scales.append(s)
    ids = torch.randint(0, config.vocab_size, (2, 24))

    with torch.no_grad():
        plain = model(ids).logits
        # reference: a forward pre-hook scales the input of down_proj, i.e. act(gate) * up
        hooks = [m.down_proj.register_forward_pre_hook(lambda mod, args, s=s: (args[0] * s,))
                 for m, s in zip(mlps, scales)]
        hooked = model(ids).logits
        for h in hooks:
            h.remove()
        for m, s in zip(mlps, scales):
            m.sgm_scale = s
            m.forward = types.MethodType(fused_forward, m)
        t = time.perf_counter()
        fused = model(ids).logits
        elapsed = time.perf_counter() - t

    print("backends:")
    for name, info in sgm_ext.backends().items():
        print(f"  {name:7s} {'available' if info.available else 'unavailable: ' + info.reason}")
    from sgm_ext.ops.backends import selected
    print(f"act_mul_scale runs on: {selected('act_mul_scale', 'cpu')}")
    rel = ((fused - hooked).abs().max() / hooked.abs().max()).item()
    moved = ((hooked - plain).abs().max() / plain.abs().max()).item()
    print(f"suppression moved the logits by {moved:.3g} (relative max)")
    print(f"fused vs hook reference: relative max difference {rel:.3g} "
          f"({elapsed * 1e3:.1f} ms forward)")
    if rel > 1e-5:
        raise SystemExit("fused forward does not match the hook reference")


if __name__ == "__main__":
    main()
