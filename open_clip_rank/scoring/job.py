"""The rank CLI's scoring job: its inputs as partitions, the process's share, the output folder's identity.

``plan_from_args`` turns ``--shards`` / ``--images`` / ``--csv`` into partitions (``partitions.py``) and the run's
identity; ``run_job`` scores this process's share into the folder (``engine.py``), with the checks a shared folder
needs: every process checks the folder's identity before rank 0 records it, and all processes meet at a barrier
before anyone reads the finished folder. Under ``torchrun`` (or any launcher setting RANK / WORLD_SIZE, as OpenCLIP
reads them) a gloo process group serves the barriers only: no tensor is exchanged.
"""
import logging
import os
from dataclasses import dataclass
from typing import List, Optional

from .. import registry
from . import outputs
from .engine import ScoringPlan, ScoringSummary, file_sha256, score_to_folder
from .partitions import DEFAULT_PARTITION_SIZE, chunk_partitions, items_digest, shard_partitions

_logger = logging.getLogger(__name__)


@dataclass
class Launch:
    local_rank: int = 0
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launch_from_env() -> Launch:
    from ..integration.compat import launch_ranks
    return Launch(*launch_ranks())


def start_process_group(launch: Launch) -> None:
    import torch.distributed as dist
    if launch.world_size > 1 and not dist.is_initialized():
        dist.init_process_group('gloo', init_method='env://', rank=launch.rank, world_size=launch.world_size)


def barrier(launch: Launch) -> None:
    import torch.distributed as dist
    if launch.world_size > 1 and dist.is_initialized():
        dist.barrier()


def end_process_group(launch: Launch) -> None:
    import torch.distributed as dist
    if launch.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


# --- the plan --------------------------------------------------------------------------------------------

def _identity(args, model, prompts, chunks=None) -> dict:
    from ..files.checkpoints import loaded_from
    weights = args.checkpoint_path or loaded_from(model)
    return {'model': args.model or args.config_path, 'checkpoint': weights, 'chunks': chunks,
            'checkpoint_sha256': file_sha256(weights) if weights else None,
            'prompts': prompts if prompts is not None else (f'per sample: {args.shard_prompt_key}'
                                                            if args.shards else 'per row'),
            'precision': args.precision}


def _folder_items(args) -> List[dict]:
    from ..files.images import find_images
    return [{'key': path, 'path': path} for path in find_images(args.images, flag='--images')]


def _csv_items(args, model) -> List[dict]:
    rows = registry.import_function(registry.sample_type_of_model(model).read_rows)(args, model)
    return [{'key': r['image'], 'path': r['image'], 'prompt': r['prompt'], 'category': r['category'],
             'target': r['target']} for r in rows]


def plan_from_args(args, model) -> ScoringPlan:
    size = args.partition_size or DEFAULT_PARTITION_SIZE
    prompts, chunks = None, None
    if args.shards:
        from ..data.shards import check_shards
        partitions = shard_partitions(check_shards(args.shards, '--shards'))
        if model.needs_prompt and not args.shard_prompt_key:
            prompts = list(args.prompt)
    else:
        items = _folder_items(args) if args.images else _csv_items(args, model)
        partitions = chunk_partitions(items, args.images or args.csv, 'files' if args.images else 'rows', size)
        chunks = f'{len(items)} items, {size} per partition, digest {items_digest(items)}'
        if args.images and model.needs_prompt:
            prompts = list(args.prompt)
    extra = tuple(k for k in (args.shard_keep_keys or ()) if k) if args.shards else ()
    truth = {column: key for column, key in (('target', args.shard_target_key), ('category', args.shard_category_key))
             if key and args.shards}
    return ScoringPlan(partitions=partitions, prompts=prompts, identity=_identity(args, model, prompts, chunks),
                       prompt_key=args.shard_prompt_key if args.shards and model.needs_prompt else None,
                       image_key=args.shard_image_key, extra_keys=extra, truth_keys=truth,
                       probabilities=args.probabilities,
                       load_truncated=getattr(args, 'load_truncated_images', False))


def _manifest(args, plan: ScoringPlan, launch: Launch) -> dict:
    return {**plan.identity, 'format_version': outputs.FORMAT_VERSION,
            'input': {'shards': args.shards, 'images': args.images, 'csv': args.csv},
            'partitions': [p.name for p in plan.partitions], 'world_size': launch.world_size}


def run_job(args, model, transform, tokenizer, folder, launch: Optional[Launch] = None):
    """Score this process's share of the input into ``folder``. -> (plan, summary). Every process must call it."""
    launch = launch or Launch()
    plan = plan_from_args(args, model)
    outputs.check_folder_identity(folder, plan.identity)  # every process, before the manifest is (re)written
    barrier(launch)
    if launch.is_main:
        if outputs.remove_stale_temporaries(folder):
            _logger.info(f"Removed the temporary files a killed run left in {folder}.")
        outputs.write_manifest(folder, _manifest(args, plan, launch))
    barrier(launch)
    device = next(model.parameters()).device
    summary = score_to_folder(model, transform, tokenizer, plan, folder, rank=launch.rank,
                              world_size=launch.world_size, batch_size=args.batch_size, workers=args.workers,
                              device=device, progress=not args.no_progress and launch.is_main)
    _log_summary(summary, launch, folder if args.output_dir else None)
    barrier(launch)
    return plan, summary


def _log_summary(summary: ScoringSummary, launch: Launch, folder) -> None:
    where = f"process {launch.rank}/{launch.world_size}: " if launch.world_size > 1 else ''
    rate = f", {summary.rows / summary.seconds:.1f} rows/s" if summary.seconds else ''
    place = f", in {os.path.join(folder, outputs.SCORES)}" if folder else ''  # None: a temporary folder
    _logger.info(f"{where}{len(summary.written)} partition(s) scored ({summary.rows} rows, {summary.skipped} "
                 f"skipped{rate}), {len(summary.reused)} already done{place}.")


# --- the finished folder as the rank CLI's rows --------------------------------------------------------------

def rows_from_folder(folder, plan: ScoringPlan) -> list:
    """Every scored (image, prompt) and every skipped sample as the rank CLI's rows (small inputs, metrics)."""
    rows = []
    for _, table in outputs.iter_score_tables(folder):
        for r in table.to_pylist():
            image = r.pop('key')
            prompt = r.pop('prompt')
            category = r.pop('category', prompt if plan.prompts else None)  # a folder's category is its prompt
            rows.append({'image': image, 'prompt': prompt, 'category': category, 'target': r.pop('target', None),
                         'skipped': None,
                         **{k: v for k, v in r.items() if k not in ('url', 'path')}})
    for s in outputs.skipped_samples(folder):
        image = s.get('key') or s.get('url') or '?'
        prompts = [s['prompt']] if 'prompt' in s else (plan.prompts or [''])
        for prompt in prompts:
            category = s.get('category', prompt if plan.prompts else None)
            rows.append({'image': image, 'prompt': prompt, 'category': category, 'target': s.get('target'),
                         'skipped': s['reason'], 'score': None})
    return rows
