"""Datasets as a registry, held in memory as uint8 tensors, with seeded splits.

``digits`` (the default) is scikit-learn's 8x8 handwritten digits, upsampled: it
ships inside an installed package, so nothing is ever downloaded. ``mnist``,
``fashion_mnist``, ``cifar10``, ``cifar100``, ``svhn`` and ``imagefolder`` read the
files torchvision downloads (or any image folder) from a local ``root``; they are
downloaded only when asked (``download=True``, through torchvision). A missing or
corrupt dataset is a :class:`DatasetError` naming the path looked at and how to get
the files.

Splits are fixed by ``split_seed`` (not the training seed), so every trial and every
seed of a study is scored on the same validation images. Normalisation statistics
come from the training split only.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "DATASETS",
    "DataBundle",
    "DatasetError",
    "DatasetSpec",
    "ImageData",
    "TensorLoader",
    "check_dataset",
    "load_dataset",
]


class DatasetError(ValueError):
    """A dataset cannot be found or read: the message says where we looked and what to do."""


@dataclass
class ImageData:
    """Images ``x`` (``N x C x H x W``, uint8) and integer labels ``y`` (``N``)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, idx: torch.Tensor) -> ImageData:
        return ImageData(self.x[idx], self.y[idx])


@dataclass
class DataBundle:
    """The three splits and what a model needs to know about them."""

    name: str
    train: ImageData
    val: ImageData
    test: ImageData
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    flip: bool  # horizontal flips are label-preserving (not for digits)

    @property
    def in_channels(self) -> int:
        return int(self.train.x.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.train.x.shape[2]), int(self.train.x.shape[3])

    def summary(self) -> dict[str, object]:
        return {
            "dataset": self.name, "train": len(self.train), "val": len(self.val), "test": len(self.test),
            "classes": self.num_classes, "channels": self.in_channels, "size": list(self.image_size),
        }


@dataclass(frozen=True)
class DatasetSpec:
    """How to find and read one dataset."""

    load: Callable[[Path | None, bool], tuple[ImageData, ImageData | None, ImageData]]
    files: Callable[[Path], list[Path]]  # what must exist under root (empty: nothing)
    how_to_get: str
    flip: bool
    needs_root: bool = True


DATASETS: dict[str, DatasetSpec] = {}


def _resize(x: torch.Tensor, size: int | None) -> torch.Tensor:
    """Bilinear resize of uint8 images to ``size x size`` (no-op when already there)."""
    if size is None or tuple(x.shape[-2:]) == (size, size):
        return x
    out = []
    for chunk in x.split(4096):  # bounded float memory for large datasets
        out.append(F.interpolate(chunk.float(), size=(size, size), mode="bilinear", align_corners=False,
                                 antialias=size < chunk.shape[-1]).round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out)


def _split(data: ImageData, fraction: float, seed: int) -> tuple[ImageData, ImageData]:
    """``(rest, held_out)`` with a seeded ``fraction`` of ``data`` held out."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(data), generator=g)
    n_out = int(round(fraction * len(data)))
    return data.subset(perm[n_out:].sort().values), data.subset(perm[:n_out].sort().values)


# ----------------------------------------------------------------------------- digits


def _load_digits(root: Path | None, download: bool) -> tuple[ImageData, ImageData | None, ImageData]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images).float().mul(255.0 / 16.0).round().to(torch.uint8)[:, None]  # N x 1 x 8 x 8
    y = torch.from_numpy(d.target).long()
    # A fixed 80/20 train/test split; validation is carved from train like any dataset.
    train, test = _split(ImageData(x, y), 0.2, seed=1797)
    return train, None, test


DATASETS["digits"] = DatasetSpec(
    _load_digits, lambda root: [], "ships with scikit-learn; nothing to download", flip=False, needs_root=False
)


# ----------------------------------------------------------------------------- torchvision formats


def _tv_error(name: str, root: Path, err: Exception, how: str) -> DatasetError:
    return DatasetError(f"{name}: could not read the dataset under {str(root)!r} ({err}). {how}")


def _mnist_like(cls_name: str, folder: str) -> Callable[[Path | None, bool], tuple[ImageData, None, ImageData]]:
    def load(root: Path | None, download: bool) -> tuple[ImageData, None, ImageData]:
        import torchvision

        cls = getattr(torchvision.datasets, cls_name)
        out = []
        for train in (True, False):
            ds = cls(str(root), train=train, download=download)
            out.append(ImageData(ds.data[:, None].clone(), ds.targets.long().clone()))
        return out[0], None, out[1]

    return load


def _mnist_files(folder: str) -> Callable[[Path], list[Path]]:
    names = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    return lambda root: [root / folder / "raw" / n for n in names]


DATASETS["mnist"] = DatasetSpec(
    _mnist_like("MNIST", "MNIST"), _mnist_files("MNIST"),
    "Pass --download to fetch it with torchvision, or put the four unpacked idx files "
    "(train-images-idx3-ubyte, ...) in ROOT/MNIST/raw/.", flip=False,
)
DATASETS["fashion_mnist"] = DatasetSpec(
    _mnist_like("FashionMNIST", "FashionMNIST"), _mnist_files("FashionMNIST"),
    "Pass --download to fetch it with torchvision, or put the four unpacked idx files "
    "in ROOT/FashionMNIST/raw/.", flip=True,
)


class _ArrayUnpickler(pickle.Unpickler):
    """Reads CIFAR's pickled batches but refuses every global except numpy arrays.

    CIFAR ships as Python pickles; a plain ``pickle.load`` of a file from disk can
    run arbitrary code. Only the names needed to rebuild numpy arrays are allowed.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 carry bytes
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset file")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path, label_key: str) -> ImageData:
    with open(path, "rb") as f:
        d = _ArrayUnpickler(f, encoding="latin1").load()
    x = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return ImageData(torch.from_numpy(x.copy()), torch.as_tensor(d[label_key], dtype=torch.long))


