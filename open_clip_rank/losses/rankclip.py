"""RankCLIP (``--loss-opt rankclip``): CLIP's contrastive loss plus listwise ranking consistency.

The released ``get_loss`` of ``Jam1ezhang/RankCLIP``, for any plain OpenCLIP model (``image_features``,
``text_features``, ``logit_scale`` outputs), distributed like OpenCLIP's ``ClipLoss``:

    loss = contrastive + w(epoch) * (λ_cross * cross + λ_in * in) / B
    cross = (ListMLE(I2T rows by T2I rows) + ListMLE(T2I rows by I2T rows)) / 32
    in    = (ListMLE(I·Iᵀ rows by T·Tᵀ rows) + ListMLE(T·Tᵀ rows by I·Iᵀ rows)) / 32

with all similarities scaled by the logit scale, B the (global) batch size, row i of one modality's
similarities ranked by row i of the other's (the target order carries no gradient), and the ramp
w = peak · clamp((e − 1) / R, 0, 1) over 1-based epochs e; the defaults (peak 2, R = 2(E − 1)/3) are the
original's clamp(3(e − 1)/(E − 1), 0, 2). The original's ``lambda1`` (in-modal) and ``lambda2``
(cross-modal) are on/off gates there; here they are weights (``--rankclip-inmodal-weight``,
``--rankclip-crossmodal-weight``), and 0 leaves a term out.

OpenCLIP sums every entry of the loss dict into the total, so the entries are the three summands:
``contrastive_loss``, ``crossmodal_rank_loss`` and ``inmodal_rank_loss`` (each already weighted, ramp
included). The ramp weight itself is logged once per epoch (log line and tensorboard scalar
``train/rankclip_rank_weight``) by ``start_epoch``, which the plugin calls from OpenCLIP's
``train_one_epoch`` (see ``hook.py``).
"""
import logging
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .listmle import DEFAULT_EPS, list_mle, tie_permutation

_logger = logging.getLogger(__name__)

LISTMLE_DIVISOR = 32.0  # the released get_loss divides each direction-summed ListMLE term by 32
DEFAULT_RAMP_PEAK = 2.0


def ramp_weight(epoch: int, epochs: int, peak: float = DEFAULT_RAMP_PEAK, ramp_epochs: Optional[float] = None
                ) -> float:
    """Rank-loss weight at 1-based ``epoch`` of ``epochs``: rises linearly from 0 at epoch 1 to ``peak``
    after ``ramp_epochs`` more epochs (default two thirds of ``epochs - 1``, the original's
    clamp(3(e - 1)/(E - 1), 0, 2) for peak 2), then stays there. ``ramp_epochs`` 0 (and a one-epoch run,
    which leaves no room for a ramp) gives ``peak`` from the first epoch."""
    if ramp_epochs is None:
        ramp_epochs = 2.0 * (epochs - 1) / 3.0
    if ramp_epochs <= 0:
        return float(peak)
    progress = (min(epoch, epochs) - 1) / ramp_epochs
    return float(peak) * min(1.0, max(0.0, progress))


class _Gram(torch.autograd.Function):
    """``x @ x.T``: its gradient ``(G + G.T) @ x`` is one matrix product where autograd's is two (one per use of
    ``x``). Under autocast, computed in the autocast dtype as the matrix product would be."""

    @staticmethod
    def forward(ctx, x):
        device = x.device.type
        if torch.is_autocast_enabled(device):
            x = x.to(torch.get_autocast_dtype(device))
        with torch.autocast(device_type=device, enabled=False):
            ctx.save_for_backward(x)
            return x @ x.T

    @staticmethod
    def backward(ctx, grad):
        x, = ctx.saved_tensors
        with torch.autocast(device_type=x.device.type, enabled=False):
            symmetric = grad.T.clone(memory_format=torch.contiguous_format).to(x.dtype)  # a blocked transposing copy ...
            symmetric += grad  # ... then a plain add: several times faster than grad + grad.T on large matrices
            return symmetric @ x


def similarities(rows: torch.Tensor, columns: torch.Tensor, logit_scale) -> torch.Tensor:
    """``logit_scale * rows @ columns.T``. The symmetric in-modal case (the same tensor: global lists) is the Gram
    matrix of ``sqrt(logit_scale) * rows`` through ``_Gram``: the scale is applied to the [B, D] features, not to the
    [B, B] product, and the backward is one matrix product."""
    if rows is columns:
        return _Gram.apply(rows * logit_scale.sqrt() if torch.is_tensor(logit_scale) else rows * logit_scale ** 0.5)
    return logit_scale * rows @ columns.T


