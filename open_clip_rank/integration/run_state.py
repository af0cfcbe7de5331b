"""The training run in this process: what OpenCLIP's ``main`` does not hand on to the stages that need it.

``main`` parses the args, then calls ``model.lock_image_tower(...)``, ``get_data``, ``torch.save`` and ``pt_load``
with only the arguments OpenCLIP knows. The parse_args wrapper starts the run here, once per process, and those
stages read it instead of module globals of their own: the adapter's tower-lock flags, the checkpoint folder whose
writes are atomic, ``--resume latest``'s fallback, and the model whose locked tower the feature cache stores.
Outside a training run (inference, tests, scripts) there is none: every flag reads as its default.
"""
import weakref
from dataclasses import dataclass
from typing import Any, Optional


@dataclass
class TrainingRun:
    args: Any  # the parsed training args (OpenCLIP's and the plugin's flags)
    _locked_model: Optional[weakref.ref] = None

    def note_locked_model(self, model) -> None:
        """The model whose image tower ``--lock-image`` just locked (built before the data)."""
        self._locked_model = weakref.ref(model)

    def locked_model(self):
        return self._locked_model() if self._locked_model is not None else None


_current: Optional[TrainingRun] = None


def start_run(args) -> TrainingRun:
    global _current
    _current = TrainingRun(args)
    return _current


def end_run() -> None:
    global _current
    _current = None


def current_run() -> Optional[TrainingRun]:
    return _current


def run_flag(name: str, default=False):
    """A flag of the current training run (``default`` outside one)."""
    return getattr(_current.args, name, default) if _current is not None else default
