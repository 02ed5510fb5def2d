"""Compare two output directories of sgm-ext (scripts/compare_trees.sh), every file below them:
byte for byte, except JSON (compared as data without the keys that hold wall-clock times:
the runs were made at other times) and safetensors files (compared as their tensors, bit for
bit, and metadata: the writer orders the header's metadata differently from run to run)."""
import json
import os
import sys

import torch
from safetensors import safe_open

VOLATILE = {"seconds", "elapsed", "duration", "date", "time", "started", "finished", "latency",
            "wall_s"}


def same_safetensors(a, b):
    with safe_open(a, "pt") as x, safe_open(b, "pt") as y:
        if x.metadata() != y.metadata() or sorted(x.keys()) != sorted(y.keys()):
            return False
        for key in x.keys():
            s, t = x.get_tensor(key), y.get_tensor(key)
            if s.dtype != t.dtype or s.shape != t.shape or not s.view(-1).view(
                    torch.uint8).equal(t.view(-1).view(torch.uint8)):
                return False
    return True


def files(root):
    return {os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs}


def strip(value):
    if isinstance(value, dict):
        return {k: strip(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [strip(v) for v in value]
    return value


def main(old, new):
    names = sorted(files(old) | files(new))
    differ = []
    for name in names:
        a, b = os.path.join(old, name), os.path.join(new, name)
        if not (os.path.isfile(a) and os.path.isfile(b)):
            differ.append(f"{name}: only in {'new' if os.path.exists(b) else 'old'}")
            continue
        if name.endswith(".json"):
            same = strip(json.load(open(a))) == strip(json.load(open(b)))
        elif name.endswith(".safetensors"):
            same = same_safetensors(a, b)
        else:
            same = open(a, "rb").read() == open(b, "rb").read()
        print(f"{'same' if same else 'DIFFERS'}  {name}")
        if not same:
            differ.append(name)
    print(f"{old} vs {new}: {len(names) - len(differ)} of {len(names)} files the same"
          + (f"; differ: {differ}" if differ else ""))
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
