"""Datasets for ``effdense train``: scikit-learn's bundled digits (no download), CIFAR-10/100 from a local
folder in torchvision's format, and any ImageFolder tree.

Every loader returns a :class:`DataSpec`; every problem a user can fix (missing folder, wrong layout, bad
option) raises :class:`DataError` with one line that names the problem and the fix.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

DATASETS: tuple[str, ...] = ("digits", "cifar10", "cifar100", "imagefolder")
"""Names accepted by :func:`build_datasets` (``--data``)."""

DEFAULT_IMAGE_SIZE: dict[str, int] = {"digits": 16, "cifar10": 32, "cifar100": 32, "imagefolder": 224}

# per-channel statistics of the training sets, for normalisation
_CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
_IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class DataError(ValueError):
    """A dataset cannot be loaded as asked; the message says why and what to do."""


class UnreadableImage(DataError):
    """An image file that cannot be decoded, named with its path. Raised in a ``DataLoader`` worker too, whose
    re-raise in the main process makes a new one from the worker's whole traceback: only the original message
    (its line that starts with :data:`_UNREADABLE`) is kept then."""

    def __init__(self, message: str) -> None:
        if message.startswith("Caught ") and _UNREADABLE in message:
            message = _UNREADABLE + message.rsplit(_UNREADABLE, 1)[1].splitlines()[0]
        super().__init__(message)


_UNREADABLE = "imagefolder: cannot read image "


# PIL modes of more than 8 bits per channel, which convert("RGB") clips to 0..255 (as torchvision's loader reads
# them): a 16-bit greyscale gradient becomes black and white, a float image in [0, 1] black
_DEEP_MODES = ("I", "F", "I;16", "I;16B", "I;16L", "I;16N")
_warned_deep = False


def _read_image(path: str):
    """An RGB PIL image, as torchvision's default loader reads it, or :class:`UnreadableImage` naming the file.
    An image of more than 8 bits per channel (which that conversion clips) is read so too, with a warning the
    first time in a process."""
    global _warned_deep
    from PIL import Image

    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            if image.mode in _DEEP_MODES and not _warned_deep:
                _warned_deep = True
                warnings.warn(
                    f"imagefolder: {path!r} is a {image.mode!r} image (more than 8 bits per channel), which is read "
                    "as torchvision's loader reads it, clipped to 0..255 (a 16-bit image mostly white, a float one in "
                    "[0, 1] black): convert such images to 8 bits per channel first",
                    stacklevel=2,
                )
            return image.convert("RGB")
    except Image.DecompressionBombError as exc:
        raise UnreadableImage(
            f"{_UNREADABLE}{path!r} (DecompressionBombError: {exc}); if the image is meant to be that large, raise "
            "PIL.Image.MAX_IMAGE_PIXELS (before training, e.g. in a script that calls effdense.train), or remove it"
        ) from None
    except (OSError, ValueError) as exc:  # (PIL's UnidentifiedImageError is an OSError)
        why = "not an image file PIL can identify" if isinstance(exc, Image.UnidentifiedImageError) else f"{type(exc).__name__}: {exc}"
        raise UnreadableImage(f"{_UNREADABLE}{path!r} ({why}); remove or replace the file") from None


def _visible_image(path: str) -> bool:
    """An image file by its extension, as ImageFolder's default, but not a hidden one (``.DS_Store``, the
    ``._name.jpg`` metadata files that macOS copies next to each image on other file systems)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

    return not os.path.basename(path).startswith(".") and has_file_allowed_extension(path, IMG_EXTENSIONS)


_VISIBLE_IMAGE_FOLDER: Any = None  # torchvision's ImageFolder without hidden folders (made at first use)


