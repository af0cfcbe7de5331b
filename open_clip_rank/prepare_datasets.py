"""Turn a downloaded copy of one of the paper's datasets into rank CSVs (train / val / test).

``python -m open_clip_rank.prepare_datasets NAME --root DIR [--split-json FILE] --out DIR`` with NAME one of
``koniq``, ``ava``, ``adience``, ``hci``, ``count``. The CSVs are the training format (tab separated,
``filepath title cname value sample_weights_by_class``, absolute image paths) that ``load_rank_table``
and ``python -m open_clip_train.main --csv-dataset-sample-type rank`` read.

Each dataset is read in its public file layout (``LAYOUTS`` below, also in docs/data.md). A missing label
file, image folder or image, or a label file that does not parse, is one ``DatasetLayoutError`` naming the
file expected; the CLI prints it and exits with status 2.

Splits: ``--split-json`` applies a split file in the official repository's format
(``{"train_id": [...], "test_id": [...]}``, optionally ``"val_id"``; ids are file stems, see ``ids`` per
dataset). Without one, a deterministic seeded split: items are ordered by a hash of ``seed:id`` and the
first ``--test-fraction`` go to test, the next ``--val-fraction`` to val (Adience: the test set is fold
``--test-fold``; counting: COCO val2017 is the test set when train2017 is there too). Without a
``val_id`` list, val is carved the same seeded way out of train. Images shared by several rows (counting:
one row per category) always land in one split.
"""
import argparse
import csv
import hashlib
import json
import math
import os
import re
import sys
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .files.atomic import atomic_write
from .files.images import IMAGE_SUFFIXES

COLUMNS = ('filepath', 'title', 'cname', 'value', 'sample_weights_by_class')
SPLIT_NAMES = ('train', 'val', 'test')

# Adience's eight age groups, in order; the value is the group's index (0..7).
ADIENCE_GROUPS = ((0, 2), (4, 6), (8, 12), (15, 20), (25, 32), (38, 43), (48, 53), (60, 100))
HCI_DECADES = ('1930s', '1940s', '1950s', '1960s', '1970s')
ADIENCE_FOLDS = 5


class DatasetLayoutError(ValueError):
    """The downloaded dataset is not where or not in the shape this command expects."""


@dataclass(frozen=True)
class Item:
    path: str                 # absolute image path
    ids: Tuple[str, ...]      # ids a split file may use for this image; ids[0] is the canonical one
    cname: str
    title: str
    value: object             # int or float
    group: Optional[str] = None  # fixed split by the dataset itself ('test' / 'trainval'), else None


@dataclass
class Read:
    """What a reader found: the items and why some rows were left out."""
    items: List[Item]
    label_file: str
    dropped: Dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Spec:
    name: str
    title: str
    instruction: str          # format string; {name} is the category name
    cname: Optional[str]      # None: one category per object class (counting)
    value: str
    layout: str
    ids: str
    reader: Callable


def _progress(iterable, desc, total=None, enabled=True):
    if not enabled:
        return iterable
    from tqdm import tqdm
    return tqdm(iterable, desc=desc, total=total, unit='img', leave=False, file=sys.stderr)


def _need_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DatasetLayoutError(f"expected {what} at {path}, but there is no such file.")
    return path


def _need_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DatasetLayoutError(f"expected {what} at {path}/, but there is no such folder.")
    return path


def _first_dir(candidates: Sequence[Path], what: str) -> Path:
    for c in candidates:
        if c.is_dir():
            return c
    raise DatasetLayoutError(f"expected {what} at {candidates[0]}/, but there is no such folder"
                             + (f" (also looked for {', '.join(str(c) + '/' for c in candidates[1:])})."
                                if len(candidates) > 1 else "."))


def _columns(reader: csv.DictReader, path: Path, needed: Sequence[str]):
    have = reader.fieldnames or []
    missing = [c for c in needed if c not in have]
    if missing:
        raise DatasetLayoutError(f"{path} has no column(s) {missing} (columns: {have}); expected the dataset's "
                                 f"original label file with columns {list(needed)}.")


