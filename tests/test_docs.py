"""The documentation stays true: the generated flags page matches the parser, every command the docs name exists,
every relative link (and its #anchor) resolves, every module path the docs name is a file of the repository."""
import importlib.util
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCS = [REPO_ROOT / 'README.md', *sorted((REPO_ROOT / 'docs').glob('*.md'))]

# `python -m open_clip_rank.X`, `torchrun -m open_clip_rank.X`, ... (a trailing sentence full stop is not part of it)
COMMAND = re.compile(r'-m\s+(open_clip_rank(?:\.\w+)*)')
LINK = re.compile(r'(?<!!)\[[^\]]*\]\(([^)\s]+)\)')
HEADING = re.compile(r'^(#{1,6})\s+(.*?)\s*#*\s*$')
FENCE = re.compile(r'^\s*(```|~~~)')
# a file of this repository named in backticks: `models/adapter.py`, `scripts/benchmark.py`, `data/rank.py`
MODULE_PATH = re.compile(r'`((?:[\w.]+/)*\w+\.py)`')
# .py files of the original codebases that the docs name as such (not files of this repository)
OTHER_REPOSITORIES = {'utils/augment_image.py', 'utils/augment_text.py'}


def _load_make_flags_doc():
    path = REPO_ROOT / 'scripts' / 'make_flags_doc.py'
    spec = importlib.util.spec_from_file_location('make_flags_doc', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _prose(text):
    """The text outside fenced code blocks (links and headings live there)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed, spaces to hyphens."""
    text = re.sub(r'\[([^\]]*)\]\([^)]*\)', r'\1', heading)  # a link in a heading keeps its text
    text = text.replace('`', '').strip().lower()
    text = re.sub(r'[^\w\- ]', '', text)
    return text.replace(' ', '-')


def _anchors(path: Path):
    seen, anchors = {}, set()
    for line in _prose(path.read_text(encoding='utf-8')):
        match = HEADING.match(line)
        if not match:
            continue
        slug = _slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f'{slug}-{count}')
    return anchors


def test_flags_page_is_generated_from_the_parser():
    make_flags_doc = _load_make_flags_doc()
    expected = make_flags_doc.flags_markdown()
    current = make_flags_doc.DOC_PATH.read_text(encoding='utf-8')
    assert current == expected, 'docs/training-flags.md is stale: run python scripts/make_flags_doc.py'


def test_flags_page_check_mode_reports_a_stale_page(tmp_path, capsys):
    make_flags_doc = _load_make_flags_doc()
    stale = tmp_path / 'training-flags.md'
    stale.write_text('# old\n', encoding='utf-8')
    assert make_flags_doc.main(['--check', '--output', str(stale)]) == 1
    assert 'stale' in capsys.readouterr().err
    assert make_flags_doc.main(['--output', str(stale)]) == 0
    assert make_flags_doc.main(['--check', '--output', str(stale)]) == 0


def test_every_command_named_in_the_docs_is_a_module():
    named = {}
    for path in DOCS:
        for module in COMMAND.findall(path.read_text(encoding='utf-8')):
            named.setdefault(module, path.relative_to(REPO_ROOT))
    assert 'open_clip_rank.rank' in named and 'open_clip_rank.demo' in named
    missing = {module: str(where) for module, where in named.items() if importlib.util.find_spec(module) is None}
    assert not missing, f'commands naming no module: {missing}'


def test_every_relative_link_resolves():
    broken = []
    for path in DOCS:
        for line in _prose(path.read_text(encoding='utf-8')):
            for target in LINK.findall(line):
                if re.match(r'^[a-z][a-z0-9+.-]*:', target):  # https:, mailto:, ...
                    continue
                file_part, _, anchor = target.partition('#')
                linked = (path.parent / file_part).resolve() if file_part else path
                where = f'{path.relative_to(REPO_ROOT)}: {target}'
                if not linked.exists():
                    broken.append(f'{where} (no such file)')
                elif anchor and linked.suffix == '.md' and anchor not in _anchors(linked):
                    broken.append(f'{where} (no such heading)')
    assert not broken, broken


def test_every_module_path_named_in_the_docs_exists():
    """A path like `files/checkpoints.py` must end some file of the repository (the package, scripts, tests)."""
    files = {str(p.relative_to(REPO_ROOT)) for p in REPO_ROOT.rglob('*.py') if '.git' not in p.parts}
    missing = []
    for path in DOCS:
        for name in set(MODULE_PATH.findall(path.read_text(encoding='utf-8'))) - OTHER_REPOSITORIES:
            if not any(f == name or f.endswith('/' + name) for f in files):
                missing.append(f'{path.relative_to(REPO_ROOT)}: {name}')
    assert not missing, missing
