"""Image transforms for rank data, derived from the model's own preprocessing (torchvision only)."""
from torchvision import transforms as T


def rank_transforms(preprocess_val):
    """As the original: resize to the model's square input without cropping (+ random flip in training)."""
    steps = list(preprocess_val.transforms)
    normalize = next(t for t in steps if isinstance(t, T.Normalize))
    size = None
    for t in steps:
        if isinstance(t, (T.CenterCrop, T.Resize)):
            s = t.size
            size = (s, s) if isinstance(s, int) else tuple(s) if len(s) == 2 else (s[0], s[0])
    common = [T.ToTensor(), T.Normalize(normalize.mean, normalize.std)]
    resize = T.Resize(size, interpolation=T.InterpolationMode.BICUBIC)
    return T.Compose([resize, T.RandomHorizontalFlip(p=0.5), *common]), T.Compose([resize, *common])