def _number(text, path, line, column):
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = float('nan')
    if not math.isfinite(value):
        raise DatasetLayoutError(f"{path} line {line}: column '{column}' should be a number, got {text!r}.")
    return value


# ---------------------------------------------------------------------------------------------- readers


def read_koniq(root: Path, instruction: str, cname: str, opts) -> Read:
    label = _need_file(root / 'koniq10k_scores_and_distributions.csv', 'the KonIQ-10k label file')
    images = _first_dir([root / '1024x768', root / '512x384'], 'the KonIQ-10k image folder')
    items = []
    with open(label, newline='', encoding='utf-8-sig') as f:
        reader = csv.DictReader(f)
        _columns(reader, label, ('image_name', 'MOS'))
        for line, row in enumerate(reader, start=2):
            name = (row['image_name'] or '').strip()
            if not name:
                raise DatasetLayoutError(f"{label} line {line}: empty 'image_name'.")
            mos = _number(row['MOS'], label, line, 'MOS')
            items.append(Item(str(images / name), (Path(name).stem,), cname, instruction, mos))
    return Read(items, str(label))


def _ava_images(root: Path) -> Path:
    images = _need_dir(root / 'images', 'the AVA image folder (images/<image_id>.jpg)')
    nested = images / 'images'  # some copies unpack to images/images/
    return nested if nested.is_dir() else images


def read_ava(root: Path, instruction: str, cname: str, opts) -> Read:
    label = _need_file(root / 'AVA.txt', 'the AVA label file')
    images = _ava_images(root)
    items, dropped = [], Counter()
    with open(label) as f:
        for line, text in enumerate(f, start=1):
            fields = text.split()
            if not fields:
                continue
            # index, image id, votes for scores 1..10, semantic tag 1, semantic tag 2, challenge id
            if len(fields) < 12 or not all(x.isdigit() for x in fields[1:12]):
                raise DatasetLayoutError(
                    f"{label} line {line}: expected 'index image_id n1 ... n10 tag1 tag2 challenge' "
                    f"(whitespace separated integers), got {text.strip()[:80]!r}.")
            image_id, votes = fields[1], [int(x) for x in fields[2:12]]
            total = sum(votes)
            if total == 0:
                dropped['no votes'] += 1
                continue
            mean = sum((score + 1) * n for score, n in enumerate(votes)) / total
            items.append(Item(str(images / f'{image_id}.jpg'), (image_id,), cname, instruction, round(mean, 6)))
    return Read(items, str(label), dict(dropped))


_AGE_RANGE = re.compile(r'^\(\s*(\d+)\s*,\s*(\d+)\s*\)$')


def adience_group(age: str) -> Optional[int]:
    """Index of one of the eight Adience age groups, or None (single ages, 'None', other ranges)."""
    m = _AGE_RANGE.match((age or '').strip())
    if not m:
        return None
    pair = (int(m.group(1)), int(m.group(2)))
    return ADIENCE_GROUPS.index(pair) if pair in ADIENCE_GROUPS else None


def read_adience(root: Path, instruction: str, cname: str, opts) -> Read:
    kind = getattr(opts, 'adience_images', 'auto')
    if kind == 'auto':
        kind = 'faces' if not (root / 'aligned').is_dir() and (root / 'faces').is_dir() else 'aligned'
    folder = _need_dir(root / kind, f"the Adience image folder ({kind}/<user_id>/...)")
    prefix = 'landmark_aligned_face' if kind == 'aligned' else 'coarse_tilt_aligned_face'
    test_fold = getattr(opts, 'test_fold', 0)
    items, dropped, first_label = [], Counter(), None
    for fold in range(ADIENCE_FOLDS):
        label = _need_file(root / f'fold_{fold}_data.txt', f'Adience fold file {fold}')
        first_label = first_label or str(label)
        with open(label, newline='') as f:
            reader = csv.DictReader(f, delimiter='\t')
            _columns(reader, label, ('user_id', 'original_image', 'face_id', 'age'))
            for row in reader:
                group = adience_group(row['age'])
                if group is None:
                    dropped['age not one of the 8 groups'] += 1
                    continue
                user, image, face = ((row[k] or '').strip() for k in ('user_id', 'original_image', 'face_id'))
                if not (user and image and face):
                    raise DatasetLayoutError(f"{label} line {reader.line_num}: empty user_id, original_image or "
                                             f"face_id.")
                stem = Path(image).stem
                path = folder / user / f'{prefix}.{face}.{image}'
                ids = (f'landmark_aligned_face.{face}.{stem}', f'coarse_tilt_aligned_face.{face}.{stem}')
                items.append(Item(str(path), ids, cname, instruction, group,
                                  group='test' if fold == test_fold else 'trainval'))
    return Read(items, first_label, dict(dropped))


