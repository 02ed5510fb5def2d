"""The module paths of the flat layout (sgm-ext before the layer folders), kept working.

Until the layers became folders every module sat in `sgm_ext/`; user code and the README of
that time import `sgm_ext.evaluate`, `sgm_ext.report`, `sgm_ext.benchmarks`, `sgm_ext.interop`,
`sgm_ext.vllm_plugin` and more. OLD_PATHS is the one table of where each now lives; the finder
below makes `import sgm_ext.<old>` and `from sgm_ext.<old> import x` give the module at its new
path (the same module object, not a copy), imported only when asked for. The old modules
whose names are now folders (ops, patching, profile, serving, cli) need no entry: each folder's
__init__.py offers the old module's public names.
"""
import importlib
import importlib.abc
import importlib.util
import sys

PACKAGE = "sgm_ext"

OLD_PATHS = {
    "activations": "core.activations", "scale_math": "core.scale_math",
    "fingerprints": "core.fingerprints", "files": "core.files", "progress": "core.progress",
    "backends": "ops.backends", "reference": "ops.reference", "compiled": "ops.compiled",
    "build": "ops.build",
    "registry": "patching.registry", "scales": "patching.scales", "interop": "patching.interop",
    "data": "profile.data", "auroc": "profile.auroc", "inputs": "profile.inputs",
    "responses": "profile.responses", "pooling": "profile.pooling",
    "expertise": "profile.expertise", "transport": "profile.transport",
    "collect": "profile.collect",
    "prompts": "evaluation.prompts", "benchmarks": "evaluation.benchmarks",
    "judges": "evaluation.judges", "generation": "evaluation.generation",
    "plots": "evaluation.plots", "report": "evaluation.report", "evaluate": "evaluation.evaluate",
    "vllm_plugin": "serving.vllm_plugin",
    "loading": "app.loading", "synthetic": "app.synthetic", "realmodel": "app.realmodel",
}


def new_path(old):
    """'sgm_ext.<old>' -> the module's dotted path now; None for a name not in the table."""
    prefix, _, name = old.partition(".")
    if prefix != PACKAGE or name not in OLD_PATHS:
        return None
    return f"{PACKAGE}.{OLD_PATHS[name]}"


class _Alias(importlib.abc.Loader):
    def __init__(self, target):
        self.target = target

    def create_module(self, spec):
        return None  # a placeholder, replaced in sys.modules by exec_module

    def exec_module(self, module):
        # the import system returns what sys.modules holds under the name after this call:
        # the module at its new path, its own __spec__ and __name__ untouched
        sys.modules[module.__name__] = importlib.import_module(self.target)


class OldPathFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        moved = new_path(fullname)
        return None if moved is None else importlib.util.spec_from_loader(fullname, _Alias(moved))


def install():
    """Put the finder on sys.meta_path (once), and alias the modules already imported so
    that importing them by the old path never rebinds a name of the package (sgm_ext.backends
    is also the function `backends`)."""
    if not any(isinstance(f, OldPathFinder) for f in sys.meta_path):
        sys.meta_path.append(OldPathFinder())
    for old, new in OLD_PATHS.items():
        module = sys.modules.get(f"{PACKAGE}.{new}")
        if module is not None:
            sys.modules.setdefault(f"{PACKAGE}.{old}", module)
