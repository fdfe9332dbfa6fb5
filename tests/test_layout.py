"""Code you can walk: the study and bench modules stay under 400 lines and import each other one way (no cycle,
counting the imports inside functions too)."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / 'foundry_upcycle'
CHECKED = ('study', 'bench')
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    out = {}
    for sub in CHECKED:
        for path in sorted((PKG / sub).glob('*.py')):
            out[f'foundry_upcycle.{sub}.{path.stem}'] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules of `known` that `path` imports anywhere (module level or inside functions)."""
    package = name.rsplit('.', 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                parts = package.split('.')[:len(package.split('.')) - node.level + 1]
                base = '.'.join(parts + ([base] if base else []))
            found.add(base)
            found |= {f'{base}.{a.name}' for a in node.names}
    return {m for m in found if m in known and m != name}


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str]:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        state[n] = 2
        stack.pop()
        return []
    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return []


def test_modules_are_short():
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f'modules over {MAX_LINES} lines: {long}'


def test_imports_run_one_way():
    mods = _modules()
    graph = {name: _imports(name, path, set(mods)) for name, path in mods.items()}
    assert graph['foundry_upcycle.study.pipeline'] >= {'foundry_upcycle.study.plan', 'foundry_upcycle.study.arms'}
    assert _cycle(graph) == [], f'import cycle: {" -> ".join(_cycle(graph))}'


def test_the_cycle_finder_finds_one():
    assert _cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
    assert _cycle({'a': {'b'}, 'b': set()}) == []