def _hci_root(root: Path) -> Path:
    candidates = [root, root / 'data' / 'imgs' / 'decade_database',
                  root / 'HistoricalColor-ECCV2012' / 'data' / 'imgs' / 'decade_database']
    for c in candidates:
        if (c / HCI_DECADES[0]).is_dir():
            return c
    raise DatasetLayoutError(
        f"expected the HCI decade folders at {root / HCI_DECADES[0]}/ .. {root / HCI_DECADES[-1]}/ (or under "
        f"{candidates[1]}/ or {candidates[2]}/), but there is no such folder.")


def read_hci(root: Path, instruction: str, cname: str, opts) -> Read:
    base = _hci_root(root)
    items = []
    for value, decade in enumerate(HCI_DECADES):
        folder = _need_dir(base / decade, f'the HCI folder of the {decade}')
        files = sorted(p for p in folder.iterdir()
                       if p.is_file() and not p.name.startswith('.') and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DatasetLayoutError(f"expected images ({', '.join(IMAGE_SUFFIXES)}) in {folder}/, found none.")
        for p in files:
            items.append(Item(str(p), (f'decade_{p.stem}', p.stem), cname, instruction, value))
    return Read(items, str(base))


COCO_SPLITS = (('train2017', 'trainval'), ('val2017', 'test'))


def read_count(root: Path, instruction: str, cname: Optional[str], opts) -> Read:
    found = [(root / 'annotations' / f'instances_{s}.json', root / s, group) for s, group in COCO_SPLITS]
    found = [f for f in found if f[0].is_file()]
    if not found:
        raise DatasetLayoutError(
            f"expected COCO instance annotations at {root / 'annotations' / 'instances_val2017.json'} "
            f"(and/or instances_train2017.json), but there is no such file.")
    wanted = set(getattr(opts, 'categories', None) or [])
    min_count, max_count = getattr(opts, 'min_count', 1), getattr(opts, 'max_count', None)
    items, dropped = [], Counter()
    both = len(found) == 2
    for label, image_dir, group in found:
        _need_dir(image_dir, f'the COCO images of {label.name}')
        with open(label) as f:
            try:
                coco = json.load(f)
            except json.JSONDecodeError as err:
                raise DatasetLayoutError(f"{label} is not valid JSON ({err}).")
        if not all(k in coco for k in ('images', 'annotations', 'categories')):
            raise DatasetLayoutError(f"{label} should be a COCO instances file with 'images', 'annotations' and "
                                     f"'categories'; it has {sorted(coco)[:6]}.")
        names = {c['id']: c['name'] for c in coco['categories']}
        unknown = wanted - set(names.values())
        if unknown:
            raise DatasetLayoutError(f"{label} has no categor(y/ies) {sorted(unknown)}; "
                                     f"e.g. {sorted(names.values())[:5]}.")
        files = {im['id']: im.get('file_name') or os.path.basename(im.get('coco_url', '')) for im in coco['images']}
        counts = Counter()
        for ann in coco['annotations']:
            if ann.get('iscrowd', 0):
                continue
            counts[(ann['image_id'], ann['category_id'])] += 1
        for (image_id, category_id), n in sorted(counts.items()):
            name = names[category_id]
            if wanted and name not in wanted:
                continue
            if n < min_count or (max_count is not None and n > max_count):
                dropped['count outside --min-count/--max-count'] += 1
                continue
            file = files[image_id]
            items.append(Item(str(image_dir / file), (str(image_id), Path(file).stem), name,
                              instruction.format(name=name), n, group=group if both else None))
    return Read(items, str(found[0][0]), dict(dropped))


DATASETS: Dict[str, Spec] = OrderedDict((s.name, s) for s in (
    Spec('koniq', 'KonIQ-10k (image quality)', 'Rank the image quality.', 'quality',
         "MOS (mean opinion score, 1..5) from column 'MOS'",
         'koniq10k_scores_and_distributions.csv, 1024x768/<image_name> (or 512x384/)',
         'image file stem (e.g. 10004473376)', read_koniq),
    Spec('ava', 'AVA (aesthetics)', 'Rank the image aesthetics.', 'aesthetics',
         'mean of the 1..10 vote histogram in AVA.txt (images without votes are left out)',
         'AVA.txt, images/<image_id>.jpg', 'AVA image id (e.g. 953417)', read_ava),
    Spec('adience', 'Adience (facial age)', 'Rank the age of the person.', 'age',
         'index 0..7 of the age group (0-2, 4-6, 8-12, 15-20, 25-32, 38-43, 48-53, 60-100); other age labels '
         'are left out',
         'fold_0_data.txt .. fold_4_data.txt, aligned/<user_id>/landmark_aligned_face.<face_id>.<original_image> '
         '(or faces/<user_id>/coarse_tilt_aligned_face.<face_id>.<original_image>)',
         'landmark_aligned_face.<face_id>.<original_image without extension>', read_adience),
    Spec('hci', 'HCI (historical colour images, decade)', 'Rank the decade of the photo.', 'decade',
         'index 0..4 of the decade folder (1930s .. 1970s)',
         '1930s/ .. 1970s/ (the decade_database folder, or HistoricalColor-ECCV2012/ above it)',
         'decade_<file stem>', read_hci),
    Spec('count', 'object counting (COCO)', 'Rank the numbers of {name}.', None,
         'number of non-crowd instances of the category in the image (images without one are left out)',
         'annotations/instances_train2017.json + train2017/, annotations/instances_val2017.json + val2017/ '
         '(either or both)',
         'COCO image id (e.g. 360661) or file stem', read_count),
))


# ---------------------------------------------------------------------------------------------- splits


def _order(keys, seed: int) -> List[str]:
    """Keys ordered by a seeded hash: deterministic, independent of listing order and of the other keys."""
    return sorted(keys, key=lambda k: (hashlib.sha1(f'{seed}:{k}'.encode()).hexdigest(), k))


def _take(keys, fraction: float, seed: int, total: Optional[int] = None) -> Tuple[set, set]:
    """(first round(fraction * total) keys in seeded order, the rest)."""
    ordered = _order(keys, seed)
    n = int(round(fraction * (len(ordered) if total is None else total)))
    n = min(n, len(ordered))
    return set(ordered[:n]), set(ordered[n:])


def load_split_json(path) -> Dict[str, str]:
    """id -> split from an official-format split file (``train_id``, ``test_id``, optional ``val_id``)."""
    path = Path(path)
    _need_file(path, 'the split file')
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise DatasetLayoutError(f"{path} is not valid JSON ({err}).")
    keys = {f'{s}_id': s for s in SPLIT_NAMES}
    if not isinstance(data, dict) or not {'train_id', 'test_id'} <= set(data) \
            or not all(isinstance(data[k], list) for k in keys if k in data):
        raise DatasetLayoutError(f"{path} should hold {{\"train_id\": [...], \"test_id\": [...]}} (optionally "
                                 f"\"val_id\"), like the official examples/*-split.json.")
    mapping = {}
    for key, split in keys.items():
        for i in data.get(key, []):
            i = str(i)
            if mapping.get(i, split) != split:
                raise DatasetLayoutError(f"{path}: id {i!r} is in both {mapping[i]}_id and {key}.")
            mapping[i] = split
    return mapping


def assign_splits(items: Sequence[Item], split_json=None, seed=0, val_fraction=0.1, test_fraction=0.2):
    """(split -> items, dropped reasons, split-file ids not found). Rows sharing ids[0] share a split."""
    keys = sorted({it.ids[0] for it in items})
    dropped = Counter()
    unmatched_split_ids = 0
    if split_json is not None:
        mapping = load_split_json(split_json)
        of_key = {}
        used = set()
        for it in items:
            if it.ids[0] in of_key:
                continue
            hit = next((i for i in it.ids if i in mapping), None)
            of_key[it.ids[0]] = mapping[hit] if hit is not None else None
            if hit is not None:
                used.add(hit)
        if not used:
            example = next(iter(mapping), '?')
            raise DatasetLayoutError(
                f"none of the {len(keys)} images matches an id in {split_json} (its ids look like {example!r}, this "
                f"dataset's like {keys[0] if keys else '?'!r}); is it the split file of another dataset?")
        unmatched_split_ids = len(set(mapping) - used)
        has_val = 'val' in mapping.values()
        if not has_val:
            train_keys = [k for k, s in of_key.items() if s == 'train']
            val, _ = _take(train_keys, val_fraction, seed, total=len(train_keys))
            for k in val:
                of_key[k] = 'val'
    else:
        fixed = {}
        for it in items:
            fixed.setdefault(it.ids[0], it.group)
        of_key = {}
        free = [k for k in keys if fixed[k] is None]
        test, rest = _take(free, test_fraction, seed)
        # val is a fraction of everything (not of what is left), so 0.7/0.1/0.2 by default
        val, _ = _take(rest, val_fraction, seed + 1, total=len(free))
        trainval = [k for k in keys if fixed[k] == 'trainval']
        val_fixed, _ = _take(trainval, val_fraction, seed + 1, total=len(trainval))
        for k in keys:
            if fixed[k] == 'test' or k in test:
                of_key[k] = 'test'
            elif k in val or k in val_fixed:
                of_key[k] = 'val'
            else:
                of_key[k] = 'train'
    splits = {s: [] for s in SPLIT_NAMES}
    for it in items:
        s = of_key.get(it.ids[0])
        if s is None:
            dropped['not in the split file'] += 1
        else:
            splits[s].append(it)
    return splits, dict(dropped), unmatched_split_ids


# ---------------------------------------------------------------------------------------------- writing


def class_weights(items: Sequence[Item]) -> List[float]:
    """1 / (rows of the same cname and value), normalised to sum to 1 per cname (the official convention)."""
    per_value = Counter((it.cname, it.value) for it in items)
    values_per_cname = Counter(c for c, _ in per_value)
    return [1.0 / (values_per_cname[it.cname] * per_value[(it.cname, it.value)]) for it in items]


def _format_value(v) -> str:
    return str(v) if isinstance(v, int) else repr(float(v))


def write_csv_atomic(path: Path, items: Sequence[Item]) -> None:
    """Tab-separated training format, written atomically (``files/atomic.py``)."""
    with atomic_write(path, 'w', newline='') as f:
        writer = csv.writer(f, delimiter='\t', lineterminator='\n')
        writer.writerow(COLUMNS)
        for it, w in zip(items, class_weights(items)):
            writer.writerow([it.path, it.title, it.cname, _format_value(it.value), repr(w)])


def check_images(items: Sequence[Item], label_file: str, skip_missing: bool, progress: bool):
    """Items whose image exists; a missing image is an error unless ``skip_missing``."""
    seen, missing = {}, []
    for it in _progress(items, 'checking images', total=len(items), enabled=progress):
        ok = seen.get(it.path)
        if ok is None:
            ok = seen[it.path] = os.path.isfile(it.path)
        if not ok:
            missing.append(it.path)
    if missing and not skip_missing:
        unique = sorted(set(missing))
        raise DatasetLayoutError(
            f"{len(unique)} image(s) listed in {label_file} are missing, e.g. expected {unique[0]}; "
            f"check --root, or pass --skip-missing to leave them out.")
    gone = set(missing)
    return [it for it in items if it.path not in gone], len(gone)


def prepare(name: str, root, out, split_json=None, seed: int = 0, val_fraction: float = 0.1,
            test_fraction: float = 0.2, test_fold: int = 0, instruction: Optional[str] = None,
            cname: Optional[str] = None, skip_missing: bool = False, categories: Optional[Sequence[str]] = None,
            min_count: int = 1, max_count: Optional[int] = None, adience_images: str = 'auto',
            progress: bool = True) -> Dict:
    """Write ``out/{train,val,test}.csv`` for dataset ``name``; returns the summary (also printed by the CLI)."""
    if name not in DATASETS:
        raise DatasetLayoutError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}.")
    spec = DATASETS[name]
    for label, f in (('--val-fraction', val_fraction), ('--test-fraction', test_fraction)):
        if not 0 <= f < 1:
            raise ValueError(f"{label} must be in [0, 1), got {f}.")
    if val_fraction + test_fraction >= 1:
        raise ValueError(f"--val-fraction + --test-fraction must be < 1, got {val_fraction + test_fraction}.")
    if not 0 <= test_fold < ADIENCE_FOLDS:
        raise ValueError(f"--test-fold must be 0..{ADIENCE_FOLDS - 1}, got {test_fold}.")
    if spec.cname is None and cname is not None:
        raise ValueError(f"{name} has one category per object class; --cname does not apply (use --categories).")
    cname = cname or spec.cname
    instruction = instruction or spec.instruction
    if spec.cname is None:
        if '{name}' not in instruction:
            raise ValueError(f"the {name} instruction must contain {{name}} (the object class), got {instruction!r}.")
    elif cname not in instruction:
        raise ValueError(f"the category word {cname!r} must appear in the instruction {instruction!r} "
                         f"(negative sampling swaps it); pass a matching --cname.")
    root = Path(root).expanduser().resolve()
    _need_dir(root, f'the {spec.title} download (--root)')
    opts = argparse.Namespace(test_fold=test_fold, categories=categories, min_count=min_count,
                              max_count=max_count, adience_images=adience_images)
    read = spec.reader(root, instruction, cname, opts)
    if not read.items:
        raise DatasetLayoutError(f"{read.label_file} lists no usable image for {name}.")
    items, n_missing = check_images(read.items, read.label_file, skip_missing, progress)
    dropped = Counter(read.dropped)
    if n_missing:
        dropped['image file missing'] += n_missing
    splits, split_dropped, unmatched = assign_splits(items, split_json, seed, val_fraction, test_fraction)
    dropped.update(split_dropped)
    if not splits['train']:
        raise DatasetLayoutError(f"no training rows left for {name} (label file {read.label_file}).")
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    summary = {'dataset': name, 'root': str(root), 'out': str(out.resolve()),
               'split_json': str(split_json) if split_json else None, 'seed': seed,
               'instruction': instruction, 'dropped': dict(dropped), 'split_ids_not_found': unmatched,
               'splits': {}}
    for split in SPLIT_NAMES:
        rows = splits[split]
        entry = {'rows': len(rows), 'file': None}
        if rows:
            path = out / f'{split}.csv'
            write_csv_atomic(path, rows)
            values = [float(it.value) for it in rows]
            entry.update(file=str(path.resolve()), images=len({it.path for it in rows}),
                         categories=dict(sorted(Counter(it.cname for it in rows).items())),
                         value_min=min(values), value_max=max(values))
        summary['splits'][split] = entry
    values = [float(it.value) for rows in splits.values() for it in rows]
    summary['total'] = {'rows': len(values), 'images': len({it.path for rows in splits.values() for it in rows}),
                        'value_min': min(values), 'value_max': max(values)}
    return summary