class RankCLIPLoss(nn.Module):
    """RankCLIP's loss on OpenCLIP model outputs, called as ``loss(**model_out, output_dict=True)``.

    Distributed as ``open_clip.loss.ClipLoss``: by default every rank builds the global similarity lists
    from features gathered without gradient (its own rows keep theirs); ``local_loss`` keeps only the local
    rows against all columns; ``gather_with_grad`` gathers with gradient. Under ``--accum-freq`` OpenCLIP
    calls the loss ``accum_freq`` times per optimiser step on the accumulated features; all those calls
    use the same tie-break permutations, drawn from (seed, epoch, step), so every DDP rank uses the same.
    """

    def __init__(self, inmodal_weight: float = 1.0, crossmodal_weight: float = 1.0,
                 ramp_peak: float = DEFAULT_RAMP_PEAK, ramp_epochs: Optional[float] = None,
                 local_loss: bool = False, gather_with_grad: bool = False, rank: int = 0, world_size: int = 1,
                 use_horovod: bool = False, seed: int = 0, accum_freq: int = 1, eps: float = DEFAULT_EPS,
                 inmodal_views: bool = False):
        super().__init__()
        for name, value in (('inmodal_weight', inmodal_weight), ('crossmodal_weight', crossmodal_weight),
                            ('ramp_peak', ramp_peak), ('ramp_epochs', ramp_epochs or 0.0)):
            if value < 0:
                raise ValueError(f"RankCLIP {name} must be >= 0, got {value}.")
        self.inmodal_weight = float(inmodal_weight)
        self.crossmodal_weight = float(crossmodal_weight)
        self.ramp_peak = float(ramp_peak)
        self.ramp_epochs = ramp_epochs
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = use_horovod
        self.seed = int(seed)
        self.accum_freq = max(1, int(accum_freq))
        self.eps = eps
        self.inmodal_views = bool(inmodal_views)  # --rankclip-inmodal: each batch holds the originals, then views
        # Before any epoch is set (the loss used outside OpenCLIP's loop), the ramp sits at its peak.
        self.epoch = None
        self.rank_weight = self.ramp_peak
        self._calls = 0

    # --- the epoch, from OpenCLIP's loop --------------------------------------------------------------

    def set_epoch(self, epoch: int, epochs: int) -> float:
        """Set the 1-based ``epoch`` of ``epochs``; returns the ramp weight it gives."""
        self.epoch = int(epoch)
        self.rank_weight = ramp_weight(self.epoch, int(epochs), self.ramp_peak, self.ramp_epochs)
        self._calls = 0
        return self.rank_weight

    def start_epoch(self, epoch: int, args, tb_writer=None, step: int = 0) -> None:
        """Called by the plugin before OpenCLIP's ``train_one_epoch`` with its 0-based ``epoch``."""
        weight = self.set_epoch(epoch + 1, args.epochs)
        if getattr(args, 'rank', 0) == 0:
            _logger.info(f"RankCLIP rank-loss weight {weight:.4g} in epoch {epoch} (epoch {epoch + 1} of "
                         f"{args.epochs}, ramp peak {self.ramp_peak:g})")
            if tb_writer is not None:
                tb_writer.add_scalar('train/rankclip_rank_weight', weight, step)

    # --- the loss ------------------------------------------------------------------------------------

    def _permutation(self, size: int, term: int, device) -> torch.Tensor:
        step = self._calls // self.accum_freq
        return tie_permutation(size, (self.seed, -1 if self.epoch is None else self.epoch, step, term), device)

    def _features(self, image_features, text_features):
        """(row image, row text, column image, column text features, label offset of the rows)."""
        if self.world_size <= 1:
            return image_features, text_features, image_features, text_features, 0
        from open_clip.loss import gather_features
        all_image, all_text = gather_features(
            image_features, text_features, local_loss=self.local_loss, gather_with_grad=self.gather_with_grad,
            rank=self.rank, world_size=self.world_size, use_horovod=self.use_horovod)
        if self.local_loss:
            return image_features, text_features, all_image, all_text, self.rank * len(image_features)
        return all_image, all_text, all_image, all_text, 0

    def _split_views(self, features):
        """(originals, augmented views) of ``--rankclip-inmodal`` features: each micro-batch is its b originals then
        its b views (``data/two_views.py``), and under ``--accum-freq`` OpenCLIP concatenates the micro-batches."""
        grouped = features.reshape(self.accum_freq, 2, -1, features.shape[-1])
        return grouped[:, 0].reshape(-1, features.shape[-1]), grouped[:, 1].reshape(-1, features.shape[-1])

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict: bool = False,
                **_model_outputs):
        views = None
        if self.inmodal_views:  # the original's inmodal mode: contrastive = (cross-modal + in-modal) / 2
            image_features, image_views = self._split_views(image_features)
            text_features, text_views = self._split_views(text_features)
            views = self._features(image_views, text_views)
        rows_image, rows_text, cols_image, cols_text, offset = self._features(image_features, text_features)
        batch_size = len(cols_image)  # the (global) batch: the length of every similarity list
        logits_per_image = logit_scale * rows_image @ cols_text.T
        if rows_image is cols_image:  # global (or single-process) lists: the square matrix and its transpose
            logits_per_text = logits_per_image.T
        else:
            logits_per_text = logit_scale * rows_text @ cols_image.T
        labels = torch.arange(len(rows_image), device=logits_per_image.device) + offset
        biased = (0 if logit_bias is None else logit_bias)
        per_image = F.cross_entropy(logits_per_image + biased, labels)
        if rows_image is cols_image:  # the text rows are the columns: their softmax runs down the columns, so no
            # [B, B] transposed copy is made and every gradient reaching the logits has their layout (fast adds)
            per_text = -torch.log_softmax((logits_per_image + biased).float(), dim=0).diagonal().mean()
        else:
            per_text = F.cross_entropy(logits_per_text + biased, labels)
        contrastive = (per_image + per_text) / 2
        losses: Dict[str, torch.Tensor] = {'contrastive_loss': contrastive}
        if views is not None:  # each image against every augmented image, each caption against every augmented
            _, _, cols_image_views, cols_text_views, _ = views  # caption (the gathered views are the columns)
            inmodal = (F.cross_entropy(logit_scale * rows_image @ cols_image_views.T, labels)
                       + F.cross_entropy(logit_scale * rows_text @ cols_text_views.T, labels)) / 2
            losses = {'contrastive_loss': contrastive / 2, 'inmodal_contrastive_loss': inmodal / 2}

        weight = self.rank_weight / (LISTMLE_DIVISOR * batch_size)
        if self.crossmodal_weight > 0:
            losses['crossmodal_rank_loss'] = self._term(
                logits_per_image, logits_per_text, weight * self.crossmodal_weight, term=0,
                device=contrastive.device)
        if self.inmodal_weight > 0:
            if weight > 0:
                image_similarity = similarities(rows_image, cols_image, logit_scale)
                text_similarity = similarities(rows_text, cols_text, logit_scale)
            else:
                image_similarity = text_similarity = None
            losses['inmodal_rank_loss'] = self._term(
                image_similarity, text_similarity, weight * self.inmodal_weight, term=2,
                device=contrastive.device)
        self._calls += 1
        return losses if output_dict else sum(losses.values())

    def _term(self, first, second, weight: float, term: int, device) -> torch.Tensor:
        """weight * (ListMLE(first by second) + ListMLE(second by first)); a zero (ramp at 0) skips the work."""
        if weight == 0:
            return torch.zeros((), device=device)
        size = first.shape[1]
        forward = list_mle(first, second, self._permutation(size, term, first.device), self.eps)
        backward = list_mle(second, first, self._permutation(size, term + 1, first.device), self.eps)
        return weight * (forward + backward)