def __getattr__(name: str) -> Any:
    # effdense.data._VisibleImageFolder, where pickle looks the class up: made on first use in this process
    # too (a DataLoader worker started by spawn or forkserver unpickles the dataset in a fresh interpreter)
    if name == "_VisibleImageFolder":
        return _visible_image_folder()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _visible_image_folder() -> Any:
    """torchvision's ``ImageFolder`` whose classes and files leave out hidden folders (a Jupyter
    ``.ipynb_checkpoints`` in ``train/`` became a class; netatalk's ``.AppleDouble`` and thumbnail caches inside a
    class folder were read as its images), as hidden files are. Made at first use (torchvision is imported only
    for CIFAR and ImageFolder data), named ``effdense.data._VisibleImageFolder``: the module's ``__getattr__``
    makes it there for pickle, in a DataLoader worker started by spawn or forkserver too."""
    global _VISIBLE_IMAGE_FOLDER
    if _VISIBLE_IMAGE_FOLDER is None:
        tv = _torchvision()

        class _VisibleImageFolder(tv.datasets.ImageFolder):
            def find_classes(self, directory):
                classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
                if not classes:
                    raise FileNotFoundError(f"Couldn't find any class folder in {directory}.")
                return classes, {name: i for i, name in enumerate(classes)}

            @staticmethod
            def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, **kwargs):
                def visible(path: str) -> bool:
                    inside = os.path.relpath(path, directory).split(os.sep)[:-1]  # (the file's own name: is_valid_file)
                    return not any(part.startswith(".") for part in inside) and is_valid_file(path)

                return tv.datasets.ImageFolder.make_dataset(directory, class_to_idx, None, visible, **kwargs)

        _VisibleImageFolder.__qualname__ = "_VisibleImageFolder"
        _VISIBLE_IMAGE_FOLDER = _VisibleImageFolder
    return _VISIBLE_IMAGE_FOLDER


@dataclasses.dataclass
class DataSpec:
    """Train and test datasets of ``(image, label)`` pairs, with what a model needs to know about them."""

    name: str
    train: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: int
    # the training transform draws random numbers (crops, flips): wrap the training set in SeededSamples
    augmented: bool = False
    # the class names, label i the i-th (an ImageFolder's folder names; CIFAR's; the digits "0" to "9")
    classes: tuple[str, ...] = ()
    # what a run should say about the data it was given (e.g. which of two test folders it evaluates on)
    notes: tuple[str, ...] = ()


def load_digits(
    image_size: int = DEFAULT_IMAGE_SIZE["digits"],
    test_fraction: float = 0.25,
    split_seed: int = 0,
) -> DataSpec:
    """scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes), bilinearly resized to
    ``image_size`` and normalised with the training split's mean and std.

    Args:
        image_size: side of the square images the model sees.
        test_fraction: share of the images held out, stratified by class.
        split_seed: seed of the (fixed) stratified split; independent of the training seed.
    """
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:  # pragma: no cover - scikit-learn is in the `train` extra
        raise DataError("the digits dataset needs scikit-learn: pip install 'effdense[train]'") from exc
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must be in (0, 1), got {test_fraction}")
    digits = _sk_load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    labels = torch.tensor(digits.target, dtype=torch.long)
    if image_size != images.shape[-1]:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    train_idx, test_idx = train_test_split(
        list(range(len(labels))), test_size=test_fraction, stratify=digits.target, random_state=split_seed
    )
    train_idx_t, test_idx_t = torch.tensor(train_idx), torch.tensor(test_idx)
    mean, std = images[train_idx_t].mean(), images[train_idx_t].std()
    images = (images - mean) / std
    return DataSpec(
        name="digits",
        train=TensorDataset(images[train_idx_t].contiguous(), labels[train_idx_t]),
        test=TensorDataset(images[test_idx_t].contiguous(), labels[test_idx_t]),
        num_classes=10,
        in_channels=1,
        image_size=image_size,
        classes=tuple(str(d) for d in range(10)),
    )


def _torchvision():
    try:
        import torchvision
    except ImportError as exc:  # pragma: no cover
        raise DataError("CIFAR and ImageFolder data need torchvision: pip install torchvision") from exc
    return torchvision


