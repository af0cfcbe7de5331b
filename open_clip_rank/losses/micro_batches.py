"""Losses of OpenCLIP's ``--accum-freq`` path, one micro-batch at a time.

With ``--accum-freq k`` OpenCLIP hands a loss the outputs of all k micro-batches concatenated (only the
current one carrying gradient) and backpropagates the loss once per micro-batch. A loss whose terms are
statistics of its batch (pairs within a batch, a batch-level KL) keeps each micro-batch's own batch by
returning the mean of the per-micro-batch losses: the accumulated gradient is then that mean's gradient.
"""
from typing import Callable, Dict, Optional

import torch


def mean_over_micro_batches(batch_losses: Callable[..., Dict[str, torch.Tensor]], size: Optional[int],
                            *tensors: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``batch_losses(*rows)`` on consecutive blocks of ``size`` rows of ``tensors`` (None passes through; no
    ``size``: one block), averaged per loss name."""
    rows = len(tensors[0])
    size = size or rows
    parts = [batch_losses(*(None if t is None else t[start:start + size] for t in tensors))
             for start in range(0, rows, size)]
    return {name: sum(part[name] for part in parts) / len(parts) for name in parts[0]}
