"""Every private or structural touch on OpenCLIP (and torch) that the plugin depends on, in one place.

OpenCLIP has no plugin API, so the plugin relies on a handful of *patch points*: module attributes it
replaces, private names it reads, the shape of ``open_clip_train.main``. Each is declared here with a
check. When OpenCLIP moves one (its main branch already routes ``main.py`` through ``create_task``),
the plugin fails as the module is imported, with one line naming the missing point and the supported
OpenCLIP range, instead of silently doing nothing. ``hook.py`` decides what is patched and when; the few
patches that must reach into a private name themselves (``torch.save`` routing, CPU DDP device ids, the
NumPy-2.4-safe zero-shot accuracy, output dicts as pytree nodes) are functions here that ``hook.py`` and the
models call. Nothing else in the package touches OpenCLIP's private names.
"""
import functools
import importlib.util
import json
import logging
import types
from pathlib import Path
from typing import Iterable

_logger = logging.getLogger(__name__)

SUPPORTED_OPENCLIP = '>=3.3,<3.4'
_SUPPORTED_MAJOR_MINOR = (3, 3)

# open_clip.factory: create_model looks these names up in the module at call time, so replacing
# the module attributes changes what it builds and how it loads weights.
FACTORY_NAMES_USED_BY_CREATE_MODEL = ('CLIP', 'CustomTextCLIP', 'load_checkpoint')
# open_clip_train.<module>.<function>: wrapped when the module is first imported.
TRAINING_PATCH_POINTS = {
    'params': 'parse_args',
    'data': 'get_data',
    'train': 'evaluate',
    'distributed': 'init_distributed_device',
    'logger': 'setup_logging',  # then torch's internal loggers back to WARNING
    'file_utils': 'pt_load',  # main's resume load: skip unreadable checkpoints under --resume latest
}
# open_clip_train.train.train_one_epoch (what main calls each epoch): wrapped to tell epoch-aware losses
# (RankCLIP's ramp) the epoch before OpenCLIP's loop runs, without changing the loop.
EPOCH_PATCH_POINT = ('train', 'train_one_epoch')
# What open_clip_train.main must still call for the patches above (and create_loss) to take effect.
NAMES_MAIN_MUST_CALL = ('parse_args', 'get_data', 'create_loss', 'evaluate', 'train_one_epoch',
                        'init_distributed_device', 'DistributedDataParallel',
                        'setup_logging', 'pt_load',
                        'save',  # torch.save of checkpoints (made atomic by the torch.save patch below)
                        'get_latest_checkpoint')  # --resume latest's search (MAIN_PATCH_POINTS)
# open_clip_train.main's own functions, wrapped where main runs (imported, or as __main__ under python -m / runpy):
# --resume latest's search, which would take the best checkpoint (epoch_best.pt) for the newest.
MAIN_PATCH_POINTS = ('get_latest_checkpoint',)


# open_clip_train.data building blocks the plugin's data paths reuse (the sample types' loaders, shard streaming).
OPENCLIP_DATA_NAMES = ('DataInfo', 'SharedEpoch', 'expand_urls', 'get_dataset_size', 'ResampledShards2',
                       'detshuffle2', 'tarfile_to_samples_nothrow')


class PatchPointMissing(ImportError):
    """OpenCLIP no longer has something the plugin patches: this OpenCLIP version is unsupported."""


def patch_point_missing(point: str, version: str) -> PatchPointMissing:
    """The error (raised by the caller) for a patch point this OpenCLIP version lacks."""
    return PatchPointMissing(
        f"open_clip_rank: OpenCLIP {version} has no patch point {point}; open_clip_rank supports "
        f"open_clip_torch{SUPPORTED_OPENCLIP}: install a supported version (pip install 'open_clip_torch{SUPPORTED_OPENCLIP}').")


# torch's private names the adapter relies on: the post-fusion layer (a TransformerEncoderLayer with the
# official parameter names) overrides ``_sa_block`` and calls ``_ff_block``; the frozen-text memo reads
# ``Tensor._version`` (bumped by every in-place write) to notice changed weights.
TORCH_ENCODER_LAYER_METHODS = {'_sa_block': ('x', 'attn_mask', 'key_padding_mask'), '_ff_block': ('x',)}