def load_cifar(name: str, root: str | os.PathLike, image_size: int = 32, augment: bool = True) -> DataSpec:
    """CIFAR-10 or CIFAR-100 from ``root`` in torchvision's layout (``cifar-10-batches-py/`` or
    ``cifar-100-python/``); nothing is downloaded. Training images get the usual random crop (padding 4)
    and horizontal flip when ``augment``.
    """
    tv = _torchvision()
    from torchvision import transforms as T

    if name not in _CIFAR_STATS:
        raise DataError(f"unknown CIFAR variant {name!r}; expected 'cifar10' or 'cifar100'")
    root = _existing_dir(root, name)
    cls = tv.datasets.CIFAR10 if name == "cifar10" else tv.datasets.CIFAR100
    subdir = cls.base_folder
    mean, std = _CIFAR_STATS[name]
    resize = [T.Resize(image_size, antialias=True)] if image_size != 32 else []
    train_tf = T.Compose(
        resize
        + ([T.RandomCrop(image_size, padding=image_size // 8), T.RandomHorizontalFlip()] if augment else [])
        + [T.ToTensor(), T.Normalize(mean, std)]
    )
    test_tf = T.Compose(resize + [T.ToTensor(), T.Normalize(mean, std)])
    try:
        train = cls(root, train=True, transform=train_tf, download=False)
        test = cls(root, train=False, transform=test_tf, download=False)
    except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted. You can use download=True ..."
        raise DataError(_cifar_problem(name, root, cls)) from exc
    except Exception as exc:  # unreadable batch files (truncated pickle, wrong format)
        raise DataError(f"{name}: cannot read {os.path.join(root, subdir)!r}: {type(exc).__name__}: {exc}") from exc
    return DataSpec(name, train, test, len(train.classes), 3, image_size, augmented=augment, classes=tuple(train.classes))


def _cifar_problem(name: str, root: str, cls: Any) -> str:
    """Which file of a CIFAR folder torchvision refused, and what to put where. torchvision's own message
    ("Dataset not found or corrupted. You can use download=True to download it") names no file and advises
    an option that ``effdense train`` does not have: nothing is downloaded."""
    from torchvision.datasets.utils import check_integrity

    subdir = cls.base_folder
    folder = os.path.join(root, subdir)
    fix = f"put the extracted python-version archive from https://www.cs.toronto.edu/~kriz/cifar.html in {root!r}"
    if not os.path.isdir(folder):
        if os.path.basename(os.path.normpath(root)) == subdir:
            parent = os.path.dirname(os.path.normpath(root)) or "."
            return f"{name}: {root!r} is the {subdir!r} folder itself; give the folder that holds it: --data-dir {parent}"
        return f"{name}: no {subdir!r} folder in {root!r}; {fix}"
    for filename, md5 in [*cls.train_list, *cls.test_list, (cls.meta["filename"], cls.meta["md5"])]:
        path = os.path.join(folder, filename)
        if not check_integrity(path, md5):
            problem = "is missing" if not os.path.exists(path) else "is corrupted (its MD5 checksum is wrong)"
            return f"{name}: {path!r} {problem}; {fix} again"
    return f"{name}: torchvision cannot load {folder!r}; {fix}"  # pragma: no cover - every file checks out


def load_imagefolder(root: str | os.PathLike, image_size: int = 224, augment: bool = True) -> DataSpec:
    """An ImageFolder tree: ``root/train/<class>/*.jpg`` and ``root/val/<class>/*`` (``test/`` also works;
    with both, ``val/`` is evaluated on and the spec's ``notes`` say so).

    Training images: random resized crop and horizontal flip (when ``augment``); test images: resize to
    ``image_size * 8/7`` and centre crop, as for ImageNet. Normalised with ImageNet statistics. Files are
    images by their extension, as for torchvision's ImageFolder, hidden files (``.name``) left out; a file
    that cannot be decoded stops the run with :class:`UnreadableImage` naming it.
    """
    _torchvision()  # (a DataError naming the install when torchvision is missing)
    from torchvision import transforms as T

    root = _existing_dir(root, "imagefolder")
    splits, notes = {}, []
    for split, candidates in (("train", ("train",)), ("test", ("val", "test"))):
        found = [os.path.join(root, c) for c in candidates if os.path.isdir(os.path.join(root, c))]
        if not found:
            raise DataError(
                f"imagefolder: {root!r} has no {' or '.join(repr(c + '/') for c in candidates)} folder; "
                "expected root/train/<class>/<image> and root/val/<class>/<image>"
            )
        splits[split] = found[0]
        if len(found) > 1:  # (val/ and test/ both there: the first is evaluated on, the other read by no one)
            others = ", ".join(repr(os.path.basename(f) + "/") for f in found[1:])
            notes.append(f"imagefolder: evaluating on {os.path.basename(found[0])}/; {others} is there too and is not used")
    mean, std = _IMAGENET_STATS
    test_tf = T.Compose([T.Resize(round(image_size * 8 / 7), antialias=True), T.CenterCrop(image_size)])
    if augment:
        train_tf = T.Compose([T.RandomResizedCrop(image_size, antialias=True), T.RandomHorizontalFlip()])
    else:  # the test images' framing (before, a crop of the whole short side: trained at another scale than tested)
        train_tf = test_tf
    to_tensor = [T.ToTensor(), T.Normalize(mean, std)]
    made = {}
    for split, tf in (("train", train_tf), ("test", test_tf)):
        try:
            made[split] = _visible_image_folder()(
                splits[split], transform=T.Compose([tf, *to_tensor]), loader=_read_image, is_valid_file=_visible_image
            )
        except (FileNotFoundError, RuntimeError) as exc:  # no class folders, or no images in one of them
            message = " ".join(str(exc).split())  # (torchvision's ends in a space, or spans lines)
            if "Found no valid file for the classes" in message:
                # (a class folder removed from one split alone leaves the two splits' classes different: refused below)
                names = " and ".join(os.path.basename(splits[s]) + "/" for s in ("train", "test"))
                message = message.rstrip(". ") + f"; add images to those folders, or remove those classes from both {names}"
            raise DataError(f"imagefolder: {splits[split]!r}: {message}") from exc
    train, test = made["train"], made["test"]
    if train.classes != test.classes:
        only_train = sorted(set(train.classes) - set(test.classes))
        only_test = sorted(set(test.classes) - set(train.classes))
        differ = "; ".join(
            f"only in {where}: {', '.join(ascii(c) for c in names)}"  # (ascii: names that differ in Unicode normal form)
            for where, names in ((os.path.basename(splits["train"]), only_train), (os.path.basename(splits["test"]), only_test))
            if names
        )  # fmt: skip
        raise DataError(
            f"imagefolder: train and test class folders differ ({differ}); both splits need the same <class> sub-folders"
        )
    return DataSpec(
        "imagefolder", train, test, len(train.classes), 3, image_size, augmented=augment, classes=tuple(train.classes),
        notes=tuple(notes),
    )


def _existing_dir(root: str | os.PathLike | None, name: str) -> str:
    if root is None or str(root) == "":
        raise DataError(f"--data {name} needs --data-dir PATH (a local folder; nothing is downloaded)")
    path = os.fspath(root)
    if not os.path.exists(path):
        raise DataError(f"{name}: data folder {path!r} does not exist")
    if not os.path.isdir(path):
        raise DataError(f"{name}: data path {path!r} is not a folder")
    return path


def build_datasets(
    name: str,
    root: str | os.PathLike | None = None,
    image_size: int | None = None,
    augment: bool = True,
) -> DataSpec:
    """Load dataset ``name`` (one of :data:`DATASETS`).

    Args:
        name: ``digits``, ``cifar10``, ``cifar100`` or ``imagefolder``.
        root: local data folder (ignored for digits).
        image_size: side of the square images; ``None`` takes the dataset's default.
        augment: random crops and flips on the training split (CIFAR, ImageFolder).
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; expected one of {DATASETS}")
    size = DEFAULT_IMAGE_SIZE[name] if image_size is None else image_size
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise DataError(f"image size must be a positive integer, got {size!r}")
    if name == "digits":
        return load_digits(size)
    if name in _CIFAR_STATS:
        return load_cifar(name, root, size, augment)
    return load_imagefolder(root, size, augment)


class SeededSamples(Dataset):
    """A training set whose random augmentation depends on ``(seed, epoch, index)`` alone: each item is read
    with torch's global RNG seeded from them (inside ``fork_rng``, which puts the caller's stream back). So an
    image's crop and flip are the same whichever DataLoader worker (or the main process) loads it, and a run
    resumed mid-epoch draws what an uninterrupted run draws: with ``--workers`` > 0 each worker's stream
    restarted at the resumed step and the remaining batches got other crops (a probe measured a loss 0.18
    off at the first resumed step). Set ``epoch`` before each epoch's loader is iterated (its workers take a
    copy then)."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = int(seed)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only (transforms draw from it): torch.manual_seed would also reseed every CUDA
            # generator, which fork_rng(devices=[]) does not put back (dropout on the GPU, with --workers 0)
            torch.default_generator.manual_seed(_mix(self.seed, self.epoch, int(i)))
            return self.dataset[i]


def _mix(*values: int) -> int:
    """A 63-bit seed from ``values`` (splitmix64 over each): all of its bits depend on all of them. The CPU
    generator keeps only a seed's low 32 bits, so a seed packed as bit fields (seed << 52 | index) would give
    every run seed the same draws."""
    h = 0
    for v in values:
        h = (h ^ (v & 0xFFFF_FFFF_FFFF_FFFF)) + 0x9E37_79B9_7F4A_7C15 & 0xFFFF_FFFF_FFFF_FFFF
        h = (h ^ (h >> 30)) * 0xBF58_476D_1CE4_E5B9 & 0xFFFF_FFFF_FFFF_FFFF
        h = (h ^ (h >> 27)) * 0x94D0_49BB_1331_11EB & 0xFFFF_FFFF_FFFF_FFFF
        h ^= h >> 31
    return h >> 1


class Subset(Dataset):
    """``n`` items of a dataset (quick runs: ``--subset``), the same ones in every run: a choice by a fixed seed,
    in the dataset's order. The first ``n`` would be the first classes of a dataset stored by class, as an
    ImageFolder is (``--subset 12`` of three 12-image classes was all one class)."""

    def __init__(self, dataset: Dataset, n: int) -> None:
        self.dataset = dataset
        total = len(dataset)  # type: ignore[arg-type]
        self.n = min(n, total)
        if self.n < total:
            g = torch.Generator().manual_seed(0)
            self.indices: list[int] | None = sorted(torch.randperm(total, generator=g)[: self.n].tolist())
        else:
            self.indices = None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.dataset[self.indices[i] if self.indices is not None else i]


class ShardSampler(torch.utils.data.Sampler[int]):
    """The ``epoch``'s permutation of ``range(n)`` (seeded by ``seed + epoch``, as ``DistributedSampler``),
    rank ``rank``'s share (``indices[rank::world_size]``, padded to equal length), from sample ``start``.

    Identical to ``DistributedSampler`` for ``start=0``; ``start`` lets a run interrupted mid-epoch resume
    on the very next batch.
    """

    def __init__(
        self, n: int, world_size: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0, pad: bool = True
    ) -> None:
        self.n, self.world_size, self.rank, self.shuffle, self.seed, self.pad = n, world_size, rank, shuffle, seed, pad
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def indices(self) -> Sequence[int]:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        if self.pad and self.n % self.world_size:
            extra = self.world_size - self.n % self.world_size
            order += (order * (extra // max(self.n, 1) + 1))[:extra]
        return order[self.rank :: self.world_size]

    def __iter__(self):
        return iter(self.indices()[self.start :])

    def __len__(self) -> int:
        per_rank = -(-self.n // self.world_size) if self.pad else len(range(self.rank, self.n, self.world_size))
        return max(per_rank - self.start, 0)