def build_rankclip_loss(args) -> RankCLIPLoss:
    """``--loss-opt rankclip`` from OpenCLIP's training args and the plugin's ``--rankclip-*`` flags."""
    return RankCLIPLoss(
        inmodal_weight=args.rankclip_inmodal_weight,
        crossmodal_weight=args.rankclip_crossmodal_weight,
        ramp_peak=args.rankclip_ramp_peak,
        ramp_epochs=args.rankclip_ramp_epochs,
        local_loss=args.local_loss,
        gather_with_grad=args.gather_with_grad,
        rank=args.rank,
        world_size=args.world_size,
        use_horovod=args.horovod,
        seed=args.seed,
        accum_freq=args.accum_freq,
        inmodal_views=getattr(args, 'rankclip_inmodal', False),
    )


def rankclip_default_data(args, get_data, preprocess_fns, epoch=0, tokenizer=None):
    """OpenCLIP's image-caption data; with ``--rankclip-inmodal`` its training batches carry a second view of every
    sample (``data/two_views.py``: AutoAugment image, EDA caption), validation and zero-shot data as OpenCLIP's."""
    data = get_data(args, preprocess_fns, epoch=epoch, tokenizer=tokenizer)
    if not getattr(args, 'rankclip_inmodal', False) or 'train' not in data:
        return data
    import copy

    from ..data.two_views import EDA, TwoCaptionTokenizer, TwoViewTransform, ViewsLoader, synonym_source
    train_only = copy.copy(args)
    train_only.val_data = train_only.imagenet_val = train_only.imagenet_v2 = None
    preprocess_train, preprocess_val = preprocess_fns
    text_augment = EDA(synonym_source(args.rankclip_synonyms), alpha=args.rankclip_eda_alpha)
    views = get_data(train_only, (TwoViewTransform(preprocess_train), preprocess_val), epoch=epoch,
                     tokenizer=TwoCaptionTokenizer(tokenizer, text_augment))['train']
    views.dataloader = ViewsLoader(views.dataloader)
    data['train'] = views
    if getattr(args, 'rank', 0) == 0:
        _logger.info(f"--rankclip-inmodal: every training sample also as an AutoAugment image and an EDA caption "
                     f"({', '.join(text_augment.operations())}); each batch is 2 x {args.batch_size}.")
    return data


