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
    _optimizer: Optional[weakref.ref] = None
    _scaler: Any = None

    def note_locked_model(self, model) -> None:
        """The model whose image tower ``--lock-image`` just locked (built before the data)."""
        self._locked_model = weakref.ref(model)

    def locked_model(self):
        return self._locked_model() if self._locked_model is not None else None

    def note_optimizer(self, optimizer) -> None:
        """The optimiser OpenCLIP's ``main`` built (seen by the ``train_one_epoch`` wrapper): its checkpoints store
        it in OpenCLIP's layout (``optimizer.state_dict_in_openclip_layout``)."""
        self._optimizer = weakref.ref(optimizer)

    def optimizer(self):
        return self._optimizer() if self._optimizer is not None else None

    def note_scaler(self, scaler) -> None:
        """AMP's grad scaler (``--precision amp``; None otherwise), kept in the best checkpoint as in OpenCLIP's."""
        self._scaler = scaler

    def scaler(self):
        return self._scaler


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


def write_run_model_config(args):
    """``logs/<name>/config.json``: the model config this run trains (with the ``--force-*`` overrides OpenCLIP
    applies when it builds the model), the file the rank CLI's ``--config-path`` takes: as the original adapter code,
    the run folder alone is enough to rank (``--config-path logs/<name>/config.json --checkpoint-path
    logs/<name>/checkpoints/epoch_N.pt``). Rank-family models only; once per run, by the first process."""
    import json
    import os

    from .. import registry
    from ..files.atomic import atomic_write
    from .compat import config_as_built, read_model_config
    if getattr(args, 'rank', 0) != 0 or not getattr(args, 'logs', None) or not getattr(args, 'name', None):
        return None
    path = os.path.join(args.logs, args.name, 'config.json')
    if os.path.exists(path):  # written at the first epoch (called before every epoch)
        return None
    config = read_model_config(args.model)
    if config is None or registry.family_for_config(config) is None:
        return None
    config = config_as_built(config, vars(args))  # as OpenCLIP built the model (--force-*, --siglip)
    with atomic_write(path, 'w') as f:
        json.dump(config, f, indent=2)
    return path
