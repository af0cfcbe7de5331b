"""Two views of every image-caption pair (RankCLIP's ``--rankclip-inmodal``, built on CyCLIP's code): the sample as
it is, and an augmented image (torchvision's ``AutoAugment`` on the opened image, as CyCLIP's
``utils/augment_image.py``) with an augmented caption (EDA, as CyCLIP's ``utils/augment_text.py``).

OpenCLIP's own data (CSV, webdataset, synthetic) builds the samples: the two-view transform and tokenizer below stand
in for its preprocessing and tokenizer, so each sample holds a [2, C, H, W] image and a [2, L] caption, and
``ViewsLoader`` turns each batch [B, 2, ...] into OpenCLIP's [2B, ...] (the B originals, then the B augmented), so
the model is still called as ``model(images, texts)``.

EDA (Wei & Zou 2019): one operation per caption, chosen at random: synonym replacement, random insertion (of a
synonym), random swap, random deletion, each touching about ``alpha`` of the words. The synonym operations need a
synonym source: WordNet through NLTK when its corpus is installed (``python -m nltk.downloader wordnet``; no
package on PyPI ships WordNet's data), or a file of ``word<TAB>synonym,synonym,...`` lines; without one, the
corpus-free operations (swap, deletion) are used and the log says so.
"""
import functools
import logging
import random
import re
from typing import Callable, Dict, List, Optional

import torch

_logger = logging.getLogger(__name__)

# EDA's stop words (never replaced by a synonym): the common English function words
STOP_WORDS = frozenset("""a about above after again against all am an and any are as at be because been before being
below between both but by can could did do does doing down during each few for from further had has have having he
her here hers herself him himself his how i if in into is it its itself just me more most my myself no nor not now of
off on once only or other our ours ourselves out over own same she should so some such than that the their theirs
them themselves then there these they this those through to too under until up very was we were what when where
which while who whom why will with you your yours yourself yourselves""".split())


# --- synonym sources ---------------------------------------------------------------------------------------

def wordnet_synonyms() -> Optional[Callable[[str], List[str]]]:
    """WordNet through NLTK, or None when NLTK or its WordNet corpus is not installed."""
    try:
        from nltk.corpus import wordnet
        wordnet.synsets('dog')
    except Exception:  # noqa: BLE001 - not installed, or the corpus is missing (LookupError)
        return None

    @functools.lru_cache(maxsize=65536)  # a caption's words recur across samples and epochs: look each up once
    def synonyms(word: str) -> List[str]:
        found = {lemma.name().replace('_', ' ').replace('-', ' ').lower()
                 for synset in wordnet.synsets(word) for lemma in synset.lemmas()}
        return sorted(s for s in found if s != word and re.fullmatch(r'[a-z ]+', s))

    return synonyms


def file_synonyms(path) -> Callable[[str], List[str]]:
    """A ``word<TAB>synonym,synonym,...`` file (UTF-8), one word per line."""
    table: Dict[str, List[str]] = {}
    with open(path, encoding='utf-8') as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            word, sep, rest = line.rstrip('\n').partition('\t')
            if not sep:
                raise ValueError(f"{path} line {number}: expected 'word<TAB>synonym,synonym,...'.")
            table[word.strip().lower()] = [s.strip().lower() for s in rest.split(',') if s.strip()]
    return lambda word: table.get(word, [])


def synonym_source(spec: str):
    """``--rankclip-synonyms``: 'wordnet' (if installed), 'none', or a synonym file. -> function or None."""
    if spec == 'none':
        return None
    if spec == 'wordnet':
        source = wordnet_synonyms()
        if source is None:
            _logger.warning("--rankclip-inmodal: WordNet (NLTK and its corpus) is not installed, so the captions' "
                            "augmentation uses random swap and deletion only (python -m nltk.downloader wordnet, or "
                            "--rankclip-synonyms FILE, adds synonym replacement and insertion).")
        return source
    return file_synonyms(spec)


# --- EDA ---------------------------------------------------------------------------------------------------

def _words(text: str) -> List[str]:
    """EDA's normalisation: lower case, letters and spaces only."""
    return re.sub(r'[^a-z ]+', ' ', text.lower().replace('-', ' ').replace('\t', ' ')).split()


