"""``python -m open_clip_rank.train ARGS`` is ``python -m open_clip_train.main ARGS`` with the plugin applied.

Useful where ``.pth`` files are not processed (some embedded or frozen interpreters) or when
``OPEN_CLIP_RANK_AUTOLOAD=0`` is set: the plugin is registered explicitly, then OpenCLIP's own
training entry point runs unchanged (torchrun works too: ``torchrun -m open_clip_rank.train ...``).
"""
import runpy
import sys


def main(argv=None):
    from .integration.hook import register
    register()
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    runpy.run_module('open_clip_train.main', run_name='__main__', alter_sys=True)


if __name__ == '__main__':
    main()
