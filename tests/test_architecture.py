"""The layering of the package, read from its source: a layer is a folder (docs/ARCHITECTURE.md
names each layer's folders and top-level files), imports go one way (downward, no cycle inside
sgm_ext), library modules never import the command line, no module reaches into another's
private names, no module is long, and test modules do not import each other."""
import ast
import pathlib

from cli_runs import HANG_S

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = "sgm_ext"
# sgm_ext.kernels is installed from the top-level kernels/ (setup.py maps it there)
SOURCES = {PACKAGE: ROOT / "sgm_ext", f"{PACKAGE}.kernels": ROOT / "kernels"}
COMPILED = f"{PACKAGE}._C"  # the extension module: imported only by its loader


def modules():
    """{dotted module name: path} of every Python module of the package."""
    found = {}
    for package, directory in SOURCES.items():
        for path in sorted(directory.rglob("*.py")):
            parts = path.relative_to(directory).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if package == PACKAGE and parts[:1] == ("kernels",):
                continue  # not a source folder (kernels/ is installed from the top level)
            found[".".join((package,) + parts)] = path
    return found


def _resolve(module, path, node):
    """The absolute module an ImportFrom node names (relative imports resolved)."""
    if node.level == 0:
        return node.module or ""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def imports(module, path, known):
    """[(imported module, names taken from it, line)] of every import in a module's source,
    those inside functions too; `from pkg import sub` counts as importing pkg.sub."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, (), node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, path, node)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in known or sub == COMPILED:
                    found.append((sub, (), node.lineno))
                else:
                    found.append((base, (alias.name,), node.lineno))
    return found


def graph():
    known = modules()
    edges = {}
    for module, path in known.items():
        edges[module] = {(target, names, line) for target, names, line in
                         imports(module, path, known) if target.startswith(PACKAGE)}
    return known, edges


def test_no_import_cycle_inside_the_package():
    # The package's __init__ is its public face: it imports the modules, and no module may
    # import it back (that would be a cycle through every module it imports).
    known, edges = graph()
    back = [(m, line) for m, es in edges.items() if m != PACKAGE
            for target, _, line in es if target == PACKAGE]
    assert not back, f"modules importing the package root (a cycle through __init__): {back}"
    deps = {m: {t for t, _, _ in es if t in known and t != PACKAGE} for m, es in edges.items()}
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(deps[m]):
            if state.get(t) == "open":
                cycle = stack[stack.index(t):] + [t]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(deps):
        if m not in state:
            visit(m)
    assert len(state) == len(known) > 20  # every module was walked


def test_the_cycle_check_finds_a_cycle(tmp_path, monkeypatch):
    # The check above must be able to fail: two modules importing each other are caught.
    (tmp_path / "__init__.py").write_text("")
    (tmp_path / "a.py").write_text("from . import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from .a import g\n")
    for i in range(21):  # the check also wants a package of realistic size
        (tmp_path / f"m{i}.py").write_text("")
    monkeypatch.setitem(SOURCES, PACKAGE, tmp_path)
    monkeypatch.delitem(SOURCES, f"{PACKAGE}.kernels")
    try:
        test_no_import_cycle_inside_the_package()
    except AssertionError as e:
        assert "sgm_ext.a -> sgm_ext.b -> sgm_ext.a" in str(e)
    else:
        raise AssertionError("the cycle a -> b -> a was not found")


def test_library_modules_never_import_the_command_line():
    _, edges = graph()
    cli = f"{PACKAGE}.cli"
    offenders = [(m, line) for m, es in edges.items()
                 if m != cli and not m.startswith(cli + ".") and m != f"{PACKAGE}.__main__"
                 for target, _, line in es if target == cli or target.startswith(cli + ".")]
    assert not offenders, offenders


def test_no_private_names_taken_from_another_module():
    known, edges = graph()
    offenders = []
    for module, es in edges.items():
        for target, names, line in es:
            if target == COMPILED and module == f"{PACKAGE}.ops.compiled":
                continue  # the loader of the extension module
            if target.rpartition(".")[2].startswith("_") and target != PACKAGE:
                offenders.append((module, line, target))
            offenders += [(module, line, f"{target}.{n}") for n in names
                          if n.startswith("_") and not n.startswith("__")]
        # attribute access module._name on an imported package module
        tree = ast.parse(known[module].read_text())
        aliases = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                   for a in n.names if f"{_resolve(module, known[module], n)}.{a.name}" in known}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id in aliases and node.attr.startswith("_") \
                    and not node.attr.startswith("__"):
                offenders.append((module, node.lineno, f"{node.value.id}.{node.attr}"))
    assert not offenders, offenders


def test_test_modules_do_not_import_each_other():
    tests = {p.stem for p in (ROOT / "tests").glob("test_*.py")}
    offenders = []
    for path in sorted((ROOT / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            offenders += [(path.name, node.lineno, n) for n in names if n in tests]
    assert not offenders, f"shared test helpers belong in a helper module: {offenders}"


def documented_layers():
    """{folder or top-level file, as a dotted prefix: layer number} from the layer table of
    docs/ARCHITECTURE.md (third column: `core/`, `version.py`, ...)."""
    layers = {}
    for line in (ROOT / "docs" / "ARCHITECTURE.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].isdigit():
            continue
        for entry in cells[2].replace("\\_", "_").replace("`", "").split(","):
            path = entry.strip().removesuffix("/").removesuffix(".py")
            layers[PACKAGE if path == "__init__" else f"{PACKAGE}.{path}"] = int(cells[0])
    return layers


def layer_of(module, layers):
    """The layer of the longest documented prefix of `module` (its folder, or itself)."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in layers and (n == len(parts) or prefix != PACKAGE):
            return layers[prefix]
    return None


