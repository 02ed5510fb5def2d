"""The layering of the package, read from its source: imports go one way (no cycle inside
sgm_ext), library modules never import the command line, no module reaches into another's
private names, and test modules do not import each other (docs/ARCHITECTURE.md)."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = "sgm_ext"
# sgm_ext.kernels is installed from the top-level kernels/ (setup.py maps it there)
SOURCES = {PACKAGE: ROOT / "sgm_ext", f"{PACKAGE}.kernels": ROOT / "kernels"}
COMPILED = f"{PACKAGE}._C"  # the extension module: imported only by its loader


def modules():
    """{dotted module name: path} of every Python module of the package."""
    found = {}
    for package, directory in SOURCES.items():
        for path in sorted(directory.glob("*.py")):
            name = package if path.name == "__init__.py" else f"{package}.{path.stem}"
            found[name] = path
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
    offenders = [(m, line) for m, es in edges.items()
                 if m not in (f"{PACKAGE}.cli", f"{PACKAGE}.__main__")
                 for target, _, line in es if target == f"{PACKAGE}.cli"]
    assert not offenders, offenders


def test_no_private_names_taken_from_another_module():
    known, edges = graph()
    offenders = []
    for module, es in edges.items():
        for target, names, line in es:
            if target == COMPILED and module == f"{PACKAGE}.compiled":
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
    """{module: layer number} from the layer table of docs/ARCHITECTURE.md."""
    layers = {}
    for line in (ROOT / "docs" / "ARCHITECTURE.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].isdigit():
            continue
        for entry in cells[2].replace("\\_", "_").split(","):
            path = entry.strip()
            package, _, stem = path.removesuffix(".py").rpartition("/")
            prefix = f"{PACKAGE}.{package}" if package else PACKAGE
            layers[prefix if stem == "__init__" else f"{prefix}.{stem}"] = int(cells[0])
    return layers


def test_every_module_has_a_layer_and_imports_go_downward():
    known, edges = graph()
    layers = documented_layers()
    assert sorted(layers) == sorted(known), (
        f"docs/ARCHITECTURE.md's layer table lacks {sorted(set(known) - set(layers))} and names "
        f"modules that do not exist: {sorted(set(layers) - set(known))}")
    upward = [(m, line, t, layers[m], layers[t]) for m, es in edges.items()
              for t, _, line in es if t in layers and layers[t] > layers[m]]
    assert not upward, f"imports from a higher layer (module, line, target, layers): {upward}"