def synonym_replacement(words, n, synonyms, rng):
    out = list(words)
    candidates = [w for w in dict.fromkeys(words) if w not in STOP_WORDS]
    rng.shuffle(candidates)
    replaced = 0
    for word in candidates:
        options = synonyms(word)
        if options:
            choice = rng.choice(options)
            out = [choice if w == word else w for w in out]
            replaced += 1
        if replaced >= n:
            break
    return ' '.join(out).split()


def random_insertion(words, n, synonyms, rng):
    out = list(words)
    for _ in range(n):
        for _ in range(10):  # EDA's ten tries to find a word with a synonym
            options = synonyms(rng.choice(out)) if out else []
            if options:
                out.insert(rng.randint(0, len(out)), rng.choice(options))
                break
    return out


def random_swap(words, n, rng):
    out = list(words)
    for _ in range(n):
        if len(out) < 2:
            break
        i, j = rng.sample(range(len(out)), 2)
        out[i], out[j] = out[j], out[i]
    return out


def random_deletion(words, p, rng):
    if len(words) <= 1:
        return list(words)
    kept = [w for w in words if rng.random() > p]
    return kept or [rng.choice(words)]


class EDA:
    """One EDA operation per caption (``alpha``: the fraction of words touched, EDA's and CyCLIP's 0.1)."""

    def __init__(self, synonyms=None, alpha: float = 0.1, seed: Optional[int] = None):
        self.synonyms = synonyms
        self.alpha = alpha
        self.rng = random.Random(seed) if seed is not None else random

    def operations(self):
        corpus_free = ['swap', 'delete']
        return (['replace', 'insert'] + corpus_free) if self.synonyms is not None else corpus_free

    def __call__(self, text: str) -> str:
        words = _words(text)
        if not words:
            return text
        n = max(1, int(self.alpha * len(words)))
        operation = self.rng.choice(self.operations())
        if operation == 'replace':
            words = synonym_replacement(words, n, self.synonyms, self.rng)
        elif operation == 'insert':
            words = random_insertion(words, n, self.synonyms, self.rng)
        elif operation == 'swap':
            words = random_swap(words, n, self.rng)
        else:
            words = random_deletion(words, self.alpha, self.rng)
        return ' '.join(words)


# --- two views through OpenCLIP's data -------------------------------------------------------------------

class TwoViewTransform:
    """OpenCLIP's image preprocessing, applied to the image and to its AutoAugment view: -> [2, C, H, W]."""

    def __init__(self, preprocess, augment=None):
        from torchvision.transforms import AutoAugment
        self.preprocess = preprocess
        self.augment = augment or AutoAugment()

    def __call__(self, image):
        image = image.convert('RGB') if getattr(image, 'mode', 'RGB') != 'RGB' else image
        return torch.stack([self.preprocess(image), self.preprocess(self.augment(image))])


class TwoCaptionTokenizer:
    """OpenCLIP's tokenizer on each caption and on its EDA augmentation: texts [N] -> tokens [N, 2, L]."""

    def __init__(self, tokenizer, augment_text):
        self.tokenizer = tokenizer
        self.augment_text = augment_text
        self.context_length = getattr(tokenizer, 'context_length', None)

    def __call__(self, texts, *args, **kwargs):
        texts = [texts] if isinstance(texts, str) else list(texts)
        tokens = self.tokenizer([t for text in texts for t in (text, self.augment_text(text))], *args, **kwargs)
        return tokens.reshape(len(texts), 2, -1)


def views_first(batch):
    """A batch of (images [B, 2, ...], texts [B, 2, L]) -> ([2B, ...], [2B, L]): the B originals, then the B views."""
    images, texts = batch[0], batch[1]
    flat = [x.transpose(0, 1).reshape(-1, *x.shape[2:]) for x in (images, texts)]
    return (*flat, *batch[2:])


class ViewsLoader:
    """An OpenCLIP training loader whose batches come out as ``views_first`` batches; every other attribute
    (``num_batches``, ``num_samples``, the sampler, ...) is the loader's."""

    def __init__(self, loader):
        self._loader = loader

    def __iter__(self):
        for batch in self._loader:
            yield views_first(batch)

    def __len__(self):
        return len(self._loader)

    def __getattr__(self, name):
        return getattr(self._loader, name)