# --- --loss-opt rankclip: flags and their checks (registered in builtin.py) ----------------------------

def add_rankclip_args(parser):
    """Flags of ``--loss-opt rankclip`` (RankCLIP pretraining of plain CLIP models)."""
    group = parser.add_argument_group(
        'open_clip_rank: RankCLIP', '--loss-opt rankclip: contrastive loss + w(epoch) * (cross-modal + in-modal '
        'ListMLE ranking consistency), on any plain CLIP model and ordinary image-caption data.')
    group.add_argument('--rankclip-crossmodal-weight', type=float, default=1.0,
                       help='Weight of the cross-modal ListMLE term (the original lambda2); 0 leaves it out.')
    group.add_argument('--rankclip-inmodal-weight', type=float, default=1.0,
                       help='Weight of the in-modal ListMLE term (the original lambda1); 0 leaves it out.')
    group.add_argument('--rankclip-ramp-peak', type=float, default=2.0,
                       help='Largest rank-loss weight w (reached at the end of the ramp). Default 2, as the original.')
    group.add_argument('--rankclip-ramp-epochs', type=float, default=None,
                       help='Epochs over which w rises linearly from 0 (epoch 1) to the peak. Default: two thirds '
                            'of (epochs - 1), the original clamp(3(e-1)/(E-1), 0, 2). 0: no ramp (the peak from '
                            'the first epoch; also what a one-epoch run gets).')
    group.add_argument('--rankclip-inmodal', action='store_true',
                       help='The original\'s --inmodal mode: every training sample also as an augmented view '
                            '(AutoAugment image, EDA caption); contrastive = (cross-modal + in-modal image-to-view and '
                            'caption-to-view) / 2, the ranking lists over the originals. On OpenCLIP\'s CSV, '
                            'webdataset and synthetic data; each step encodes 2 x --batch-size pairs.')
    group.add_argument('--rankclip-synonyms', type=str, default='wordnet',
                       help='Synonyms for the captions\' EDA: wordnet (NLTK\'s, when its corpus is installed), none '
                            '(random swap and deletion only), or a file of word<TAB>synonym,synonym lines.')
    group.add_argument('--rankclip-eda-alpha', type=float, default=0.1,
                       help='Fraction of a caption\'s words an EDA operation touches (EDA\'s and CyCLIP\'s 0.1).')
    return parser


def check_rankclip_args(args):
    if getattr(args, 'loss_opt', None) != 'rankclip':
        return
    for flag in ('rankclip_crossmodal_weight', 'rankclip_inmodal_weight', 'rankclip_ramp_peak'):
        if getattr(args, flag) < 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}.")
    if args.rankclip_inmodal and not 0 < args.rankclip_eda_alpha <= 1:
        raise ValueError(f"--rankclip-eda-alpha must be in (0, 1], got {args.rankclip_eda_alpha}.")
    if args.rankclip_inmodal and args.rankclip_synonyms not in ('wordnet', 'none'):
        import os
        if not os.path.isfile(args.rankclip_synonyms):
            raise ValueError(f"--rankclip-synonyms {args.rankclip_synonyms}: not a file; give wordnet, none or a file "
                             f"of word<TAB>synonym,synonym lines.")
    if args.rankclip_ramp_epochs is not None and args.rankclip_ramp_epochs < 0:
        raise ValueError(f"--rankclip-ramp-epochs must be >= 0, got {args.rankclip_ramp_epochs}.")
    from ..registry import family_for_model_name
    family = family_for_model_name(getattr(args, 'model', None))
    if family is not None or args.csv_dataset_sample_type != 'default':
        raise ValueError(f"--loss-opt rankclip pretrains plain CLIP models on image-caption data; "
                         f"not {args.model} / --csv-dataset-sample-type {args.csv_dataset_sample_type}.")
    for flag, on in (('--siglip', getattr(args, 'siglip', False)), ('--distill-model', getattr(args, 'distill_model', None)),
                     ('a CoCa model', 'coca' in str(getattr(args, 'model', '')).lower())):
        if on:
            raise ValueError(f"--loss-opt rankclip replaces CLIP's contrastive loss and cannot be combined "
                             f"with {flag}.")