def format_summary(summary: Dict) -> str:
    lines = [f"{summary['dataset']}: {summary['out']}  (instruction: {summary['instruction']!r})"]
    lines.append(f"{'split':<6} {'rows':>8} {'images':>8} {'values':>17}  categories (rows)")
    for split, e in summary['splits'].items():
        if not e['rows']:
            lines.append(f"{split:<6} {0:>8} {'':>8} {'':>17}  (empty, not written)")
            continue
        cats = e['categories']
        shown = ', '.join(f'{c} {n}' for c, n in list(cats.items())[:8])
        if len(cats) > 8:
            shown += f', ... ({len(cats)} categories)'
        vrange = f"{e['value_min']:g}..{e['value_max']:g}"
        lines.append(f"{split:<6} {e['rows']:>8} {e['images']:>8} {vrange:>17}  {shown}")
    t = summary['total']
    vrange = f"{t['value_min']:g}..{t['value_max']:g}"
    lines.append(f"{'all':<6} {t['rows']:>8} {t['images']:>8} {vrange:>17}")
    for reason, n in sorted(summary['dropped'].items()):
        lines.append(f"left out: {n} row(s), {reason}")
    if summary['split_ids_not_found']:
        lines.append(f"{summary['split_ids_not_found']} id(s) of {summary['split_json']} have no image here")
    return '\n'.join(lines)


