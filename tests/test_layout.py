"""
The package's layout keeps the architecture's arrows pointing one way (STYLE.md, "Subpackages by
feature"): read from the modules' import statements (ast, nothing imported), so a new import that
breaks a direction fails here before it becomes a tangle.

Units: each subpackage of wingate_map (relay, policy, config, ...) is one unit, each top-level
module (values, sessions, cli...) another.  Imports under C{if TYPE_CHECKING:} are left out: they
never run (values.py names config's Destination in an annotation that way).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "wingate_map"

# testing.py builds its in-memory cluster store on the real one's base class.
PRIVATE_IMPORT_EXCEPTIONS = {("wingate_map.testing", "wingate_map.cluster._state")}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path, name: str) -> set[str]:
    """
    Every module C{name} (the module at C{path}) imports, as absolute dotted names; for
    C{from X import y}, C{X.y} when that is a module of the package, else C{X} (outside the
    package both, since C{y} may be a module).
    """
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                if target.split(".")[0] != "wingate_map":
                    found.update((target, candidate))  # a module or a name: both kept outside
                else:
                    found.add(candidate if candidate in MODULES else target)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
IMPORTS = {name: _imports(path, name) for name, path in MODULES.items()}


def _unit(module: str) -> str | None:
    """
    The unit C{module} belongs to (C{relay} for C{wingate_map.relay._pump}), or None outside
    the package (and for the package's own C{__init__}).
    """
    parts = module.split(".")
    if parts[0] != "wingate_map" or len(parts) < 2:
        return None
    return parts[1]


def _unit_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, imported in IMPORTS.items():
        unit = _unit(module)
        if unit is None:
            continue
        graph.setdefault(unit, set())
        for target in imported:
            other = _unit(target)
            if other is not None and other != unit:
                graph[unit].add(other)
    return graph


def _imports_of_unit(unit: str) -> set[str]:
    return _unit_graph().get(unit, set())


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """
    The strongly connected components of more than one unit (Tarjan), each a cycle.
    """
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph.get(node, ())):
            if other not in index:
                connect(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def test_the_features_have_folders():
    """
    A newcomer finds the relay, the policy, the service tree, the admin API, the configuration
    and the events in folders of those names, each with a public __init__.
    """
    for name in ("relay", "policy", "service", "admin", "config", "events"):
        assert (PACKAGE / name / "__init__.py").is_file(), name


def test_no_import_cycle_between_units():
    """
    No subpackage or top-level module imports, directly or through others, one that imports it
    back (the rules <-> identity circle is gone: both use wingate_map.values).
    """
    assert _cycles(_unit_graph()) == []


def test_configuration_model_knows_nothing_of_the_runtime():
    """
    The configuration imports only the shared values, the errors, TLS settings and the
    cluster's address grammar: never the policy, the relay, events, admin, service or CLI.
    """
    assert _imports_of_unit("config") <= {"values", "errors", "tls", "cluster"}


def test_relay_never_imports_admin_cli_or_tap():
    """
    The relay does not know who embeds it: no admin API, CLI, tap, service tree or test helpers.
    """
    assert not _imports_of_unit("relay") & {"admin", "cli", "tap", "service", "testing"}


def test_policy_never_imports_the_relay():
    """
    Rules and identity decide without knowing how the session is carried: the policy imports
    neither the relay nor anything above it.
    """
    assert not _imports_of_unit("policy") & {"relay", "events", "admin", "service", "cli", "tap", "testing"}


def test_subpackages_are_used_through_their_public_init():
    """
    Code in one unit imports another subpackage's names from its __init__, never from its
    private modules (tests and benchmarks may).
    """
    crossings = []
    for module, imported in IMPORTS.items():
        for target in imported:
            parts = target.split(".")
            if len(parts) > 2 and parts[0] == "wingate_map" and parts[2].startswith("_"):
                if _unit(module) != parts[1] and (module, target) not in PRIVATE_IMPORT_EXCEPTIONS:
                    crossings.append((module, target))
    assert crossings == []


def test_subpackage_inits_only_re_export():
    """
    Each subpackage's __init__ is tiny: it lists its public names (__all__) and imports them
    from its own private modules.
    """
    for init in PACKAGE.glob("*/__init__.py"):
        name = _module_name(init)
        tree = ast.parse(init.read_text())
        assigned = {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets if isinstance(t, ast.Name)}
        assert "__all__" in assigned, name
        for target in IMPORTS[name]:
            if target.startswith("wingate_map."):
                assert target.startswith(name + "._"), (name, target)


def test_private_modules_of_dependencies_only_where_isolated():
    """
    Twisted's and pyOpenSSL's private modules are imported only by the one module that says
    why; twisted.internet.tcp (whose classes are not for end users) only for C{makeBinding},
    the public way to ask listenTCP for SO_REUSEPORT, and in the one module that builds the
    lean listening port on C{tcp.Port} (wingate_map.relay._accept, which says why).
    """
    allowed = {"wingate_map.tls._openssl"}
    tcp_allowed = {"wingate_map.relay._accept": {"twisted.internet.tcp.Port", "twisted.internet.tcp.Server"}}
    offenders = []
    for module, imported in IMPORTS.items():
        for target in imported:
            parts = target.split(".")
            private = parts[0] in ("twisted", "OpenSSL") and any(p.startswith("_") for p in parts[1:])
            if private and module not in allowed:
                offenders.append((module, target))
        tcp_names = {t for t in imported if t.startswith("twisted.internet.tcp.")}
        if ("twisted.internet.tcp" in imported and not tcp_names) or tcp_names - {"twisted.internet.tcp.makeBinding"} - tcp_allowed.get(module, set()):
            offenders.append((module, "twisted.internet.tcp"))
    assert offenders == []