def test_every_module_has_a_layer_and_imports_go_downward():
    known, edges = graph()
    layers = documented_layers()
    unplaced = sorted(m for m in known if layer_of(m, layers) is None)
    assert not unplaced, f"docs/ARCHITECTURE.md's layer table places no folder of {unplaced}"
    missing = sorted(p for p in layers if not any(m == p or m.startswith(p + ".") for m in known))
    assert not missing, f"docs/ARCHITECTURE.md's layer table names what does not exist: {missing}"
    upward = upward_imports(edges, known, layers)
    assert not upward, f"imports from a higher layer (module, line, target): {upward}"


def test_a_layer_is_a_folder():
    # Every module below the package root sits in the folder of its layer: only the package's
    # face, `python -m sgm_ext` and the version stay at the top.
    known, _ = graph()
    top = sorted(m for m in known if m.count(".") == 1 and known[m].name != "__init__.py"
                 and m != f"{PACKAGE}.kernels")
    assert top == [f"{PACKAGE}.__main__", f"{PACKAGE}.version"], top


MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80


def test_no_long_module_and_no_long_function():
    known, _ = graph()
    long_modules, long_functions = [], []
    for module, path in known.items():
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            long_modules.append((module, len(text.splitlines())))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long_functions.append((module, node.name, lines))
    assert not long_modules, f"modules over {MAX_MODULE_LINES} lines: {long_modules}"
    assert not long_functions, f"functions over {MAX_FUNCTION_LINES} lines: {long_functions}"


def upward_imports(edges, known, layers):
    return [(m, line, t) for m, es in edges.items() for t, _, line in es
            if t in known and layer_of(t, layers) > layer_of(m, layers)]


def test_the_layer_check_finds_an_upward_import():
    # The downward rule must be able to fail: a foundation module importing the command line.
    layers = {f"{PACKAGE}.core": 0, f"{PACKAGE}.cli": 6}
    known = {f"{PACKAGE}.core.files", f"{PACKAGE}.cli.main"}
    edges = {f"{PACKAGE}.core.files": {(f"{PACKAGE}.cli.main", (), 3)},
             f"{PACKAGE}.cli.main": {(f"{PACKAGE}.core.files", (), 1)}}
    assert upward_imports(edges, known, layers) == [(f"{PACKAGE}.core.files", 3,
                                                     f"{PACKAGE}.cli.main")]


# The module paths of the flat layout, as README.md and user code of that time import them.
OLD_IMPORTS = r"""
import sgm_ext
from sgm_ext import profile, vllm_plugin
from sgm_ext.benchmarks import load_benchmark
from sgm_ext.evaluate import evaluate
from sgm_ext.report import summary_table, write_report
from sgm_ext.backends import selected
import sgm_ext.scales, sgm_ext.registry
from sgm_ext.core import old_paths
assert callable(sgm_ext.backends) and callable(selected)   # the function is not rebound
assert sgm_ext.report is sgm_ext.evaluation.report
assert vllm_plugin is sgm_ext.serving.vllm_plugin
assert vllm_plugin.__name__ == "sgm_ext.serving.vllm_plugin"
from sgm_ext.serving import check_for_serving, read_settings   # folders offer the old names
from sgm_ext.patching import patch, unpatch
assert sgm_ext.scales.ScaleSet is sgm_ext.ScaleSet
assert callable(sgm_ext.interop.from_aura) and callable(sgm_ext.realmodel.checkpoint)
assert callable(sgm_ext.build.build) and callable(profile.run) and callable(profile.collect)
import importlib
for old, new in old_paths.OLD_PATHS.items():
    assert importlib.import_module("sgm_ext." + old) is importlib.import_module("sgm_ext." + new)
try:
    import sgm_ext.no_such_module
except ModuleNotFoundError:
    pass
else:
    raise AssertionError("an unknown name imported")
print("ok")
"""


def test_the_flat_layout_module_paths_still_import():
    import subprocess
    import sys
    res = subprocess.run([sys.executable, "-c", OLD_IMPORTS], capture_output=True, text=True,
                         cwd=ROOT, timeout=HANG_S)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stdout + res.stderr[-3000:]
