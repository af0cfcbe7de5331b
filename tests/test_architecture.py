"""The house rules, checked on the source: families are named only in their own modules and the registration,
``data/`` never needs ``models/``, no import cycles, the package's usage listing names real commands."""
import ast
import importlib.util
import io
import tokenize
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PACKAGE = Path(__file__).resolve().parent.parent / 'open_clip_rank'
# Modules every family shares: they dispatch through the registry and the rank-model protocol.
GENERIC = ['registry.py', 'specs.py', 'rank.py', 'make_shards.py', 'inference.py', 'train.py', '__main__.py',
           'integration', 'evaluation/validation.py', 'evaluation/metrics.py', 'data/shards.py', 'data/loaders.py',
           'data/batches.py', 'files', 'pictures', 'models/base.py', 'models/checkpoint.py', 'models/towers.py',
           'losses/__init__.py', 'losses/micro_batches.py', 'select.py', 'scoring/curation.py', 'evaluate.py',
           'push_to_hf_hub.py', 'hub']


def _modules():
    return sorted(p for p in PACKAGE.rglob('*.py'))


def _name(path: Path) -> str:
    parts = ['open_clip_rank', *path.relative_to(PACKAGE).with_suffix('').parts]
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _imports(path: Path):
    """Every package module ``path`` imports, at module level or inside a function."""
    tree = ast.parse(path.read_text())
    here = _name(path).split('.')
    package = here if path.name == '__init__.py' else here[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = '.'.join(base + ([node.module] if node.module else [])) if node.level else node.module
            for alias in node.names:  # `from . import x` may import the submodule x
                candidates = [f'{module}.{alias.name}', module]
                found.add(next((c for c in candidates if c and _is_package_module(c)), module))
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m and m.startswith('open_clip_rank')}


def _is_package_module(name: str) -> bool:
    relative = Path(*name.split('.')[1:])
    return (PACKAGE / relative).with_suffix('.py').is_file() or (PACKAGE / relative / '__init__.py').is_file()


def _docstring_lines(tree):
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and \
                ast.get_docstring(node, clean=False) is not None:
            lines.update(range(node.body[0].lineno, node.body[0].end_lineno + 1))
    return lines


def _generic_files():
    for entry in GENERIC:
        path = PACKAGE / entry
        yield from (sorted(path.rglob('*.py')) if path.is_dir() else [path])


def test_generic_modules_name_no_family_loss_or_sample_type():
    """No identifier names a built-in family, and no string in code is a family/loss/sample-type name (docs and
    help texts may mention them). 'rank' is left out: it is also the rank column and the rank-model protocol."""
    from open_clip_rank import registry
    names = {*registry.FAMILIES, *registry.LOSSES, *registry.SAMPLE_TYPES} - {'rank'}
    offences = []
    for path in _generic_files():
        source = path.read_text()
        docstrings = _docstring_lines(ast.parse(source))
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            if token.type == tokenize.NAME and any(f in token.string.lower() for f in registry.FAMILIES):
                offences.append(f"{path.relative_to(PACKAGE)}:{token.start[0]} identifier {token.string}")
            elif token.type == tokenize.STRING and token.start[0] not in docstrings:
                try:
                    value = ast.literal_eval(token.string)
                except ValueError:
                    continue
                if value in names or (isinstance(value, str) and value.startswith('open_clip_rank.models.')):
                    offences.append(f"{path.relative_to(PACKAGE)}:{token.start[0]} string {value!r}")
    assert not offences, offences


def test_data_never_imports_models():
    offences = {str(p.relative_to(PACKAGE)): sorted(m for m in _imports(p) if m.startswith('open_clip_rank.models'))
                for p in (PACKAGE / 'data').rglob('*.py')}
    assert not {k: v for k, v in offences.items() if v}


def test_no_import_cycles():
    graph = {_name(p): {m for m in _imports(p) if m != _name(p)} for p in _modules()}
    # a package's __init__ is imported by its submodules' import machinery, not a design dependency
    graph = {m: {d for d in deps if not m.startswith(d + '.')} for m, deps in graph.items()}
    state, cycles = {}, []

    def visit(module, path):
        state[module] = 'open'
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == 'open':
                cycles.append(path[path.index(dep):] + [dep] if dep in path else [module, dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[module] = 'done'

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles


def test_package_usage_lists_real_commands(capsys):
    from open_clip_rank.__main__ import COMMANDS, main
    assert main([]) == 0
    out = capsys.readouterr().out
    for name, _ in COMMANDS:
        assert f'python -m open_clip_rank.{name}' in out
        assert importlib.util.find_spec(f'open_clip_rank.{name}') is not None, name
    assert main(['nonsense']) == 2