_CIFAR = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels", "CIFAR10"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels", "CIFAR100"),
}


def _cifar(name: str) -> Callable[[Path | None, bool], tuple[ImageData, None, ImageData]]:
    folder, train_files, test_files, key, tv_cls = _CIFAR[name]

    def load(root: Path | None, download: bool) -> tuple[ImageData, None, ImageData]:
        if download:
            import torchvision

            getattr(torchvision.datasets, tv_cls)(str(root), download=True)  # verifies MD5s
        parts = [[_read_cifar_batch(root / folder / f, key) for f in files] for files in (train_files, test_files)]
        train, test = (ImageData(torch.cat([p.x for p in ps]), torch.cat([p.y for p in ps])) for ps in parts)
        return train, None, test

    return load


for _name, (_folder, _train, _test, _, _) in _CIFAR.items():
    DATASETS[_name] = DatasetSpec(
        _cifar(_name), lambda root, f=_folder, n=_train + _test: [root / f / x for x in n],
        f"Pass --download to fetch it with torchvision, or unpack the python version "
        f"({_folder}.tar.gz from the CIFAR site) into ROOT so that ROOT/{_folder}/ exists.", flip=True,
    )


def _load_svhn(root: Path | None, download: bool) -> tuple[ImageData, None, ImageData]:
    import scipy.io

    if download:
        import torchvision

        for split in ("train", "test"):
            torchvision.datasets.SVHN(str(root), split=split, download=True)
    out = []
    for split in ("train", "test"):
        m = scipy.io.loadmat(str(root / f"{split}_32x32.mat"))
        x = torch.from_numpy(np.ascontiguousarray(np.transpose(m["X"], (3, 2, 0, 1))))  # H W C N -> N C H W
        y = torch.from_numpy(m["y"].astype(np.int64).reshape(-1))
        out.append(ImageData(x, torch.where(y == 10, 0, y)))  # SVHN labels the digit 0 as 10
    return out[0], None, out[1]


DATASETS["svhn"] = DatasetSpec(
    _load_svhn, lambda root: [root / "train_32x32.mat", root / "test_32x32.mat"],
    "Pass --download to fetch it with torchvision, or put train_32x32.mat and test_32x32.mat "
    "(cropped digits, format 2) in ROOT.", flip=False,
)


def _read_folder(path: Path, classes: list[str], size: int) -> ImageData:
    from PIL import Image

    xs, ys = [], []
    for label, cls in enumerate(classes):
        d = path / cls
        if not d.is_dir():
            continue
        for f in sorted(d.iterdir()):
            if f.suffix.lower() not in {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}:
                continue
            with Image.open(f) as im:
                im = im.convert("RGB").resize((size, size), Image.BILINEAR)
                xs.append(torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1))
            ys.append(label)
    if not xs:
        raise DatasetError(f"imagefolder: no images under {str(path)!r}")
    return ImageData(torch.stack(xs), torch.tensor(ys, dtype=torch.long))


def _load_imagefolder(root: Path | None, download: bool, size: int = 32) -> tuple[ImageData, ImageData | None, ImageData]:
    import torchvision

    base = root / "train" if (root / "train").is_dir() else root
    classes = torchvision.datasets.folder.find_classes(str(base))[0]  # the torchvision convention
    train = _read_folder(base, classes, size)
    val = _read_folder(root / "val", classes, size) if (root / "val").is_dir() else None
    if (root / "test").is_dir():
        test = _read_folder(root / "test", classes, size)
    else:
        train, test = _split(train, 0.2, seed=7)
    return train, val, test


