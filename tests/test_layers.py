"""The import direction runs one way (DESIGN.md, "Layers"): entry points above actors, actors above the
domain, bus and hw at the bottom; nothing imports upwards, and no two modules import each other."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("enpire", "actors", "bus", "hw")
# Entry points wire actors together (commands a user runs); every other enpire module is the domain.
ENTRY_POINTS = {"enpire.fleet", "enpire.cell", "enpire.status", "enpire.logs", "enpire.report", "enpire.cli",
                "enpire.__main__"}
RANK = {"entry": 3, "actors": 2, "domain": 1, "bus": 0, "hw": 0}


def _modules() -> dict[str, Path]:
    mods = {}
    for top in PACKAGES:
        for path in (ROOT / top).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = path
    return mods


def _imports(path: Path, mods: dict[str, Path]) -> set[str]:
    """Modules of this project that `path` imports, anywhere in the file (a local import counts too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import sub` imports the submodule; `from mod import name` imports mod
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module
                     for a in node.names]
        out.update(n for n in names if n in mods)
    return out


def layer(module: str) -> str:
    top = module.split(".")[0]
    if top == "enpire":
        return "entry" if module in ENTRY_POINTS else "domain"
    return top


def test_layer_of_each_kind_of_module():
    assert [layer(m) for m in ("enpire.fleet", "enpire.metrics", "actors.judge", "bus.events", "hw.pusht")] == \
        ["entry", "domain", "actors", "bus", "hw"]


def test_no_import_points_upwards():
    mods = _modules()
    upward = []
    for name, path in mods.items():
        for dep in _imports(path, mods):
            if RANK[layer(dep)] > RANK[layer(name)]:
                upward.append(f"{name} ({layer(name)}) imports {dep} ({layer(dep)})")
    assert not upward, "imports against the layering:\n" + "\n".join(sorted(upward))


def test_nothing_in_the_domain_imports_the_actor_runtime():
    mods = _modules()
    offenders = [name for name, path in mods.items()
                 if layer(name) == "domain" and any(d.startswith("actors") for d in _imports(path, mods))]
    assert offenders == []


def test_no_import_cycle():
    mods = _modules()
    graph = {name: _imports(path, mods) - {name} for name, path in mods.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checks_see_a_violation(tmp_path):
    """The graph is read from the sources: a domain module importing the runtime is found."""
    mods = {"enpire.x": tmp_path / "x.py", "actors.runtime": tmp_path / "r.py"}
    mods["enpire.x"].write_text("from actors.runtime import Ref\n")
    assert _imports(mods["enpire.x"], mods) == {"actors.runtime"}
    assert RANK[layer("actors.runtime")] > RANK[layer("enpire.x")]


# Modules the architecture issue (#12) bounded: one concern each, the pure rules in domain modules.
BOUNDED = {"actors/lease_queue.py": 350, "actors/judge.py": 350, "enpire/agents/llm.py": 350}


def test_scheduler_judge_and_llm_modules_stay_small():
    sizes = {path: len((ROOT / path).read_text().splitlines()) for path in BOUNDED}
    over = [f"{path}: {n} lines (bound {BOUNDED[path]})" for path, n in sizes.items() if n > BOUNDED[path]]
    assert not over, "split by concern:\n" + "\n".join(over)


OTHER_TOKENS = {"output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens"}


def _token_sums(path: Path) -> list[int]:
    """Lines adding input tokens to output or to Anthropic's cache tokens, however the fields are reached
    (attribute, name, ["key"], .get("key"), typed_get(d, "key", ...)): token arithmetic made outside
    enpire.ledger (call_tokens, anthropic_input)."""
    def name(node) -> str:
        if isinstance(node, ast.Attribute):
            return node.attr
        if isinstance(node, ast.Name):
            return node.id
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
            return str(node.slice.value)
        if isinstance(node, ast.Call):  # int(x["k"] or 0), .get("k"), typed_get(d, "k", int, 0)
            keys = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            return keys[0] if keys else next((name(a) for a in node.args if name(a)), "")
        if isinstance(node, ast.BoolOp):
            return name(node.values[0])
        return ""

    def leaves(node) -> set[str]:
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            return leaves(node.left) | leaves(node.right)
        return {name(node)}

    tops = [n for n in ast.walk(ast.parse(path.read_text(), str(path))) if isinstance(n, ast.BinOp)]
    inner = {id(c) for n in tops for c in (n.left, n.right)}
    return sorted({n.lineno for n in tops if isinstance(n.op, ast.Add) and id(n) not in inner
                   and "input_tokens" in (s := leaves(n)) and s & OTHER_TOKENS})


def test_one_token_arithmetic(tmp_path):
    found = [f"{p.relative_to(ROOT)}:{line}" for p in sorted(_modules().values())
             if p != ROOT / "enpire" / "ledger.py" for line in _token_sums(p)]
    assert found == [], "count tokens with enpire.ledger (call_tokens, anthropic_input):\n" + "\n".join(found)
    written_out = tmp_path / "x.py"  # the scan sees sums written out, in every spelling
    written_out.write_text("total = r.input_tokens + r.output_tokens\nboth = input_tokens + cached\n"
                           "n = u['input_tokens'] + u['cache_read_input_tokens'] + w\n"
                           "m = int(u.get('input_tokens') or 0) + int(u.get('output_tokens') or 0)\n"
                           "k = typed_get(u, 'input_tokens', int, 0) + c.cache_creation_input_tokens\n"
                           "fine = a.input_tokens + b.input_tokens\n")
    assert _token_sums(written_out) == [1, 3, 4, 5]
