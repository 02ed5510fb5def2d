"""`sgm-ext export`: a Hugging Face model directory with a scale file folded into its weights at
one strength, which plain transformers (or any engine reading the format) loads without sgm-ext.

The model is loaded on the CPU in its stored dtype and patched in fold mode (patching/fold.py:
the same products, in float32, rounded once to the stored dtype), then only the tensors the fold
touched are written back: each weight file holding one is read and written again under its own
name with every other tensor as it was; every other file of the directory (config, tokenizer,
processor, chat template, generation config, untouched shards) is copied byte for byte. A shift
needs a bias: a Linear that has one takes it; one that has none gets one only where the config
can say so (`mlp_bias`), else the export is refused naming the site. Provenance goes into
`sgm_ext_export.json` beside the weights and under `sgm_ext_export` in config.json.

Everything is checked before anything is written, the directory is built under a temporary name
beside OUT and renamed at the end: an error or Ctrl-C leaves no OUT and no temporary files.
"""
import copy
import json
import os
import shutil

from ..core.files import file_sha256, make_temp_dir, umask_mode
from ..core.pause import pause_point
from ..core.scale_math import check_fraction
from ..patching.patcher import check_fingerprint, check_scales, patch
from ..patching.scales import load_scales
from ..version import __version__
from .loading import check_model_dir

SIDECAR = "sgm_ext_export.json"
CONFIG_KEY = "sgm_ext_export"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"



def is_export_dir(path):
    """Whether `path` is a directory sgm-ext export wrote (it holds the sidecar)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, SIDECAR))


def read_record(path):
    """The provenance record of an exported directory (its sidecar), or None."""
    if not is_export_dir(path):
        return None
    with open(os.path.join(path, SIDECAR), encoding="utf-8") as f:
        return json.load(f)


def _inside(a, b):
    """Whether path a is b or lies inside b (both resolved)."""
    a, b = os.path.realpath(a), os.path.realpath(b)
    return a == b or a.startswith(b.rstrip(os.sep) + os.sep)


def _ours_dir(path):
    return os.path.isdir(path) and (is_export_dir(path) or not os.listdir(path))


def check_export_out(out, source, ours=_ours_dir):
    """Refuse OUT before any work: the input itself (or inside it, or holding it), a missing
    parent directory, or an existing path that `ours` does not recognise as one sgm-ext export
    wrote (default: an exported directory, or an empty one)."""
    out = os.fspath(out)
    if _inside(out, source) or _inside(source, out):
        raise ValueError(f"--out {out} is (or contains, or lies inside) the input {source}; "
                         "export writes a new model beside it")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise ValueError(f"--out {out}: the directory {parent} does not exist")
    if os.path.lexists(out) and not ours(out):
        what = "directory" if os.path.isdir(out) else "file"
        raise ValueError(f"--out {out} exists and is not a {what} sgm-ext export wrote; "
                         "refusing to overwrite it (remove it or choose another name)")


def weight_files(model_dir):
    """{checkpoint key: weight file name} of a safetensors checkpoint (sharded or not);
    ValueError for other weight formats."""
    index = os.path.join(model_dir, INDEX)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            return dict(json.load(f)["weight_map"])
    single = os.path.join(model_dir, SINGLE)
    if os.path.isfile(single):
        from safetensors import safe_open

        with safe_open(single, framework="pt") as f:
            return {k: SINGLE for k in f.keys()}
    raise ValueError(f"{model_dir} has no {SINGLE} or {INDEX}: export rewrites safetensors "
                     "checkpoints only (convert .bin weights with save_pretrained first)")


def _auto_class(config):
    if getattr(config, "vision_config", None) is not None:
        from transformers import AutoModelForImageTextToText as auto_class
    else:
        from transformers import AutoModelForCausalLM as auto_class
    return auto_class


def read_config(model_dir):
    """The model's config from its config.json alone (no weights read)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir, local_files_only=True)


def load_stored(model_dir):
    """The model on the CPU in the dtype its weights are stored in (eval mode)."""
    config = read_config(model_dir)
    pause_point("load")
    return _auto_class(config).from_pretrained(model_dir, dtype="auto", local_files_only=True,
                                               device_map={"": "cpu"}).eval()


def _touched(targets):
    """{Linear module path: its first site with a shift, or None} of every Linear a fold
    changes."""
    out = {}
    for t in targets:
        for kind in t.kinds():
            for attr, _ in t.info.fold_points(kind):
                path = f"{t.info.path}.{attr}"
                if out.get(path) is None:
                    out[path] = t.info.site(kind) if kind in t.shifts else None
    return out


