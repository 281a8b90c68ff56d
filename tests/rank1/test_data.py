"""Dataset loaders on small files written here in each real on-disk format."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from rank1.data import DATASETS, DatasetError, ImageData, TensorLoader, check_dataset, load_dataset


def test_digits_ships_with_the_package_and_splits_are_fixed():
    a = load_dataset("digits")
    assert a.image_size == (16, 16) and a.in_channels == 1 and a.num_classes == 10
    assert a.train.x.dtype == torch.uint8
    assert len(a.train) + len(a.val) + len(a.test) == 1797
    assert abs(len(a.val) / (len(a.train) + len(a.val)) - 0.2) < 0.01
    b = load_dataset("digits", image_size=24)
    assert b.image_size == (24, 24)
    assert torch.equal(a.val.y, b.val.y)  # the split does not depend on the size
    c = load_dataset("digits", split_seed=1)
    assert not torch.equal(a.val.y, c.val.y)
    # Normalisation statistics are the training split's.
    xf = a.train.x.float() / 255
    assert a.mean[0] == pytest.approx(float(xf.mean()), rel=1e-5)
    assert a.std[0] == pytest.approx(float(xf.std()), rel=1e-5)


def _write_idx(root: Path, folder: str, n_train=12, n_test=5):
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())
    return images, labels


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_formats_through_torchvision(tmp_path, name, folder):
    test_images, test_labels = _write_idx(tmp_path, folder)
    d = load_dataset(name, root=tmp_path, val_fraction=0.25)
    assert (len(d.train), len(d.val), len(d.test)) == (9, 3, 5)
    assert d.image_size == (28, 28) and d.in_channels == 1
    assert torch.equal(d.test.x[:, 0], torch.from_numpy(test_images))
    assert torch.equal(d.test.y, torch.from_numpy(test_labels).long())


def _write_cifar(root: Path, name: str):
    rng = np.random.default_rng(1)
    if name == "cifar10":
        folder, files, key = root / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], "labels"
    else:
        folder, files, key = root / "cifar-100-python", ["train", "test"], "fine_labels"
    folder.mkdir(parents=True)
    written = {}
    for f in files:
        n = 4
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        with open(folder / f, "wb") as fh:
            pickle.dump({"data": data, key: labels, "batch_label": f}, fh, protocol=2)
        written[f] = (data, labels)
    return written


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_python_pickles(tmp_path, name):
    written = _write_cifar(tmp_path, name)
    d = load_dataset(name, root=tmp_path, val_fraction=0.25)
    test_file = "test_batch" if name == "cifar10" else "test"
    data, labels = written[test_file]
    assert d.in_channels == 3 and d.image_size == (32, 32) and d.flip
    assert torch.equal(d.test.x, torch.from_numpy(data.reshape(-1, 3, 32, 32)))
    assert d.test.y.tolist() == labels
    assert len(d.train) + len(d.val) == (20 if name == "cifar10" else 4)


def test_cifar_refuses_pickles_that_would_run_code(tmp_path):
    _write_cifar(tmp_path, "cifar10")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as fh:
        pickle.dump({"data": Evil(), "labels": []}, fh)
    with pytest.raises(DatasetError, match=r"cifar10: could not read the dataset .*refusing to load builtins.print"):
        load_dataset("cifar10", root=tmp_path)


def test_svhn_mat_files(tmp_path):
    import scipy.io

    rng = np.random.default_rng(2)
    for split, n in (("train", 10), ("test", 4)):
        x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
        y = np.array([[10], [1], [2], [3], [4], [5], [6], [7], [8], [9]][:n], dtype=np.uint8)
        scipy.io.savemat(tmp_path / f"{split}_32x32.mat", {"X": x, "y": y})
        if split == "test":
            test_x = x
    d = load_dataset("svhn", root=tmp_path, val_fraction=0.2)
    assert d.test.y.tolist() == [0, 1, 2, 3]  # the digit 0 is stored as 10
    assert torch.equal(d.test.x, torch.from_numpy(np.transpose(test_x, (3, 2, 0, 1)).copy()))
    assert not d.flip


def write_imagefolder(root: Path, n_train: int = 6, n_test: int = 2, classes=("cat", "dog"), size=(20, 24),
                      seed: int = 3, fmt: str = "png") -> None:
    """ROOT/train/CLASS/*.png and ROOT/test/CLASS/*.png, random pixels."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for cls in classes:
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / split / cls / f"{i}.{fmt}")


def test_imagefolder(tmp_path):
    write_imagefolder(tmp_path)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    d = load_dataset("imagefolder", root=tmp_path, image_size=16, val_fraction=0.25)
    assert d.image_size == (16, 16) and d.in_channels == 3 and d.num_classes == 2
    assert (len(d.train), len(d.val), len(d.test)) == (9, 3, 4)
    assert sorted(d.test.y.tolist()) == [0, 0, 1, 1]


@pytest.mark.parametrize("name", [n for n in sorted(DATASETS) if DATASETS[n].needs_root])
def test_missing_root_is_a_clear_error(tmp_path, name):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match=rf"{name}: .*{missing}.*does not exist.*"):
        check_dataset(name, missing)
    with pytest.raises(DatasetError, match=rf"{name}: needs a root folder"):
        load_dataset(name, root=None)


def test_corrupt_file_is_a_clear_error(tmp_path):
    _write_idx(tmp_path, "MNIST")
    (tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match=r"mnist: could not read the dataset under .*--download"):
        load_dataset("mnist", root=tmp_path)


def test_unknown_dataset():
    with pytest.raises(DatasetError, match=r"dataset must be one of \[.*'digits'.*\], got 'imagenet'"):
        load_dataset("imagenet")


def test_loader_order_depends_only_on_the_generator_seed():
    d = load_dataset("digits")

    def batches(seed, augment):
        g = torch.Generator().manual_seed(seed)
        loader = TensorLoader(d.train, 50, d.mean, d.std, shuffle=True, generator=g, augment=augment)
        return [(x.clone(), y.clone()) for x, y in loader]

    for augment in (False, True):
        a, b, c = batches(0, augment), batches(0, augment), batches(1, augment)
        assert len(a) == len(TensorLoader(d.train, 50, d.mean, d.std)) == -(-len(d.train) // 50)
        assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
        assert not torch.equal(a[0][1], c[0][1])
    x, _ = batches(0, False)[0]
    assert x.shape == (50, 1, 16, 16) and abs(float(x.mean())) < 0.3  # normalised


def test_augmentation_translates_and_flips():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.uint8).view(2, 1, 6, 6)
    data = ImageData(x, torch.tensor([0, 1]))
    g = torch.Generator().manual_seed(0)
    loader = TensorLoader(data, 2, (0.0,), (1 / 255,), generator=g, augment=True, flip=True, pad=1)
    (out, _), = list(loader)
    assert out.shape == x.shape
    for i in range(2):  # every output is the input shifted by at most one pixel (zero-filled), maybe flipped
        candidates = []
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                shifted = torch.zeros(6, 6)
                src = x[i, 0].float()
                ys, xs = slice(max(0, dy), 6 + min(0, dy)), slice(max(0, dx), 6 + min(0, dx))
                yd, xd = slice(max(0, -dy), 6 + min(0, -dy)), slice(max(0, -dx), 6 + min(0, -dx))
                shifted[yd, xd] = src[ys, xs]
                candidates += [shifted, shifted.flip(-1)]
        assert any(torch.equal(out[i, 0], c) for c in candidates)


# ----------------------------------------------------------------------------- the decoded cache


def _decodes(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def _same(a, b) -> bool:
    return all(torch.equal(getattr(getattr(a, s), k), getattr(getattr(b, s), k))
               for s in ("train", "val", "test") for k in ("x", "y")) and (a.mean, a.std) == (b.mean, b.std)


def test_a_second_load_comes_from_the_cache_identical(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK1_DATA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("RANK1_DECODE_LOG", str(tmp_path / "decodes.log"))
    root = tmp_path / "data"
    write_imagefolder(root)
    first = load_dataset("imagefolder", root=root, image_size=16, val_fraction=0.25)
    assert _decodes(tmp_path / "decodes.log") == 2  # the train and the test folder
    second = load_dataset("imagefolder", root=root, image_size=16, val_fraction=0.25)
    assert _decodes(tmp_path / "decodes.log") == 2 and _same(first, second)  # nothing decoded again
    assert len(list((tmp_path / "cache").glob("imagefolder-*.pt"))) == 1
    # another image size or split is another cache file
    load_dataset("imagefolder", root=root, image_size=12, val_fraction=0.25)
    assert _decodes(tmp_path / "decodes.log") == 4 and len(list((tmp_path / "cache").glob("*.pt"))) == 2
    assert _same(load_dataset("imagefolder", root=root, image_size=16, val_fraction=0.25, cache=False), first)
    assert _decodes(tmp_path / "decodes.log") == 6  # cache=False: always decodes


def test_changing_a_file_invalidates_the_cache(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setenv("RANK1_DATA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("RANK1_DECODE_LOG", str(tmp_path / "decodes.log"))
    root = tmp_path / "data"
    write_imagefolder(root)
    before = load_dataset("imagefolder", root=root, image_size=16, val_fraction=0.25)
    Image.fromarray(np.zeros((20, 24, 3), dtype=np.uint8)).save(root / "test" / "dog" / "1.png")  # a changed image
    after = load_dataset("imagefolder", root=root, image_size=16, val_fraction=0.25)
    assert _decodes(tmp_path / "decodes.log") == 4 and not _same(before, after)
    assert int(after.test.x[-1].sum()) == 0
    (root / "train" / "cat" / "9.png").write_bytes((root / "train" / "cat" / "0.png").read_bytes())  # an added one
    assert len(load_dataset("imagefolder", root=root, image_size=16, val_fraction=0.25).train) + \
        len(load_dataset("imagefolder", root=root, image_size=16, val_fraction=0.25).val) == 13
    assert _decodes(tmp_path / "decodes.log") == 6  # decoded once more, then cached again


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "garbage meta"])
def test_a_corrupt_cache_is_rebuilt_never_trusted(tmp_path, monkeypatch, damage):
    monkeypatch.setenv("RANK1_DATA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("RANK1_DECODE_LOG", str(tmp_path / "decodes.log"))
    root = tmp_path / "data"
    write_imagefolder(root)
    ref = load_dataset("imagefolder", root=root, image_size=16, val_fraction=0.25)
    (pt,) = (tmp_path / "cache").glob("*.pt")
    raw = bytearray(pt.read_bytes())
    if damage == "truncated":
        pt.write_bytes(bytes(raw[: len(raw) // 2]))
    elif damage == "flipped byte":
        raw[-200] ^= 0xFF  # inside the tensor data: torch.load alone would not notice
        pt.write_bytes(bytes(raw))
    else:
        pt.with_suffix(".json").write_text("{not json")
    with pytest.warns(UserWarning, match="the dataset cache .* is unusable"):
        again = load_dataset("imagefolder", root=root, image_size=16, val_fraction=0.25)
    assert _same(again, ref) and _decodes(tmp_path / "decodes.log") == 4  # decoded again...
    assert _same(load_dataset("imagefolder", root=root, image_size=16, val_fraction=0.25), ref)
    assert _decodes(tmp_path / "decodes.log") == 4  # ...and the rebuilt cache is used from then on


def test_stratified_subsets_keep_the_class_shares_and_are_seeded():
    from rank1.data import stratified_subset, with_subsets

    y = torch.tensor([0] * 60 + [1] * 30 + [2] * 10)
    data = ImageData(torch.arange(100, dtype=torch.uint8).view(100, 1, 1, 1).expand(100, 1, 2, 2).clone(), y)
    sub = stratified_subset(data, 20, seed=1)
    assert torch.bincount(sub.y).tolist() == [12, 6, 2]
    assert torch.equal(stratified_subset(data, 20, seed=1).x, sub.x) and not torch.equal(
        stratified_subset(data, 20, seed=2).x, sub.x)
    assert stratified_subset(data, 500, seed=1) is data
    d = load_dataset("digits")
    s = with_subsets(d, 300, 100, seed=0)
    assert (len(s.train), len(s.val), len(s.test)) == (300, 100, len(d.test)) and s.mean != d.mean