def check_torch_private_names() -> None:
    """Fail loudly, naming it, when torch has moved one of the private names above."""
    import inspect
    import torch
    from torch import nn
    for name, leading in TORCH_ENCODER_LAYER_METHODS.items():
        method = getattr(nn.TransformerEncoderLayer, name, None)
        params = tuple(inspect.signature(method).parameters)[1:1 + len(leading)] if callable(method) else ()
        if params != leading:
            raise PatchPointMissing(
                f"open_clip_rank: torch {torch.__version__} has no torch.nn.TransformerEncoderLayer.{name}{leading}, "
                f"which the adapter's post-fusion layer overrides; use a torch release that open_clip_torch"
                f"{SUPPORTED_OPENCLIP} supports (tested: 2.14).")
    if not isinstance(getattr(torch.zeros(()), '_version', None), int):
        raise PatchPointMissing(f"open_clip_rank: torch {torch.__version__} tensors have no _version counter, which "
                                f"the frozen text tower's memo reads; use a torch release that open_clip_torch"
                                f"{SUPPORTED_OPENCLIP} supports (tested: 2.14).")


def tensor_version(tensor) -> int:
    """How many in-place writes ``tensor`` has seen (torch's private counter; checked above)."""
    return tensor._version


def openclip_data(*names):
    """``open_clip_train.data``'s ``names`` (all of ``OPENCLIP_DATA_NAMES`` are checked once: one line naming
    a missing one and the supported range, instead of an AttributeError mid-run)."""
    import open_clip
    from open_clip_train import data
    for name in OPENCLIP_DATA_NAMES:
        if not hasattr(data, name):
            raise patch_point_missing(f'open_clip_train.data.{name}', open_clip.__version__)
    unknown = [n for n in names if n not in OPENCLIP_DATA_NAMES]
    if unknown:
        raise ValueError(f"{unknown} are not declared in compat.OPENCLIP_DATA_NAMES.")
    values = tuple(getattr(data, n) for n in names)
    return values[0] if len(values) == 1 else values


