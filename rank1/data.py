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

import dataclasses
import hashlib
import json
import math
import os
import pickle
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rank1.config import DatasetError

__all__ = [
    "DATASETS",
    "DataBundle",
    "DatasetError",
    "DatasetSpec",
    "ImageData",
    "TensorLoader",
    "cache_file",
    "check_dataset",
    "data_cache_dir",
    "fingerprint",
    "from_shared",
    "load_dataset",
    "stratified_subset",
    "to_shared",
    "with_subsets",
]


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

    _note_decode(path)
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


# ----------------------------------------------------------------------------- the decoded cache

CACHE_VERSION = 1  # bump when what a cache file holds or how it is decoded changes


def data_cache_dir() -> Path:
    """``$RANK1_DATA_CACHE``, else ``~/.cache/rank1/data``."""
    env = os.environ.get("RANK1_DATA_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "rank1" / "data"


def _note_decode(path: Path) -> None:
    """Decoding image files is what the cache saves: ``$RANK1_DECODE_LOG`` (tests) gets a line per folder."""
    log = os.environ.get("RANK1_DECODE_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {path}\n")


def fingerprint(name: str, root: Path) -> str:
    """What the dataset's files are now: every file under the paths it reads (name, size,
    modification time). A changed, added or removed file changes it."""
    h = hashlib.sha256()
    for top in DATASETS[name].files(root):
        paths = sorted(p for p in top.rglob("*") if p.is_file()) if top.is_dir() else [top]
        for p in paths:
            st = p.stat()
            h.update(f"{p.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def cache_file(name: str, root: Path, image_size: int | None, val_fraction: float, split_seed: int) -> Path:
    """The cache file of one (dataset, root, image size, split): versioned, one per combination."""
    key = json.dumps([CACHE_VERSION, name, str(root.resolve()), image_size, val_fraction, split_seed])
    return data_cache_dir() / f"{name}-{hashlib.sha1(key.encode()).hexdigest()[:16]}.pt"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_cache(path: Path, fp: str) -> DataBundle | None:
    """The cached bundle, or None when there is none, its files changed, or it does not check out
    (a wrong checksum, a truncated file, unexpected contents): a cache is never trusted."""
    meta_path = path.with_suffix(".json")
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("version") != CACHE_VERSION or meta.get("fingerprint") != fp:
            return None
        if _sha256(path) != meta["sha256"]:
            raise ValueError("checksum mismatch")
        t = torch.load(path, map_location="cpu", weights_only=True)
        splits = {}
        for split in ("train", "val", "test"):
            x, y = t[f"{split}_x"], t[f"{split}_y"]
            if x.dtype != torch.uint8 or x.dim() != 4 or y.dim() != 1 or len(x) != len(y):
                raise ValueError(f"unexpected {split} tensors")
            splits[split] = ImageData(x, y)
        return DataBundle(meta["name"], splits["train"], splits["val"], splits["test"], int(meta["num_classes"]),
                          tuple(meta["mean"]), tuple(meta["std"]), bool(meta["flip"]))
    except FileNotFoundError:
        return None
    except Exception as e:  # corrupt in any way: decode again and overwrite it
        warnings.warn(f"the dataset cache {path} is unusable ({type(e).__name__}: {e}); decoding the files again",
                      stacklevel=3)
        return None


def _write_cache(path: Path, fp: str, bundle: DataBundle) -> None:
    """Write atomically (a temporary file, then a rename); a read-only cache dir only costs a decode."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({f"{split}_{k}": getattr(getattr(bundle, split), k)
                    for split in ("train", "val", "test") for k in ("x", "y")}, tmp)
        meta = {"version": CACHE_VERSION, "fingerprint": fp, "sha256": _sha256(tmp), "name": bundle.name,
                "num_classes": bundle.num_classes, "mean": list(bundle.mean), "std": list(bundle.std),
                "flip": bundle.flip}
        meta_tmp = path.with_suffix(f".json.tmp{os.getpid()}")
        meta_tmp.write_text(json.dumps(meta))
        tmp.replace(path)
        meta_tmp.replace(path.with_suffix(".json"))
    except OSError:
        pass


# ----------------------------------------------------------------------------- shared between processes


def to_shared(bundle: DataBundle) -> dict[str, object]:
    """The bundle as numpy arrays and plain data: what Ray's object store holds once per node,
    and each trial maps without a copy (:func:`from_shared`)."""
    return {"name": bundle.name, "num_classes": bundle.num_classes, "mean": bundle.mean, "std": bundle.std,
            "flip": bundle.flip, **{f"{split}_{k}": getattr(getattr(bundle, split), k).numpy()
                                    for split in ("train", "val", "test") for k in ("x", "y")}}


def from_shared(obj: dict[str, object]) -> DataBundle:
    """A bundle over the (read-only, shared) arrays of :func:`to_shared`: nothing is copied;
    batches are copied out of it as they are drawn."""
    with warnings.catch_warnings():  # the store's arrays are read-only: nothing here writes to them
        warnings.simplefilter("ignore", UserWarning)
        splits = {s: ImageData(torch.from_numpy(obj[f"{s}_x"]), torch.from_numpy(obj[f"{s}_y"]))
                  for s in ("train", "val", "test")}
    return DataBundle(obj["name"], splits["train"], splits["val"], splits["test"], obj["num_classes"],
                      tuple(obj["mean"]), tuple(obj["std"]), obj["flip"])


def stratified_subset(data: ImageData, n: int, seed: int) -> ImageData:
    """``n`` images with the classes in the proportions of ``data`` (largest remainders), drawn
    with ``seed``; all of ``data`` when it has no more than ``n``."""
    if n >= len(data):
        return data
    g = torch.Generator().manual_seed(seed)
    classes, counts = torch.unique(data.y, return_counts=True)
    share = counts.double() * n / len(data)
    take = share.floor().long()
    order = torch.argsort(share - take, descending=True)
    take[order[: n - int(take.sum())]] += 1
    picked = []
    for c, k in zip(classes.tolist(), take.tolist()):
        idx = (data.y == c).nonzero().flatten()
        picked.append(idx[torch.randperm(len(idx), generator=g)[:k]])
    return data.subset(torch.cat(picked).sort().values)


def with_subsets(bundle: DataBundle, train: int | None, val: int | None, seed: int) -> DataBundle:
    """Stratified subsets of the training and validation splits (the test split stays whole);
    normalisation from the training images actually used."""
    if train is None and val is None:
        return bundle
    tr = stratified_subset(bundle.train, train, seed) if train else bundle.train
    va = stratified_subset(bundle.val, val, seed + 1) if val else bundle.val
    mean, std = _stats(tr)
    return dataclasses.replace(bundle, train=tr, val=va, mean=mean, std=std)


def _stats(train: ImageData) -> tuple[tuple[float, ...], tuple[float, ...]]:
    xf = train.x.float() / 255.0
    return tuple(xf.mean(dim=(0, 2, 3)).tolist()), tuple(xf.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist())


def load_dataset(
    name: str = "digits",
    root: str | Path | None = None,
    image_size: int | None = None,
    download: bool = False,
    val_fraction: float = 0.2,
    split_seed: int = 0,
    cache: bool = True,
) -> DataBundle:
    """Load ``name`` into memory with train/val/test splits.

    ``image_size`` resizes every image to a square (digits default to 16, the
    others keep their native size, an image folder defaults to 32). Validation is
    the dataset's own when it has one, otherwise ``val_fraction`` of train, drawn
    with ``split_seed``.

    A dataset read from files is decoded once: the decoded splits go to a versioned
    cache file (:func:`cache_file`, under :func:`data_cache_dir`), checked on every
    later load against the files' :func:`fingerprint` and its own checksum, and
    decoded again whenever either does not match (``cache=False``: always decode).
    """
    check_dataset(name, root, download)
    if not 0.0 < val_fraction < 1.0:
        raise DatasetError(f"val_fraction must be in (0, 1), got {val_fraction}")
    spec = DATASETS[name]
    path = Path(root).expanduser() if root is not None else None
    if name == "digits" and image_size is None:
        image_size = 16
    cached = cache and path is not None and spec.needs_root
    if cached:
        fp = fingerprint(name, path)
        where = cache_file(name, path, image_size, val_fraction, split_seed)
        bundle = _read_cache(where, fp)
        if bundle is not None:
            return bundle
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
    mean, std = _stats(train)
    num_classes = int(max(train.y.max(), val.y.max(), test.y.max())) + 1
    bundle = DataBundle(name, train, val, test, num_classes, mean, std, spec.flip)
    if cached:
        _write_cache(where, fingerprint(name, path), bundle)
    return bundle


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
