"""setuptools needs code for one thing: putting the autoload ``.pth`` file into site-packages.

Everything else is declared in setup.cfg. The ``.pth`` line imports a stdlib-only module that
installs a lazy import hook (see open_clip_rank/integration/_bootstrap.py); it does nothing when
OPEN_CLIP_RANK_AUTOLOAD=0. Both regular and editable (PEP 660) installs get it.
"""
import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_NAME = 'open_clip_rank-autoload.pth'  # sorts after setuptools' __editable__ finders
PTH_LINE = (
    "import os; os.environ.get('OPEN_CLIP_RANK_AUTOLOAD', '1').strip().lower() in ('0', 'false', 'no', 'off') "
    "or __import__('open_clip_rank.integration._bootstrap', fromlist=['autoload']).autoload()\n"
)


class BuildPyWithPth(build_py):
    """Writes the .pth at the root of build_lib, which becomes the root of site-packages."""

    def run(self):
        super().run()
        self._write_pth()

    def _write_pth(self):
        os.makedirs(self.build_lib, exist_ok=True)
        with open(os.path.join(self.build_lib, PTH_NAME), 'w') as f:
            f.write(PTH_LINE)

    def get_outputs(self, include_bytecode=1):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, PTH_NAME)]


cmdclass = {'build_py': BuildPyWithPth}

try:  # PEP 660 editable installs build a wheel of their own; add the .pth to it too.
    from setuptools.command.editable_wheel import editable_wheel

    class EditableWheelWithPth(editable_wheel):
        def _create_wheel_file(self, bdist_wheel):
            wheel_path = super()._create_wheel_file(bdist_wheel)
            from zipfile import ZipFile
            import hashlib, base64, csv, io
            with ZipFile(wheel_path) as zf:
                items = {name: zf.read(name) for name in zf.namelist()}
            record_name = next(n for n in items if n.endswith('.dist-info/RECORD'))
            data = PTH_LINE.encode()
            items[PTH_NAME] = data
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()
            rows = [r for r in csv.reader(io.StringIO(items[record_name].decode())) if r]
            rows.insert(-1, [PTH_NAME, f'sha256={digest}', str(len(data))])
            out = io.StringIO()
            csv.writer(out, lineterminator='\n').writerows(rows)
            items[record_name] = out.getvalue().encode()
            with ZipFile(wheel_path, 'w') as zf:
                for name, content in items.items():
                    zf.writestr(name, content)
            return wheel_path

    cmdclass['editable_wheel'] = EditableWheelWithPth
except ImportError:
    pass

setup(cmdclass=cmdclass)