def build_parser() -> argparse.ArgumentParser:
    epilog = '\n'.join(f"  {s.name:<8} {s.title}: {s.layout}" for s in DATASETS.values())
    p = argparse.ArgumentParser(prog='python -m open_clip_rank.prepare_datasets', description=__doc__.split('\n\n')[0],
                                epilog='layouts (under --root):\n' + epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('name', choices=list(DATASETS), help='which dataset')
    p.add_argument('--root', required=True, help='the downloaded dataset (layout below)')
    p.add_argument('--out', required=True, help='folder for train.csv, val.csv, test.csv')
    p.add_argument('--split-json', default=None,
                   help='official split file (examples/<dataset>-split.json of uynaes/RankingAwareCLIP); '
                        'rows whose image is in neither list are left out')
    p.add_argument('--seed', type=int, default=0, help='seed of the split (and of val carved out of train)')
    p.add_argument('--val-fraction', type=float, default=0.1, help='share of the images for val (default 0.1)')
    p.add_argument('--test-fraction', type=float, default=0.2,
                   help='share of the images for test without --split-json (default 0.2; not Adience)')
    p.add_argument('--test-fold', type=int, default=0, help='adience without --split-json: the test fold (0..4)')
    p.add_argument('--instruction', default=None, help='override the instruction (count: a template with {name})')
    p.add_argument('--cname', default=None, help='override the category name (must appear in the instruction)')
    p.add_argument('--categories', nargs='+', default=None, help='count: only these COCO categories')
    p.add_argument('--min-count', type=int, default=1, help='count: least instances per row (default 1)')
    p.add_argument('--max-count', type=int, default=None, help='count: most instances per row (default: no limit)')
    p.add_argument('--adience-images', choices=('auto', 'aligned', 'faces'), default='auto',
                   help='adience: aligned/ (landmark_aligned_face.*) or faces/ (coarse_tilt_aligned_face.*)')
    p.add_argument('--skip-missing', action='store_true', help='leave out rows whose image file is missing')
    p.add_argument('--no-progress', action='store_true', help='no progress bar')
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = prepare(args.name, args.root, args.out, split_json=args.split_json, seed=args.seed,
                          val_fraction=args.val_fraction, test_fraction=args.test_fraction,
                          test_fold=args.test_fold, instruction=args.instruction, cname=args.cname,
                          skip_missing=args.skip_missing, categories=args.categories, min_count=args.min_count,
                          max_count=args.max_count, adience_images=args.adience_images,
                          progress=not args.no_progress)
    except (ValueError, OSError) as err:
        print(f"open_clip_rank.prepare_datasets: error: {err}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 0


if __name__ == '__main__':
    sys.exit(main())