def _bias_config(model, needs_bias):
    """(config as a dict for config.json, {parameter name: shape} of the zero biases it adds):
    the model's config with `mlp_bias` turned on where a folded shift created a bias; ValueError
    naming the site where no config setting gives that Linear a bias."""
    config = model.config
    if not needs_bias:
        return None, {}
    changed = copy.deepcopy(config)
    subs = [changed] + [getattr(changed, k) for k in changed.sub_configs if
                        getattr(changed, k, None) is not None] \
        if hasattr(changed, "sub_configs") else [changed]
    for sub in subs:
        if getattr(sub, "mlp_bias", None) is False:
            sub.mlp_bias = True
    import torch

    with torch.device("meta"):
        shadow = type(model)(changed)
    created = {f"{linear}.bias" for linear in needs_bias}  # by fold: not in the checkpoint
    have = {k for k, _ in model.named_parameters()} - created
    new = {k: tuple(p.shape) for k, p in shadow.named_parameters() if k not in have}
    for linear, site in needs_bias.items():
        if f"{linear}.bias" not in new:
            raise ValueError(f"cannot export the shift of site {site}: {linear} has no bias and "
                             f"{type(config).__name__} has no setting that gives it one; export "
                             "the scales without shifts, or use patch / sgm-ext serve")
    others = [k for k in new if not k.endswith(".bias")]
    if others:
        raise ValueError(f"turning on mlp_bias adds more than biases ({others[0]}); cannot "
                         "export the shifts of this model")
    return changed.to_dict(), new


def _checkpoint_keys(model, names, key_map):
    """{model parameter name: checkpoint key} for `names`: the same name, or the name
    transformers' save would give it (checkpoints in an older key layout)."""
    import torch

    out, missing = {}, [n for n in names if n not in key_map]
    for n in names:
        if n in key_map:
            out[n] = n
    if missing:
        from transformers.core_model_loading import revert_weight_conversion

        for n in missing:
            saved = revert_weight_conversion(model, {n: torch.zeros(1)})
            key = next(iter(saved), None) if len(saved) == 1 else None
            if key not in key_map:
                raise ValueError(f"cannot find the weight {n} in the checkpoint's weight files "
                                 "(its key layout is not one export maps)")
            out[n] = key
    return out


def fold_model(model_dir, scales_path, strength, allow_amplify):
    """(record, {checkpoint key: folded tensor}, {added checkpoint key: (tensor, weight
    file)}, config dict to write or None): the fold, checked, with nothing written."""
    scales = load_scales(scales_path)
    model = load_stored(model_dir)
    key_map = weight_files(model_dir)
    targets = check_scales(model, scales, allow_amplify=allow_amplify)
    touched = _touched(targets)
    modules = dict(model.named_modules())
    had_bias = {p: modules[p].bias is not None for p in touched}
    patch(model, scales, mode="fold", strength=strength, allow_amplify=allow_amplify)
    needs_bias = {p: site for p, site in touched.items()
                  if site and not had_bias[p] and modules[p].bias is not None}
    config, zero_biases = _bias_config(model, needs_bias)
    params = dict(model.named_parameters())
    names = [f"{p}.{w}" for p in touched for w in ("weight", "bias")
             if f"{p}.{w}" in params and (w == "weight" or had_bias[p])]
    keys = _checkpoint_keys(model, names, key_map)
    writes = {keys[n]: params[n].detach() for n in names}
    added = _added_tensors(model, params, zero_biases, key_map)
    record = {"sgm_ext_version": __version__, "strength": strength,
              "scales_file": os.path.basename(os.fspath(scales_path)),
              "scales_sha256": file_sha256(scales_path), "allow_amplify": bool(allow_amplify),
              "method": scales.metadata.get("method", ""),
              "sites": _site_record(targets), "tensors": sorted(writes),
              "added_biases": sorted(added)}
    return record, writes, added, config


def _added_tensors(model, params, zero_biases, key_map):
    """{checkpoint key: (tensor, weight file)} of the biases a turned-on mlp_bias adds: the
    folded ones fold created, zeros for the rest; each goes to its Linear's weight's file."""
    import torch

    out = {}
    for name, shape in zero_biases.items():
        weight = name[: -len("bias")] + "weight"
        w = params[weight]
        value = params[name].detach() if name in params else torch.zeros(shape, dtype=w.dtype)
        key = _checkpoint_keys(model, [weight], key_map)[weight]
        out[key[: -len("weight")] + "bias"] = (value, key_map[key])
    return out


def _site_record(targets):
    """{site: {"kind", "damped", "shifted"}} of what was folded."""
    out = {}
    for t in targets:
        for kind in t.kinds():
            s = t.scales.get(kind)
            out[t.info.site(kind)] = {"kind": kind,
                                      "damped": int((s != 1).sum()) if s is not None else 0,
                                      "shifted": kind in t.shifts}
    return out


