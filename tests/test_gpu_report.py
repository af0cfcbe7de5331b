"""scripts/gpu_report.py, the one prepared GPU run: every section names a script of the project and only flags that
script defines (so the run cannot drift from the benchmarks it drives); the shell wrapper hands its flags on."""
import importlib.util
import re
from argparse import Namespace
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

SCRIPTS = Path(__file__).resolve().parent.parent / 'scripts'


def _report():
    spec = importlib.util.spec_from_file_location('gpu_report', SCRIPTS / 'gpu_report.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize('device,quick', [('cuda', False), ('cpu', True)])
def test_every_section_runs_a_project_script_with_its_own_flags(device, quick):
    report = _report()
    sections = report.sections(Namespace(device=device, quick=quick))
    assert {name for name, *_ in sections} == {'pair_head.md', 'adapter_step.md', 'ranking_throughput.md',
                                              'feature_cache.md', 'rankclip_loss.md'}
    for name, title, argv, limit in sections:
        script = Path(argv[1])
        assert script.parent == SCRIPTS and script.is_file(), argv
        source = script.read_text()
        for flag in (a for a in argv[2:] if a.startswith('--')):
            assert re.search(rf"['\"]{re.escape(flag)}['\"]", source), (script.name, flag)
        assert 0 < limit <= 300
    if not quick:  # under 8 minutes on the GPU in all, whatever a section does
        assert sum(limit for *_, limit in sections) <= 8 * 60


def test_shell_wrapper_installs_carried_wheels_then_runs_the_report():
    text = (SCRIPTS / 'gpu_report.sh').read_text()
    assert '--no-index' in text and '--target /tmp/site' in text
    assert 'exec python3 scripts/gpu_report.py --out "$OUT" "$@"' in text