def _version_tuple(version: str):
    parts = []
    for piece in version.split('.')[:2]:
        digits = ''.join(c for c in piece if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def check_version(open_clip) -> None:
    """A version outside the tested range only warns: the patch-point checks decide whether it works."""
    version = getattr(open_clip, '__version__', '?')
    if _version_tuple(version) != _SUPPORTED_MAJOR_MINOR:
        _logger.warning(f"open_clip_rank is tested with open_clip_torch{SUPPORTED_OPENCLIP}, found {version}; "
                        f"every patch point is present, continuing.")


def _names_referenced(code: types.CodeType) -> set:
    """Global and attribute names a code object (and every function nested in it) refers to."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names_referenced(const)
    return names


def check_factory(open_clip) -> None:
    from open_clip import factory, pretrained
    version = open_clip.__version__
    for name in (*FACTORY_NAMES_USED_BY_CREATE_MODEL, 'create_loss', 'create_model', 'parse_model_name',
                 '_get_hf_config'):
        if not hasattr(factory, name):
            raise patch_point_missing(f"open_clip.factory.{name}", version)
    used = _names_referenced(factory.create_model.__code__)
    for name in FACTORY_NAMES_USED_BY_CREATE_MODEL:
        if name not in used:
            raise patch_point_missing(f"open_clip.factory.create_model -> {name} (create_model no longer uses it)", version)
    if not isinstance(getattr(pretrained, '_PRETRAINED', None), dict):
        raise patch_point_missing("open_clip.pretrained._PRETRAINED", version)


@functools.lru_cache(maxsize=None)
def check_training_package(package: str, version: str) -> None:
    """``open_clip_train.main`` must still call what the plugin patches (read from its code, not run)."""
    spec = importlib.util.find_spec(f'{package}.main')
    code = spec.loader.get_code(spec.name) if spec is not None and spec.loader is not None else None
    if code is None:
        raise patch_point_missing(f"{package}.main", version)
    used = _names_referenced(code)
    for name in NAMES_MAIN_MUST_CALL:
        if name not in used:
            raise patch_point_missing(f"{package}.main -> {name} (main no longer calls it)", version)


def training_patch_point(module, version: str):
    """(name, function) of the training module's patch point, or PatchPointMissing."""
    short = module.__name__.rsplit('.', 1)[-1]
    name = TRAINING_PATCH_POINTS[short]
    if not callable(getattr(module, name, None)):
        raise patch_point_missing(f"{module.__name__}.{name}", version)
    return name


def training_main_modules(packages) -> list:
    """The loaded ``<package>.main`` module objects of the training ``packages``: imported, or running as
    ``__main__`` (``python -m open_clip_train.main``, ``runpy``), told apart by their ``__spec__``."""
    import sys
    names = {f'{package}.main' for package in packages}
    found = []
    for key in ('__main__', *sorted(names)):
        module = sys.modules.get(key)
        if getattr(getattr(module, '__spec__', None), 'name', None) in names and all(m is not module for m in found):
            found.append(module)
    return found


def patch_training_main(packages, name: str, make_wrapper) -> None:
    """Wrap ``name`` (one of ``MAIN_PATCH_POINTS``) of every loaded training ``main`` module, once:
    ``make_wrapper(original, module)``. Main calls it as a module global, so the wrapper takes effect at its next
    call; a main module without it is an unsupported OpenCLIP (PatchPointMissing)."""
    import open_clip
    if name not in MAIN_PATCH_POINTS:
        raise ValueError(f"{name} is not declared in compat.MAIN_PATCH_POINTS.")
    for module in training_main_modules(packages):
        original = getattr(module, name, None)
        if not callable(original):
            raise patch_point_missing(f"{module.__spec__.name}.{name}", open_clip.__version__)
        if not is_patched(original):
            setattr(module, name, wraps_once(original)(make_wrapper(original, module)))


def uncompiled(model):
    """The module ``torch.compile`` wrapped (its private ``_orig_mod``), else ``model``: what OpenCLIP's ``main``
    saves the state dict of (its ``original_model``)."""
    return getattr(model, '_orig_mod', model)


def epoch_patch_point(module, version: str) -> str:
    """The name of the training loop function in ``<package>.train``, or PatchPointMissing."""
    name = EPOCH_PATCH_POINT[1]
    if not callable(getattr(module, name, None)):
        raise patch_point_missing(f"{module.__name__}.{name}", version)
    return name


# --- private names, read or extended ------------------------------------------------------------

def pretrained_registry() -> dict:
    """OpenCLIP's table of pretrained tags, {model name: {tag: cfg}} (private, no public way to add)."""
    from open_clip import pretrained
    return pretrained._PRETRAINED


def read_model_config(model_name: str):
    """The model config a name resolves to (built-in, ``local-dir:``, ``hf-hub:``), without building it.

    Returns None when it cannot be read here; OpenCLIP then reports the problem when it builds the model.
    """
    import open_clip
    from open_clip import factory
    schema, identifier = factory.parse_model_name(model_name)
    try:
        if schema is None:
            return open_clip.get_model_config(identifier.replace('/', '-'))
        if schema == 'local-dir':
            return json.loads((Path(identifier) / 'open_clip_config.json').read_text()).get('model_cfg')
        return factory._get_hf_config(identifier).get('model_cfg')
    except Exception:  # missing file, no network: not ours to report
        return None


def read_model_config_file(path) -> dict:
    """A model config file as OpenCLIP's ``model_cfg``: a config JSON, an ``open_clip_config.json`` (which wraps it
    under ``model_cfg``) or the official adapter ``model-config.json`` (its ``model_version`` dropped: the official
    inference script passes it beside the config). A missing file or bad JSON is one line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model config {path} does not exist.")
    try:
        config = json.loads(path.read_text(encoding='utf-8'))
    except json.JSONDecodeError as err:
        raise ValueError(f"model config {path} is not valid JSON ({err}).") from None
    config = config.get('model_cfg', config)
    config.pop('model_version', None)
    return config


def config_as_built(config: dict, flags: dict) -> dict:
    """``config`` as ``open_clip_train.main`` builds it with these training flags (a namespace's ``vars`` or a
    run's ``params.txt``): ``create_model`` applies ``--force-quick-gelu``, ``--force-custom-text``,
    ``--force-image-size``, ``--force-context-length`` and ``--siglip``'s model kwargs at build time, so the named
    config alone does not say them."""
    import copy
    import math
    config = copy.deepcopy(config)
    if flags.get('force_quick_gelu'):
        config['quick_gelu'] = True
    if flags.get('force_custom_text'):
        config['custom_text'] = True
    size = flags.get('force_image_size')
    if size:
        config.setdefault('vision_cfg', {})['image_size'] = size[0] if isinstance(size, (list, tuple)) \
            and len(size) == 1 else size
    if flags.get('force_context_length'):
        config.setdefault('text_cfg', {})['context_length'] = flags['force_context_length']
    if flags.get('siglip'):  # main's model_kwargs for --siglip
        config['init_logit_scale'] = math.log(10)
        config['init_logit_bias'] = -10
    return config


def split_model_name(model_name: str):
    """(schema, identifier): schema is 'hf-hub', 'local-dir' or None (a built-in or registered name)."""
    from open_clip import factory
    return factory.parse_model_name(model_name)


def openclip_evaluates_val(args, epoch: int) -> bool:
    """When ``open_clip_train.train.evaluate`` runs its validation pass (3.3's schedule, kept identical)."""
    return bool(args.val_frequency) and (epoch % args.val_frequency == 0 or epoch == args.epochs)


# open_clip.push_to_hf_hub: the writers the plugin's push command reuses (open_clip_rank/hub/folder.py and
# hub/card.py), with the parameters it passes. OpenCLIP's own push cannot run with huggingface_hub 2.x (it
# imports a name 2.x removed, and fetches an HF copy of the CLIP tokenizer): the plugin pushes with
# huggingface_hub's current API instead.
OPENCLIP_HUB_WRITERS = {'save_for_hf': ('model', 'tokenizer', 'model_config', 'save_directory', 'safe_serialization'),
                        'generate_readme': ('model_card', 'model_name')}


def openclip_hub_writers():
    """(``save_for_hf``, ``generate_readme``) of ``open_clip.push_to_hf_hub``, checked: one line naming what moved."""
    import inspect

    import open_clip
    try:  # the module (open_clip's __init__ binds the name open_clip.push_to_hf_hub to its function)
        module = importlib.import_module('open_clip.push_to_hf_hub')
    except ImportError:
        raise patch_point_missing('open_clip.push_to_hf_hub', open_clip.__version__) from None
    found = []
    for name, params in OPENCLIP_HUB_WRITERS.items():
        function = getattr(module, name, None)
        if not callable(function) or tuple(inspect.signature(function).parameters)[:len(params)] != params:
            raise patch_point_missing(f"open_clip.push_to_hf_hub.{name}{params}", open_clip.__version__)
        found.append(function)
    return tuple(found)


# --- upstream bugs the plugin works around -------------------------------------------------------

def numpy_rejects_size_one_arrays() -> bool:
    """NumPy >= 2.4 no longer converts a 1-element 1-d array to a Python float."""
    import numpy as np
    try:
        float(np.ones(1))
    except TypeError:
        return True
    return False


def topk_correct(output, target, topk=(1,)):
    """Same result as ``open_clip_train.zero_shot.accuracy`` of 3.3 (counts of correct top-k predictions),
    which calls ``float()`` on a 1-element array and so fails under NumPy >= 2.4 for every model."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() for k in topk]


def fix_zero_shot_accuracy(module) -> bool:
    """Give ``<training package>.zero_shot`` a NumPy-2.4-safe ``accuracy`` where it needs one."""
    if not numpy_rejects_size_one_arrays() or not callable(getattr(module, 'accuracy', None)):
        return False
    if not is_patched(module.accuracy):
        module.accuracy = wraps_once(module.accuracy)(topk_correct)
    return True


# CLIP_benchmark (``clip_benchmark eval``) has the same float() of a 1-element array in its accuracy, which its
# linear-probe module imports by name: both modules get the fix, in whichever order they are imported.
CLIP_BENCHMARK_ACCURACY_MODULES = ('clip_benchmark.metrics.zeroshot_classification',
                                   'clip_benchmark.metrics.linear_probe')


def topk_accuracy(output, target, topk=(1,)):
    """Same result as CLIP_benchmark 1.6's ``accuracy`` (top-k accuracies as fractions of ``len(target)``),
    which fails under NumPy >= 2.4 for every model."""
    return [correct / len(target) for correct in topk_correct(output, target, topk)]


def fix_clip_benchmark_accuracy(module) -> bool:
    """Give a CLIP_benchmark metrics module a NumPy-2.4-safe ``accuracy`` where it needs one."""
    if not numpy_rejects_size_one_arrays() or not callable(getattr(module, 'accuracy', None)):
        return False
    if not is_patched(module.accuracy):
        module.accuracy = wraps_once(module.accuracy)(topk_accuracy)
    return True


# --- torch ---------------------------------------------------------------------------------------

# OpenCLIP's ``open_clip_train.distributed.world_info_from_env``: the first variable set wins, in this order.
LAUNCH_VARIABLES = (('LOCAL_RANK', 'MPI_LOCALRANKID', 'SLURM_LOCALID', 'OMPI_COMM_WORLD_LOCAL_RANK'),
                    ('RANK', 'PMI_RANK', 'SLURM_PROCID', 'OMPI_COMM_WORLD_RANK'),
                    ('WORLD_SIZE', 'PMI_SIZE', 'SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE'))


def launch_ranks():
    """(local rank, global rank, world size) of this process as the launcher (torchrun, SLURM, MPI) set them in the
    environment, by OpenCLIP's rule (``world_info_from_env``; restated so the rank CLI imports no training module,
    and checked against it in tests/test_compat.py)."""
    import os
    found = []
    for names, default in zip(LAUNCH_VARIABLES, (0, 0, 1)):
        found.append(next((int(os.environ[n]) for n in names if n in os.environ), default))
    return tuple(found)


def launch_world_size() -> int:
    """The number of processes the launcher started, before ``init_distributed_device`` has run."""
    return launch_ranks()[2]


def allow_cpu_ddp_device_ids() -> None:
    """OpenCLIP 3.3's main wraps the model as ``DistributedDataParallel(model, device_ids=[device])``,
    which torch rejects for CPU modules. For CPU (gloo) runs DDP is given a subclass that drops
    ``device_ids`` for CPU modules, the one case that would raise; everything else is unchanged."""
    import torch
    ddp = torch.nn.parallel.DistributedDataParallel
    if getattr(ddp, '_open_clip_rank', False):
        return

    class DistributedDataParallel(ddp):
        _open_clip_rank = True

        def __init__(self, module, device_ids=None, *args, **kwargs):
            if device_ids and all(torch.device(d).type == 'cpu' for d in device_ids):
                device_ids = None
            super().__init__(module, device_ids, *args, **kwargs)

    torch.nn.parallel.DistributedDataParallel = DistributedDataParallel


def patch_torch_save(route) -> None:
    """Replace ``torch.save`` by ``route(original_save, obj, f, *args, **kwargs)`` (once).

    OpenCLIP 3.3's main writes checkpoints in place with ``torch.save(checkpoint_dict, path)`` from inside
    ``main`` (no function of its own to wrap); ``route`` decides which writes it makes atomic and hands every
    other call to the original unchanged.
    """
    import torch
    if is_patched(torch.save):
        return
    original = torch.save

    @wraps_once(original)
    def save(obj, f, *args, **kwargs):
        return route(original, obj, f, *args, **kwargs)

    torch.save = save


def quiet_torch_loggers(level=logging.WARNING) -> None:
    """Set ``torch`` and every ``torch.*`` logger to ``level``.

    OpenCLIP's ``setup_logging`` sets every logger that exists at that moment to INFO, torch's internal
    ones included, so torch's exit-time reports (TorchDynamo compilation metrics, FakeTensor cache stats)
    would end every run. ``TORCH_LOGS`` (torch's own switch) is respected: when set, nothing changes.
    """
    import os
    if os.environ.get('TORCH_LOGS'):
        return
    for name in list(logging.root.manager.loggerDict):
        if name == 'torch' or name.startswith('torch.'):
            logging.getLogger(name).setLevel(level)
    logging.getLogger('torch').setLevel(level)


def register_output_type(cls) -> None:
    """Make a dict subclass of model outputs a pytree node like ``dict``.

    DDP flattens a module's outputs with ``torch.utils._pytree`` to route their gradients through its
    reducer; an unregistered dict subclass would be one opaque leaf and its tensors would be missed.
    """
    from torch.utils import _pytree
    if not hasattr(_pytree, 'register_pytree_node'):
        raise patch_point_missing('torch.utils._pytree.register_pytree_node', 'with this torch')

    def flatten(out):
        return list(out.values()), list(out.keys())

    def unflatten(values: Iterable, keys):
        return cls(zip(keys, values))

    _pytree.register_pytree_node(cls, flatten, unflatten,
                                 serialized_type_name=f'{cls.__module__}.{cls.__qualname__}')


def wraps_once(original):
    """functools.wraps that marks the wrapper as the plugin's, so patching twice is a no-op."""
    def decorate(wrapper):
        wrapper = functools.wraps(original)(wrapper)
        wrapper._open_clip_rank = True
        return wrapper
    return decorate


def is_patched(fn) -> bool:
    return getattr(fn, '_open_clip_rank', False)