def _write_shards(model_dir, tmp, writes, added):
    """Write every weight file that holds a folded or added tensor under its own name (the
    other tensors and the file's metadata as they were); returns the names rewritten."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    key_map = weight_files(model_dir)
    files = {key_map[key] for key in writes} | {name for _, name in added.values()}
    for name in sorted(files):
        pause_point("export-shard")
        with safe_open(os.path.join(model_dir, name), framework="pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        for key in tensors:
            if key in writes:
                tensors[key] = writes[key].to(tensors[key].dtype).contiguous()
        for key, (value, file) in added.items():
            if file == name:
                tensors[key] = value.contiguous()
        save_file(tensors, os.path.join(tmp, name), metadata=meta)
    return sorted(files)


def _copy_rest(model_dir, tmp, skip):
    """Copy every file and folder of the model directory not in `skip`, byte for byte."""
    for entry in sorted(os.listdir(model_dir)):
        src, dst = os.path.join(model_dir, entry), os.path.join(tmp, entry)
        if entry in skip or entry == SIDECAR:
            continue
        if os.path.isdir(src):
            shutil.copytree(src, dst)
        else:
            shutil.copy2(src, dst)


def _write_config(model_dir, tmp, config, record):
    """config.json with the record under CONFIG_KEY (and mlp_bias turned on where a shift
    needed a bias): the original file's keys, only those changed."""
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        data = json.load(f)
    if config is not None:
        _turn_on_bias(data, config)
    data[CONFIG_KEY] = {k: record[k] for k in ("sgm_ext_version", "strength", "scales_file",
                                               "scales_sha256")}
    with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def _turn_on_bias(data, config):
    """Set mlp_bias in `data` (a config.json dict) wherever `config` has it on."""
    if config.get("mlp_bias") is True:
        data["mlp_bias"] = True
    for key, value in config.items():
        if isinstance(value, dict) and value.get("mlp_bias") is True:
            data.setdefault(key, {})["mlp_bias"] = True


def _write_index(model_dir, tmp, added):
    """The sharded checkpoint's index with the added biases mapped to their files (a one-file
    checkpoint has no index: its biases went into model.safetensors itself)."""
    index = os.path.join(model_dir, INDEX)
    if not os.path.isfile(index):
        return
    with open(index, encoding="utf-8") as f:
        data = json.load(f)
    data["weight_map"].update({key: file for key, (_, file) in added.items()})
    data["weight_map"] = dict(sorted(data["weight_map"].items()))
    with open(os.path.join(tmp, INDEX), "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def export_model(model_dir, scales_path, out, strength=1.0, allow_amplify=False):
    """Write OUT: the model directory with the scales folded in at `strength`. Returns the
    provenance record (also in OUT/sgm_ext_export.json). Raises before writing anything on
    any bad input; an error or Ctrl-C while writing leaves no OUT and no temporary files."""
    model_dir, out = os.fspath(model_dir), os.fspath(out)
    check_model_dir(model_dir)
    strength = check_fraction(strength, "--strength")
    check_export_out(out, model_dir)
    # what needs no weights is checked before the load: the file, its values, its model
    scales = load_scales(scales_path)
    scales.validate(allow_amplify)
    check_fingerprint(read_config(model_dir), scales)
    tmp = make_temp_dir(out)  # OUT's directory must take it: known before the slow part
    try:
        record, writes, added, config = fold_model(model_dir, scales_path, strength,
                                                   allow_amplify)
        rewritten = _write_shards(model_dir, tmp, writes, added)
        skip = set(rewritten) | {"config.json"} | ({INDEX} if added else set())
        _copy_rest(model_dir, tmp, skip)
        if added:
            _write_index(model_dir, tmp, added)
        _write_config(model_dir, tmp, config, record)
        _open_modes(tmp)
        record["weight_files_rewritten"] = rewritten
        with open(os.path.join(tmp, SIDECAR), "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)
            f.write("\n")
        pause_point("export-rename")
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return record


def _open_modes(tmp):
    """Give every file written into the export the mode `cp` would (0666 less the umask):
    safetensors and shutil copy the source's mode or their own, and a serving container or
    another user must be able to read the model."""
    mode = umask_mode(0o666)
    for root, dirs, files in os.walk(tmp):
        for name in files:
            os.chmod(os.path.join(root, name), mode)
        for name in dirs:
            os.chmod(os.path.join(root, name), umask_mode(0o777))


def _replace_dir(tmp, out):
    """Move the finished directory to OUT (an earlier export there is removed after)."""
    if not os.path.lexists(out):
        os.replace(tmp, out)
        return
    old = tmp + ".old"
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)  # the earlier export stays as it was
        raise
    shutil.rmtree(old, ignore_errors=True)
