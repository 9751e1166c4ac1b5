"""The package's shape in numbers, for refactors to report before/after:

    .venv/bin/python tests/stress/code_metrics.py [PACKAGE_DIR]

lines per module (the longest), the 15 longest functions, function-local imports (and
where), and import cycles among the package's modules (module-level imports).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import networkx as nx


def _module_name(root: Path, path: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> list[str]:
    if node.level == 0:
        base = node.module or ""
    else:
        pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
        pkg = pkg[: len(pkg) - (node.level - 1)]
        base = ".".join(pkg + ([node.module] if node.module else []))
    return [base] + [f"{base}.{a.name}" for a in node.names]


def main() -> int:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "apam_gossip").resolve()
    files = sorted(root.rglob("*.py"))
    names = {_module_name(root, f): f for f in files}
    sizes, funcs, local_imports = [], [], []
    graph = nx.DiGraph()
    for name, f in names.items():
        tree = ast.parse(f.read_text())
        sizes.append((len(f.read_text().splitlines()), name))
        graph.add_node(name)
        for node in tree.body:  # module-level imports only: cycles are about load order
            targets = []
            if isinstance(node, ast.ImportFrom):
                targets = _resolve(name, f.name == "__init__.py", node)
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for t in targets:
                if t in names and t != name:
                    graph.add_edge(name, t)
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                funcs.append((node.end_lineno - node.lineno + 1, f"{name}.{node.name}"))
                for sub in ast.walk(node):
                    if isinstance(sub, ast.Import | ast.ImportFrom):
                        local_imports.append(f"{name}:{sub.lineno}")
    cycles = list(nx.simple_cycles(graph))
    sizes.sort(reverse=True)
    funcs.sort(reverse=True)
    print(f"modules: {len(sizes)}, lines: {sum(s for s, _ in sizes)}; "
          f"over 600 lines: {sum(1 for s, _ in sizes if s > 600)}")
    for s, n in sizes[:12]:
        print(f"  {s:5d}  {n}")
    print("15 longest functions:")
    for s, n in funcs[:15]:
        print(f"  {s:5d}  {n}")
    print(f"function-local imports: {len(local_imports)}")
    print(f"import cycles (module level): {len(cycles)}"
          + (": " + "; ".join(" -> ".join(c) for c in cycles[:5]) if cycles else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
