"""What a training run folder (``logs/<name>``) says about a checkpoint pushed from it: its ``params.txt`` (the
flags the run was trained with: model, overrides, data, base tag, loss) and its ``results.jsonl`` (the validation
metrics of the pushed epoch, from ``epoch_N.pt`` or the ``epoch`` inside the checkpoint)."""
import ast
import json
import re
from pathlib import Path
from typing import Optional

RUN_FILES = ('params.txt', 'results.jsonl')


def run_folder_of(checkpoint) -> Optional[Path]:
    """``logs/<name>`` of a training run's checkpoint ``logs/<name>/checkpoints/<file>`` (None for other files)."""
    path = Path(checkpoint).resolve()
    run = path.parent.parent
    if path.parent.name == 'checkpoints' and any((run / f).is_file() for f in RUN_FILES):
        return run
    return None


def _param_value(text: str):
    if text == 'None':
        return None
    if text in ('True', 'False') or text[:1] in '[(-0123456789':
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
    return text


def read_params(path) -> dict:
    """OpenCLIP's ``params.txt`` (``name: value`` per line, as ``main`` writes its arguments) as a dict; values are
    Python literals where they read as one (None, booleans, numbers, lists), else the text (a tab stays a tab)."""
    params = {}
    for line in Path(path).read_text(encoding='utf-8').split('\n'):
        name, sep, value = line.partition(': ')
        if sep and name.isidentifier():
            params[name] = _param_value(value)
    return params


def checkpoint_epoch(path) -> Optional[int]:
    """The epoch a checkpoint ends (``epoch_N.pt``, else its ``epoch`` entry), or None."""
    match = re.fullmatch(r'epoch_(\d+)\.pt', Path(path).name)
    if match:
        return int(match.group(1))
    try:
        import torch
        data = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except Exception:  # not a zip checkpoint, or not a training checkpoint: no epoch to tell
        return None
    epoch = data.get('epoch') if isinstance(data, dict) else None
    return epoch if isinstance(epoch, int) else None


def read_metrics(path, epoch: Optional[int] = None) -> Optional[dict]:
    """The metrics of ``epoch`` in ``path``: a run's ``results.jsonl`` (one record per validation; the last record of
    ``epoch``, or the last one when the epoch is unknown), a JSON object of metrics, or the rank CLI's output JSON
    (its ``metrics``). None when no record has that epoch."""
    text = Path(path).read_text(encoding='utf-8')
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None
    if isinstance(whole, dict):
        records = [whole['metrics'] if isinstance(whole.get('metrics'), dict) else whole]
    else:
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path} line {number} is not JSON ({err}): give a results.jsonl or a JSON "
                                     f"object of metrics.") from None
        records = [r for r in records if isinstance(r, dict)]
        if not records:
            raise ValueError(f"{path} holds no metrics record.")
    if epoch is not None and any('epoch' in r for r in records):
        records = [r for r in records if r.get('epoch') == epoch]
    return records[-1] if records else None