DATASETS["imagefolder"] = DatasetSpec(
    _load_imagefolder, lambda root: [root],
    "Lay the images out as ROOT/train/CLASS/*.png (optionally ROOT/val/ and ROOT/test/ alike), "
    "or ROOT/CLASS/*.png to split automatically.", flip=True,
)


# ----------------------------------------------------------------------------- entry points


def check_dataset(name: str, root: str | Path | None = None, download: bool = False) -> None:
    """Fail fast, before any work: unknown name, missing root, missing files."""
    if name not in DATASETS:
        raise DatasetError(f"dataset must be one of {sorted(DATASETS)}, got {name!r}")
    spec = DATASETS[name]
    if not spec.needs_root:
        return
    if root is None:
        raise DatasetError(f"{name}: needs a root folder with the files (root is not set). {spec.how_to_get}")
    root = Path(root).expanduser()
    if download:
        return
    missing = [p for p in spec.files(root) if not p.exists()]
    if missing:
        raise DatasetError(
            f"{name}: {str(missing[0])!r} does not exist (looked under root {str(root)!r}). {spec.how_to_get}"
        )


def load_dataset(
    name: str = "digits",
    root: str | Path | None = None,
    image_size: int | None = None,
    download: bool = False,
    val_fraction: float = 0.2,
    split_seed: int = 0,
) -> DataBundle:
    """Load ``name`` into memory with train/val/test splits.

    ``image_size`` resizes every image to a square (digits default to 16, the
    others keep their native size, an image folder defaults to 32). Validation is
    the dataset's own when it has one, otherwise ``val_fraction`` of train, drawn
    with ``split_seed``.
    """
    check_dataset(name, root, download)
    if not 0.0 < val_fraction < 1.0:
        raise DatasetError(f"val_fraction must be in (0, 1), got {val_fraction}")
    spec = DATASETS[name]
    path = Path(root).expanduser() if root is not None else None
    if name == "digits" and image_size is None:
        image_size = 16
    try:
        if name == "imagefolder":
            train, val, test = _load_imagefolder(path, download, image_size or 32)
        else:
            train, val, test = spec.load(path, download)
    except DatasetError:
        raise
    except (OSError, RuntimeError, ValueError, KeyError, EOFError, AssertionError, pickle.UnpicklingError) as e:
        raise _tv_error(name, path or Path("."), e, spec.how_to_get) from e
    if val is None:
        train, val = _split(train, val_fraction, split_seed)
    train, val, test = (ImageData(_resize(d.x, image_size), d.y) for d in (train, val, test))
    xf = train.x.float() / 255.0
    mean = xf.mean(dim=(0, 2, 3))
    std = xf.std(dim=(0, 2, 3)).clamp_min(1e-3)
    num_classes = int(max(train.y.max(), val.y.max(), test.y.max())) + 1
    return DataBundle(name, train, val, test, num_classes, tuple(mean.tolist()), tuple(std.tolist()), spec.flip)


class TensorLoader:
    """Batches from an in-memory :class:`ImageData`, normalised on the device.

    Shuffling and augmentation draw from ``generator`` only, so two loaders with
    equally seeded generators yield the identical sequence of batches — the two
    arms of a trial see the same data in the same order. Augmentation: random
    translation by up to ``pad`` pixels (zero fill) and, when ``flip``, horizontal flips.
    """

    def __init__(
        self,
        data: ImageData,
        batch_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        device: torch.device | str = "cpu",
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        augment: bool = False,
        flip: bool = False,
        pad: int | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.x = data.x.to(self.device)
        self.y = data.y.to(self.device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.generator = generator
        self.augment = augment
        self.flip = flip
        self.pad = pad if pad is not None else max(1, self.x.shape[-1] // 8)
        shape = (1, -1, 1, 1)
        self.mean = torch.tensor(mean, device=self.device).view(shape) * 255.0
        self.std = torch.tensor(std, device=self.device).view(shape) * 255.0

    def __len__(self) -> int:
        return math.ceil(len(self.y) / self.batch_size)

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        p = self.pad
        g = self.generator
        xp = F.pad(x, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (n,), generator=g).to(x.device)
        dx = torch.randint(0, 2 * p + 1, (n,), generator=g).to(x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # N x 1 x H x 1
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # N x 1 x 1 x W
        idx_n = torch.arange(n, device=x.device)[:, None, None, None]
        idx_c = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        x = xp[idx_n, idx_c, rows, cols]
        if self.flip:
            flip = (torch.rand(n, generator=g) < 0.5).to(x.device)
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.y)
        order = torch.randperm(n, generator=self.generator).to(self.device) if self.shuffle else None
        for start in range(0, n, self.batch_size):
            idx = order[start:start + self.batch_size] if order is not None else slice(start, start + self.batch_size)
            x = self.x[idx].float()
            if self.augment:
                x = self._augment(x)
            yield (x - self.mean) / self.std, self.y[idx]
