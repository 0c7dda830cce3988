"""Tests of the data layer (datasets/): real on-disk formats, splits, loaders and augmentation.

CIFAR files: the tests write tiny CIFAR-10/100 pickles in the real python-version
layout. torchvision verifies every file's md5 against the official archive
(``train_list``/``test_list``/``meta`` class attributes); the tests monkeypatch those
attributes to the md5 sums of the files they wrote, so torchvision's own integrity
check, pickle reading and meta loading all run unchanged. The pickles use str keys
("data", "labels", ...) because that is what the official Python-2 pickles decode to
under torchvision's ``pickle.load(..., encoding="latin1")``.
"""

import hashlib
import math
import pickle
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.stats import chi2
import torchvision.datasets.cifar
from torchvision.datasets import CIFAR10, CIFAR100

import datasets
from datasets.core import balanced_subset
from datasets.small import array_bundle
from datasets.transforms import plain

PAD, SIZE = 4, 32


def _md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _dump(path, obj) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=2))


def _images(rng, n) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 3 * SIZE * SIZE), dtype=np.uint8)


@pytest.fixture
def cifar10_root(tmp_path, monkeypatch):
    """Five 12-image train batches and a 20-image test batch in ``cifar-10-batches-py/``."""
    rng = np.random.default_rng(0)
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        n = 20 if name == "test_batch" else 12
        _dump(base / name, {"batch_label": name, "data": _images(rng, n),
                            "labels": rng.integers(0, 10, n).tolist(), "filenames": [f"{i}.png" for i in range(n)]})
    _dump(base / "batches.meta", {"label_names": [f"class{i}" for i in range(10)], "num_vis": 3072})
    batches = [f"data_batch_{i}" for i in range(1, 6)]
    monkeypatch.setattr(CIFAR10, "train_list", [[name, _md5(base / name)] for name in batches])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", _md5(base / "test_batch")]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": _md5(base / "batches.meta")})
    return tmp_path


@pytest.fixture
def cifar100_root(tmp_path, monkeypatch):
    """A 200-image train file and a 50-image test file in ``cifar-100-python/``."""
    rng = np.random.default_rng(1)
    base = tmp_path / "cifar-100-python"
    base.mkdir()
    for name, n in (("train", 200), ("test", 50)):
        _dump(base / name, {"data": _images(rng, n), "fine_labels": rng.integers(0, 100, n).tolist(),
                            "coarse_labels": rng.integers(0, 20, n).tolist(), "filenames": [""] * n})
    _dump(base / "meta", {"fine_label_names": [f"f{i}" for i in range(100)],
                          "coarse_label_names": [f"c{i}" for i in range(20)]})
    monkeypatch.setattr(CIFAR100, "train_list", [["train", _md5(base / "train")]])
    monkeypatch.setattr(CIFAR100, "test_list", [["test", _md5(base / "test")]])
    monkeypatch.setattr(CIFAR100, "meta", {**CIFAR100.meta, "md5": _md5(base / "meta")})
    return tmp_path


WNIDS = ["n02", "n00", "n01"]  # deliberately unsorted in wnids.txt


@pytest.fixture
def tiny_root(tmp_path):
    """A 3-class ``tiny-imagenet-200/`` tree: 3 train JPEGs per class, 7 val JPEGs with annotations."""
    base = tmp_path / "tiny-imagenet-200"
    base.mkdir()
    (base / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    for k, wnid in enumerate(WNIDS):
        folder = base / "train" / wnid / "images"
        folder.mkdir(parents=True)
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
        for i in range(3):
            Image.new("RGB", (64, 64), (40 * k, 10 * i, 0)).save(folder / f"{wnid}_{i}.JPEG")
    (base / "val" / "images").mkdir(parents=True)
    val_wnids = ["n01", "n02", "n00", "n02", "n01", "n00", "n01"]
    for i in range(len(val_wnids)):
        Image.new("L" if i == 0 else "RGB", (64, 64), 100).save(base / "val" / "images" / f"val_{i}.JPEG")
    rows = [f"val_{i}.JPEG\t{w}\t0\t0\t63\t63" for i, w in enumerate(val_wnids)]
    (base / "val" / "val_annotations.txt").write_text("\n".join(rows) + "\n")
    return tmp_path, val_wnids


def _raw_normalised(images: torch.Tensor, bundle) -> torch.Tensor:
    mean = torch.tensor(bundle.mean).view(1, -1, 1, 1)
    std = torch.tensor(bundle.std).view(1, -1, 1, 1)
    return (images.float() / 255 - mean) / std


def _collect(loader):
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


# --------------------------------------------------------------------------- datasets


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_real_format(name, request):
    root = request.getfixturevalue(f"{name}_root")
    bundle = datasets.build(name, root=root)
    n_train, n_test, k = (60, 20, 10) if name == "cifar10" else (200, 50, 100)
    assert (bundle.num_classes, bundle.image_size, bundle.crop_padding, bundle.flip) == (k, 32, 4, True)
    x, y = bundle.train_arrays
    assert x.shape == (n_train, 3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert bundle.test_arrays[0].shape == (n_test, 3, 32, 32) and len(bundle.test) == n_test
    raw = bundle.train.data[5]  # HWC numpy as torchvision read it from the pickle
    assert torch.equal(x[5], torch.from_numpy(raw).permute(2, 0, 1))
    img, label = bundle.train[5]
    assert img.dtype == torch.float32 and img.shape == (3, 32, 32) and type(img) is torch.Tensor
    assert isinstance(label, int) and label == y[5]
    tx, _ = bundle.test[3]
    assert torch.allclose(tx, _raw_normalised(bundle.test_arrays[0][3:4], bundle)[0], atol=1e-6)


def test_cifar_stats_match_facts(cifar10_root):
    bundle = datasets.build("cifar10", root=cifar10_root)
    assert bundle.mean == (0.491, 0.482, 0.447) and bundle.std == (0.247, 0.243, 0.262)


def test_tinyimagenet_real_layout(tiny_root):
    root, val_wnids = tiny_root
    bundle = datasets.build("tinyimagenet", root=root)
    assert (bundle.num_classes, bundle.image_size, bundle.train_arrays, bundle.test_arrays) == (3, 64, None, None)
    classes = sorted(WNIDS)
    assert bundle.test.targets == [classes.index(w) for w in val_wnids]
    assert bundle.train.targets == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [p.rsplit("/", 1)[1] for p, _ in bundle.train.samples][:3] == ["n00_0.JPEG", "n00_1.JPEG", "n00_2.JPEG"]
    img, label = bundle.train[4]
    assert img.shape == (3, 64, 64) and img.dtype == torch.float32 and label == 1
    gray, _ = bundle.test[0]
    assert gray.shape == (3, 64, 64)
    with pytest.raises(ValueError, match="'tinyimagenet' is disk-backed: use --loader torch"):
        datasets.make_loaders(bundle, 4, 4, loader="tensor")
    train, test, _ = datasets.make_loaders(bundle, 4, 4, workers=0)
    x, y = _collect(test)
    assert x.shape == (7, 3, 64, 64) and y.tolist() == bundle.test.targets
    assert len(train) == 3 and sum(len(b[1]) for b in train) == 9
    subset = datasets.build("tinyimagenet", root=root, train_subset=6)
    assert sorted(subset.train[i][1] for i in range(6)) == [0, 0, 1, 1, 2, 2]


def test_digits_split_and_arrays():
    bundle = datasets.build("digits")
    x, y = bundle.train_arrays
    tx, ty = bundle.test_arrays
    assert (len(bundle.train), len(bundle.test), bundle.num_classes, bundle.flip) == (1347, 450, 10, False)
    assert x.shape == (1347, 3, 32, 32) and tx.shape == (450, 3, 32, 32) and x.dtype == torch.uint8
    assert torch.equal(x[:, 0], x[:, 2]) and int(x.max()) == 255 and int(x.min()) == 0
    assert torch.bincount(ty).tolist() == [45, 46, 44, 46, 45, 46, 45, 45, 43, 45]
    pixels = x.double() / 255
    assert abs(pixels.mean() - bundle.mean[0]) < 1e-4 and abs(pixels.std() - bundle.std[0]) < 1e-4


def test_synthetic_deterministic_and_options():
    opts = {"num_classes": 5, "train_size": 120, "test_size": 40, "image_size": 24}
    a, b = datasets.build("synthetic", synthetic=opts), datasets.build("synthetic", synthetic=opts)
    assert torch.equal(a.train_arrays[0], b.train_arrays[0]) and torch.equal(a.test_arrays[1], b.test_arrays[1])
    assert a.train_arrays[0].shape == (120, 3, 24, 24) and a.train_arrays[0].dtype == torch.uint8
    assert (a.num_classes, a.image_size, len(a.test)) == (5, 24, 40)
    assert torch.bincount(a.train_arrays[1]).tolist() == [24] * 5
    assert a.train[0][0].shape == (3, 24, 24)
    default = datasets.build("synthetic")
    assert (len(default.train), len(default.test), default.num_classes) == (2000, 500, 10)
    with pytest.raises(ValueError, match="bogus"):
        datasets.build("synthetic", synthetic={"bogus": 1})


def test_subsets_are_fixed_balanced_and_consistent():
    bundle = datasets.build("digits", train_subset=100, test_subset=30)
    assert len(bundle.train) == 100 and len(bundle.test) == 30
    assert torch.bincount(bundle.train_arrays[1]).tolist() == [10] * 10
    assert torch.bincount(bundle.test_arrays[1]).tolist() == [3] * 10
    x, y = bundle.test[7]
    assert y == bundle.test_arrays[1][7]
    assert torch.allclose(x, _raw_normalised(bundle.test_arrays[0][7:8], bundle)[0], atol=1e-6)
    again = datasets.build("digits", train_subset=100, test_subset=1000)
    assert torch.equal(again.train_arrays[0], bundle.train_arrays[0]) and len(again.test) == 450
    assert balanced_subset(torch.tensor([0, 0, 0, 0, 1]), 2).tolist() in ([0, 4], [1, 4], [2, 4], [3, 4])


def test_cifar_subset_applies_to_dataset_and_arrays(cifar10_root):
    bundle = datasets.build("cifar10", root=cifar10_root, train_subset=10)
    assert len(bundle.train) == 10 and len(bundle.train_arrays[1]) == 10
    assert [bundle.train[i][1] for i in range(10)] == bundle.train_arrays[1].tolist()


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "tinyimagenet", "imagenet"])
def test_missing_dataset_is_one_clear_error(name, tmp_path):
    with pytest.raises(datasets.DatasetNotFoundError) as info:
        datasets.build(name, root=tmp_path / "nowhere")
    message = str(info.value)
    assert "\n" not in message and name in message and str(tmp_path / "nowhere") in message
    assert "--download" in message
    assert ("cannot be downloaded" in message) == (name == "imagenet")
    assert ("imagenet/train/<class>" in message) == (name == "imagenet")


def test_tinyimagenet_download_failure_is_reported(tmp_path, monkeypatch):
    calls = []

    def offline(url, root, md5=None):
        calls.append((url, root, md5))
        raise OSError("network unreachable")

    monkeypatch.setattr(datasets.vision, "download_and_extract_archive", offline)
    with pytest.raises(datasets.DatasetNotFoundError, match="downloading it failed: OSError: network unreachable"):
        datasets.build("tinyimagenet", root=tmp_path, download=True)
    assert calls == [("http://cs231n.stanford.edu/tiny-imagenet-200.zip", str(tmp_path), datasets.vision.TINY_MD5)]


def _rewrite_annotation(base, number: int, text: str) -> None:
    path = base / "val" / "val_annotations.txt"
    lines = path.read_text().splitlines()
    lines[number - 1] = text
    path.write_text("\n".join(lines) + "\n")


def _remove_train_images(base) -> None:
    for path in (base / "train" / "n00" / "images").iterdir():
        path.unlink()
    (base / "train" / "n00" / "images" / "readme.txt").write_text("not an image")


TINY_DEFECTS = {  # defect -> (how to make it, what the one-line error must say)
    "no wnids": (lambda b: (b / "wnids.txt").unlink(), "wnids.txt is missing"),
    "empty wnids": (lambda b: (b / "wnids.txt").write_text("\n"), "wnids.txt is empty"),
    "repeated wnid": (lambda b: (b / "wnids.txt").write_text("n02\nn00\nn01\nn00\n"), "wnids.txt lists wnid n00 twice"),
    "no train folder": (lambda b: shutil.rmtree(b / "train" / "n01" / "images"), "train/n01/images/ is missing"),
    "no train images": (_remove_train_images, "train/n00/images/ holds no images"),
    "empty train image": (lambda b: (b / "train" / "n02" / "images" / "n02_1.JPEG").write_bytes(b""),
                          "train/n02/images/n02_1.JPEG is empty"),
    "no annotations": (lambda b: (b / "val" / "val_annotations.txt").unlink(), "val/val_annotations.txt is missing"),
    "one field": (lambda b: _rewrite_annotation(b, 4, "val_3.JPEG n02 0 0 63 63"),
                  "val/val_annotations.txt line 4 has 1 tab-separated field, expected at least 2"),
    "unknown wnid": (lambda b: _rewrite_annotation(b, 6, "val_5.JPEG\tn999\t0\t0\t63\t63"),
                     "val/val_annotations.txt line 6 names wnid n999 not in wnids.txt"),
    "repeated file": (lambda b: _rewrite_annotation(b, 7, "val_2.JPEG\tn00\t0\t0\t63\t63"),
                      "val/val_annotations.txt line 7 repeats val_2.JPEG (first on line 3)"),
    "missing val image": (lambda b: (b / "val" / "images" / "val_4.JPEG").unlink(),
                          "val/val_annotations.txt line 5 names val_4.JPEG, which is missing from val/images/ "
                          "(1 of its 7 images missing)"),
    "empty val image": (lambda b: (b / "val" / "images" / "val_2.JPEG").write_bytes(b""),
                        "val/images/val_2.JPEG (named on val/val_annotations.txt line 3) is empty"),
    "extra val image": (lambda b: shutil.copy(b / "val" / "images" / "val_1.JPEG", b / "val" / "images" / "val_7.JPEG"),
                        "val/images/ holds 8 images but val/val_annotations.txt lists 7: "
                        "1 extra image(s) not annotated, e.g. val/images/val_7.JPEG"),
}


@pytest.mark.parametrize("defect", list(TINY_DEFECTS))
def test_tinyimagenet_layout_is_checked_up_front(defect, tiny_root):
    """Every defect of the tree is one line naming the file (and line) at fault, when the dataset is built."""
    root, _ = tiny_root
    base = root / "tiny-imagenet-200"
    damage, expected = TINY_DEFECTS[defect]
    damage(base)
    with pytest.raises(datasets.DatasetNotFoundError) as info:
        datasets.build("tinyimagenet", root=root, download=True)  # the tree exists: nothing to download
    message = str(info.value)
    assert "\n" not in message and str(base) in message and expected in message
    assert "--download" not in message and "downloading" not in message and "KeyError" not in message


def test_tinyimagenet_undecodable_image_names_the_file(tiny_root):
    """An image that exists but does not decode is reported, when read, as one line naming it."""
    root, _ = tiny_root
    base = root / "tiny-imagenet-200"
    bad_train = base / "train" / "n00" / "images" / "n00_1.JPEG"
    bad_train.write_bytes(b"this is not a JPEG")
    bad_val = base / "val" / "images" / "val_3.JPEG"
    bad_val.write_bytes(bad_val.read_bytes()[:100])
    bundle = datasets.build("tinyimagenet", root=root)  # the layout check decodes nothing
    assert bundle.train.loader is bundle.test.loader is datasets.vision.read_image
    assert bundle.train[0][0].shape == (3, 64, 64)
    with pytest.raises(datasets.DatasetNotFoundError) as info:
        bundle.train[1]
    message = str(info.value)
    assert message.startswith(f"cannot read image {bad_train}: UnidentifiedImageError: ") and "\n" not in message
    _, test, _ = datasets.make_loaders(bundle, 4, 4, workers=0)
    with pytest.raises(datasets.DatasetNotFoundError, match=f"cannot read image {bad_val}: OSError: "):
        _collect(test)
    train, _, _ = datasets.make_loaders(bundle, 4, 4, workers=1)  # raised in a worker, same type and file
    with pytest.raises(datasets.DatasetNotFoundError, match=f"cannot read image {bad_train}"):
        _collect(train)


def test_imagenet_undecodable_image_names_the_file(tmp_path):
    base = tmp_path / "imagenet"  # README's layout: DATA_ROOT/imagenet/{train,val}/<class>/
    for split in ("train", "val"):
        for k in range(2):
            (base / split / f"c{k}").mkdir(parents=True)
            Image.new("RGB", (40, 30), (90 * k, 0, 0)).save(base / split / f"c{k}" / "a.JPEG")
    bad = base / "val" / "c1" / "b.JPEG"
    bad.write_bytes(b"\xff\xd8\xff truncated")
    bundle = datasets.build("imagenet", root=tmp_path)
    assert bundle.source == str(base) and len(bundle.train) == 2
    assert bundle.test[1][0].shape == (3, 224, 224)
    with pytest.raises(datasets.DatasetNotFoundError, match=f"^cannot read image {bad}: "):
        bundle.test[2]


@pytest.fixture
def offline_cifar(monkeypatch):
    """torchvision's CIFAR download, recording its calls and failing as if offline."""
    calls = []

    def offline(*args, **kwargs):
        calls.append(args)
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", offline)
    return calls


@pytest.mark.parametrize("download", [False, True])
def test_corrupt_cifar_is_reported_not_downloaded_again(cifar10_root, offline_cifar, download):
    folder = cifar10_root / "cifar-10-batches-py"
    (folder / "test_batch").write_bytes(b"garbage")
    with pytest.raises(datasets.DatasetNotFoundError) as info:
        datasets.build("cifar10", root=cifar10_root, download=download)
    message = str(info.value)
    assert offline_cifar == [] and "\n" not in message
    assert f"test_batch is corrupt or incomplete (md5 mismatch); delete {folder} to download it again" in message
    assert "downloading it failed" not in message and "pass --download" not in message


def test_unreadable_cifar_file_is_named(cifar100_root, monkeypatch, offline_cifar):
    """A file that passes its md5 check but does not unpickle is named as unreadable."""
    folder = cifar100_root / "cifar-100-python"
    (folder / "meta").write_bytes(b"garbage")
    monkeypatch.setattr(CIFAR100, "meta", {**CIFAR100.meta, "md5": _md5(folder / "meta")})
    with pytest.raises(datasets.DatasetNotFoundError) as info:
        datasets.build("cifar100", root=cifar100_root, download=True)
    message = str(info.value)
    assert offline_cifar == [] and "\n" not in message
    assert f"meta is corrupt or incomplete (unreadable: UnpicklingError: pickle data was truncated); delete {folder} " \
           "to download it again" in message


def test_incomplete_cifar_folder_is_not_downloaded_again(cifar10_root, offline_cifar):
    folder = cifar10_root / "cifar-10-batches-py"
    (folder / "data_batch_3").unlink()
    with pytest.raises(datasets.DatasetNotFoundError, match=f"data_batch_3 is missing .*; delete {folder} to download"):
        datasets.build("cifar10", root=cifar10_root, download=True)
    assert offline_cifar == []


def test_cifar_downloads_only_a_missing_folder(cifar10_root, offline_cifar):
    bundle = datasets.build("cifar10", root=cifar10_root, download=True)  # present and intact: read, not fetched
    assert len(bundle.train) == 60 and offline_cifar == []
    shutil.rmtree(cifar10_root / "cifar-10-batches-py")
    with pytest.raises(datasets.DatasetNotFoundError, match="downloading it failed: OSError: network unreachable"):
        datasets.build("cifar10", root=cifar10_root, download=True)
    assert len(offline_cifar) == 1


def test_corrupt_cifar_is_not_found(cifar10_root):
    (cifar10_root / "cifar-10-batches-py" / "test_batch").write_bytes(b"garbage")
    with pytest.raises(datasets.DatasetNotFoundError, match="cifar-10-batches-py"):
        datasets.build("cifar10", root=cifar10_root)


def test_bad_names():
    with pytest.raises(ValueError, match="'emnist'.*cifar10, cifar100, tinyimagenet, imagenet, mnist, fashionmnist, "
                                         "digits, synthetic"):
        datasets.build("emnist")
    with pytest.raises(ValueError, match="'jax'"):
        datasets.make_loaders(datasets.build("digits"), 8, 8, loader="jax")
    with pytest.raises(ValueError, match="synthetic"):
        datasets.build("digits", synthetic={"num_classes": 3})


# --------------------------------------------------------------------------- augmentation


def _probe_image(fill: int = 255) -> torch.Tensor:
    """Channel 0 encodes row+1, channel 1 column+1, channel 2 is ``fill``: every pixel's origin is readable."""
    r = torch.arange(1, SIZE + 1, dtype=torch.uint8)
    return torch.stack([r[:, None].expand(SIZE, SIZE), r[None, :].expand(SIZE, SIZE),
                        torch.full((SIZE, SIZE), fill, dtype=torch.uint8)])


def _probe_bundle(n: int, flip: bool):
    images = _probe_image().expand(n, -1, -1, -1).contiguous()
    arrays = (images, torch.zeros(n, dtype=torch.int64))
    return array_bundle("probe", arrays, arrays, 1, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), flip=flip)


def _decode(out: torch.Tensor) -> torch.Tensor:
    """Outcome code (top*9 + left)*2 + flipped of each augmented probe, checked by exact reconstruction.

    Output pixels (4, 4) and (4, 5) always come from inside the image, so they give the
    source row/column, the direction and the probe's channel-2 fill; the whole sample must
    then equal the zero-padded crop (and mirror) of that probe that the code describes.
    """
    pix = (out * 255).round().to(torch.int64)
    src_row, col_a, col_b = pix[:, 0, 4, 4] - 1, pix[:, 1, 4, 4] - 1, pix[:, 1, 4, 5] - 1
    flipped = col_b < col_a
    top = src_row + PAD - 4
    left = torch.where(flipped, col_a + PAD - (SIZE - 1 - 4), col_a + PAD - 4)
    assert top.min() >= 0 and top.max() <= 2 * PAD and left.min() >= 0 and left.max() <= 2 * PAD
    padded = {fill: F.pad(_probe_image(fill), (PAD,) * 4) for fill in pix[:, 2, 4, 4].unique().tolist()}
    expected = torch.stack([
        padded[c][:, t:t + SIZE, s:s + SIZE].flip(-1) if f else padded[c][:, t:t + SIZE, s:s + SIZE]
        for t, s, f, c in zip(top.tolist(), left.tolist(), flipped.tolist(), pix[:, 2, 4, 4].tolist())
    ])
    assert torch.equal(pix, expected.to(torch.int64)), "augmented sample is not a zero-padded crop/flip"
    return (top * (2 * PAD + 1) + left) * 2 + flipped.long()


def _chi_square_uniform(values: torch.Tensor, outcomes: list[int], what: str) -> None:
    counts = torch.bincount(values, minlength=max(outcomes) + 1).double()
    assert counts.sum() == counts[outcomes].sum(), f"{what}: outcome outside {outcomes}"
    expected = len(values) / len(outcomes)
    stat = float(((counts[outcomes] - expected) ** 2 / expected).sum())
    assert stat < chi2.ppf(1 - 1e-4, len(outcomes) - 1), f"{what}: chi-square {stat:.1f}, {len(outcomes)} outcomes"


def _assert_uniform(codes: torch.Tensor, flip: bool) -> None:
    """Joint (top, left, flip) and each marginal uniform over 0..2*PAD (and {0, 1} if flip, else {0})."""
    offsets = list(range(2 * PAD + 1))
    flips = [0, 1] if flip else [0]
    joint = [(t * (2 * PAD + 1) + s) * 2 + f for t in offsets for s in offsets for f in flips]
    _chi_square_uniform(codes, joint, "joint")
    _chi_square_uniform(codes // 2 // (2 * PAD + 1), offsets, "top")
    _chi_square_uniform(codes // 2 % (2 * PAD + 1), offsets, "left")
    if flip:
        _chi_square_uniform(codes % 2, flips, "flip")
    else:
        assert (codes % 2 == 0).all(), "flipped although flip=False"


@pytest.mark.parametrize("kind, n", [("tensor", 8000), ("torch", 3000)])
def test_crop_flip_distribution_matches_randomcrop(kind, n):
    """Both loaders draw (top, left, flip) uniformly over 9 x 9 x 2 with zero padding."""
    train, _, _ = datasets.make_loaders(_probe_bundle(n, flip=True), 1000, 1000, loader=kind, workers=0, seed=3)
    train.set_epoch(0)
    _assert_uniform(_decode(_collect(train)[0]), flip=True)


def test_tensor_loader_never_flips_without_flip():
    train, _, _ = datasets.make_loaders(_probe_bundle(4000, flip=False), 1000, 1000, loader="tensor")
    _assert_uniform(_decode(_collect(train)[0]), flip=False)


def test_torch_loader_never_flips_without_flip():
    train, _, _ = datasets.make_loaders(_probe_bundle(1500, flip=False), 500, 500, loader="torch", workers=0)
    assert (_decode(_collect(train)[0]) % 2 == 0).all()


# --------------------------------------------------------------------------- loaders


@pytest.mark.parametrize("name", ["cifar10", "digits"])
def test_tensor_and_torch_loaders_agree_on_test_split(name, request):
    root = request.getfixturevalue("cifar10_root") if name == "cifar10" else "unused"
    bundle = datasets.build(name, root=root)
    _, torch_test, _ = datasets.make_loaders(bundle, 16, 7, loader="torch", workers=0)
    _, tensor_test, _ = datasets.make_loaders(bundle, 16, 7, loader="tensor")
    assert len(torch_test) == len(tensor_test)
    (xa, ya), (xb, yb) = _collect(torch_test), _collect(tensor_test)
    assert torch.equal(ya, yb) and torch.equal(yb, bundle.test_arrays[1])
    assert xa.dtype == xb.dtype == torch.float32 and torch.allclose(xa, xb, atol=1e-6)


def _small_bundle():
    return datasets.build("synthetic", synthetic={"train_size": 70, "test_size": 25})


@pytest.mark.parametrize("kind", ["tensor", "torch"])
def test_set_epoch_determinism(kind):
    bundle = _small_bundle()
    train, _, _ = datasets.make_loaders(bundle, 16, 16, loader=kind, workers=0, seed=5)
    other, _, _ = datasets.make_loaders(bundle, 16, 16, loader=kind, workers=0, seed=5)
    train.set_epoch(2)
    first = _collect(train)
    train.set_epoch(3)
    third = _collect(train)
    other.set_epoch(2)
    second = _collect(other)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[1], third[1]) and not torch.allclose(first[0], third[0])
    assert len(train) == 5 and first[0].shape == (70, 3, 32, 32)


def test_torch_loader_workers_do_not_change_augmentation():
    """Persistent workers, 0 workers, and re-visiting an epoch all give the same batches."""
    bundle = _small_bundle()
    solo, _, _ = datasets.make_loaders(bundle, 16, 16, workers=0, seed=1)
    pooled, _, _ = datasets.make_loaders(bundle, 16, 16, workers=2, seed=1)
    solo.set_epoch(4)
    reference = _collect(solo)
    for epoch in (4, 1, 4):
        pooled.set_epoch(epoch)
        got = _collect(pooled)
    assert torch.equal(got[0], reference[0]) and torch.equal(got[1], reference[1])


def test_loaders_leave_global_rng_alone():
    bundle = _small_bundle()
    state = torch.get_rng_state()
    for kind in ("torch", "tensor"):
        _collect(datasets.make_loaders(bundle, 16, 16, loader=kind, workers=0)[0])
    assert torch.equal(state, torch.get_rng_state())


def test_both_kinds_visit_the_same_train_order():
    bundle = _small_bundle()
    a, _, _ = datasets.make_loaders(bundle, 16, 16, loader="torch", workers=0, seed=9)
    b, _, _ = datasets.make_loaders(bundle, 16, 16, loader="tensor", seed=9)
    a.set_epoch(1)
    b.set_epoch(1)
    assert torch.equal(_collect(a)[1], _collect(b)[1])


@pytest.mark.parametrize("kind", ["tensor", "torch"])
def test_distributed_shards(kind):
    bundle = _small_bundle()
    tests, trains = [], []
    for rank in range(2):
        train, test, _ = datasets.make_loaders(bundle, 8, 4, loader=kind, workers=0, seed=2, rank=rank, world_size=2)
        train.set_epoch(1)
        tests.append(_collect(test))
        trains.append(_collect(train))
        assert len(train) == 5
    x = torch.cat([tests[0][0], tests[1][0]])
    assert len(x) == 25 and len(tests[0][0]) == 13 and len(tests[1][0]) == 12
    expected = _raw_normalised(bundle.test_arrays[0], bundle)
    assert torch.allclose(torch.cat([expected[0::2], expected[1::2]]), x, atol=1e-6)
    assert len(trains[0][1]) == len(trains[1][1]) == 35


def test_train_shards_share_one_permutation():
    n = 11
    shards = [datasets.loaders.shard_indices(n, train=True, seed=0, epoch=3, rank=r, world_size=3) for r in range(3)]
    assert [len(s) for s in shards] == [4, 4, 4]
    assert set(torch.cat(shards).tolist()) == set(range(n))
    tests = [datasets.loaders.shard_indices(n, train=False, seed=0, epoch=3, rank=r, world_size=3) for r in range(3)]
    assert sorted(torch.cat(tests).tolist()) == list(range(n))


def test_drop_last_and_len():
    bundle = _small_bundle()
    for kind in ("torch", "tensor"):
        train, test, _ = datasets.make_loaders(bundle, 16, 10, loader=kind, workers=0, drop_last=True)
        assert len(train) == 4 and sum(1 for _ in train) == 4 and len(test) == 3
        assert all(len(y) == 16 for _, y in train)


# --------------------------------------------------------------------------- views, indices, holdout


def _id_bundle(n: int):
    """Probe images whose channel 2 identifies them (``i % 255 + 1``), labelled ``i``: a crop shows its source."""
    images = torch.stack([_probe_image(i % 255 + 1) for i in range(n)])
    arrays = (images, torch.arange(n))
    return array_bundle("probe", arrays, arrays, n, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), flip=True)


@pytest.mark.parametrize("kind, n", [("tensor", 3000), ("torch", 1500)])
def test_views_are_independent_augmentations_of_the_same_images(kind, n):
    """``views=2``: 2*B images, view-major, each view a crop/flip of the batch's images drawn independently."""
    train, test, _ = datasets.make_loaders(_id_bundle(n), 500, 500, loader=kind, workers=0, seed=7, views=2)
    train.set_epoch(1)
    codes, labels = ([], []), []
    for x, y in train:
        assert x.shape == (2 * len(y), 3, SIZE, SIZE) and len(y) == 500
        for view, out in zip(codes, x.chunk(2)):
            view.append(_decode(out))  # an exact zero-padded crop (and mirror) of one probe ...
            source = (out[:, 2, 4, 4] * 255).round().long()
            assert torch.equal(source, y % 255 + 1)  # ... of the very image whose label is yielded
        labels.append(y)
    first, second = (torch.cat(view) for view in codes)
    assert sorted(torch.cat(labels).tolist()) == list(range(n))
    _assert_uniform(torch.cat([first, second]), flip=True)
    offsets = 2 * PAD + 1
    top, left, flip = (lambda c: c // 2 // offsets), (lambda c: c // 2 % offsets), (lambda c: c % 2)
    _chi_square_uniform(top(first) * offsets + top(second), list(range(offsets ** 2)), "top of view 0 x view 1")
    _chi_square_uniform(left(first) * offsets + left(second), list(range(offsets ** 2)), "left of view 0 x view 1")
    _chi_square_uniform(flip(first) * 2 + flip(second), [0, 1, 2, 3], "flip of view 0 x view 1")
    assert all(len(x) == len(y) for x, y in test)  # the test split is never multiplied


@pytest.mark.parametrize("kind", ["tensor", "torch"])
def test_one_view_is_the_default(kind):
    bundle = _small_bundle()
    default, _, _ = datasets.make_loaders(bundle, 16, 16, loader=kind, workers=0, seed=4)
    single, _, _ = datasets.make_loaders(bundle, 16, 16, loader=kind, workers=0, seed=4, views=1)
    default.set_epoch(2)
    single.set_epoch(2)
    for (xa, ya), (xb, yb) in zip(default, single, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    with pytest.raises(ValueError, match="views must be a positive integer, got 0"):
        datasets.make_loaders(bundle, 16, 16, loader=kind, views=0)


@pytest.mark.parametrize("kind", ["tensor", "torch"])
@pytest.mark.parametrize("world_size", [1, 2])
def test_with_index_yields_training_split_indices(kind, world_size):
    """A third element: each sample's index in the training split, matching its target, its shard and its image."""
    bundle = datasets.build("synthetic", synthetic={"train_size": 71, "test_size": 9})
    x_all, y_all = bundle.train_arrays
    for rank in range(world_size):
        options = dict(loader=kind, workers=0, seed=3, rank=rank, world_size=world_size)
        indexed, test, _ = datasets.make_loaders(bundle, 16, 4, with_index=True, **options)
        plain_train, _, _ = datasets.make_loaders(bundle, 16, 4, **options)
        indexed.set_epoch(2)
        plain_train.set_epoch(2)
        seen = []
        for (x, y, index), (px, py) in zip(indexed, plain_train, strict=True):
            assert index.dtype == torch.int64 and index.shape == y.shape
            assert torch.equal(y, y_all[index]) and torch.equal(x, px) and torch.equal(y, py)
            seen.append(index)
        expected = datasets.loaders.shard_indices(71, train=True, seed=3, epoch=2, rank=rank, world_size=world_size)
        assert torch.equal(torch.cat(seen), expected)
        assert all(len(batch) == 2 for batch in test)  # only the training loader gets indices
    # the index also identifies the (augmented) image: probe i carries i % 255 + 1 in channel 2
    probe, _, _ = datasets.make_loaders(_id_bundle(300), 64, 64, loader=kind, workers=0, with_index=True)
    for x, _, index in probe:
        _decode(x)
        assert torch.equal((x[:, 2, 4, 4] * 255).round().long(), index % 255 + 1)


@pytest.mark.parametrize("kind", ["tensor", "torch"])
def test_views_with_index(kind):
    bundle = _small_bundle()
    train, _, _ = datasets.make_loaders(bundle, 16, 16, loader=kind, workers=0, views=3, with_index=True)
    for x, y, index in train:
        assert x.shape == (3 * len(y), 3, 32, 32) and torch.equal(y, bundle.train_arrays[1][index])


HOLDOUT_OPTIONS = {"num_classes": 5, "train_size": 120, "test_size": 20}


@pytest.mark.parametrize("holdout, n", [(20, 20), (0.25, 30), (0.001, 1)])
def test_holdout_is_balanced_disjoint_and_unaugmented(holdout, n):
    full = datasets.build("synthetic", synthetic=HOLDOUT_OPTIONS)
    bundle = datasets.build("synthetic", synthetic=HOLDOUT_OPTIONS, holdout=holdout)
    held, kept = bundle.holdout.indices, bundle.train.indices  # positions in the original training split
    assert len(held) == len(bundle.holdout) == n and len(kept) == len(bundle.train) == 120 - n
    assert not set(held) & set(kept) and sorted(held + kept) == list(range(120))
    counts = torch.bincount(bundle.holdout_arrays[1], minlength=5)
    assert counts.max() - counts.min() <= 1 and counts.sum() == n  # class-balanced
    for arrays, idx in ((bundle.holdout_arrays, held), (bundle.train_arrays, kept)):
        assert torch.equal(arrays[0], full.train_arrays[0][idx]) and torch.equal(arrays[1], full.train_arrays[1][idx])
    expected = _raw_normalised(bundle.holdout_arrays[0], bundle)
    for j in range(n):  # served through the test transform: the raw image, normalised, every time
        x, y = bundle.holdout[j]
        assert torch.allclose(x, expected[j], atol=1e-6) and y == bundle.holdout_arrays[1][j]
    for kind in ("tensor", "torch"):
        loaders = datasets.make_loaders(bundle, 16, 8, loader=kind, workers=0)
        assert len(loaders.train) == math.ceil((120 - n) / 16) and len(loaders.holdout) == math.ceil(n / 8)
        for _ in range(2):
            x, y = _collect(loaders.holdout)
            assert torch.equal(y, bundle.holdout_arrays[1]) and torch.allclose(x, expected, atol=1e-6)
        x, y = _collect(loaders.train)
        assert sorted(y.tolist()) == sorted(bundle.train_arrays[1].tolist())
        assert datasets.make_loaders(full, 16, 8, loader=kind, workers=0).holdout is None
    # the training split keeps its augmentation (the holdout's transform is a copy's)
    draws = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        draws.append(torch.stack([bundle.train[j][0] for j in range(8)]))
    assert not torch.equal(*draws) and bundle.train[0][1] == full.train_arrays[1][kept[0]]


def test_holdout_of_disk_and_pickle_datasets(tiny_root, cifar10_root):
    root, _ = tiny_root
    tiny = datasets.build("tinyimagenet", root=root, holdout=3)
    assert tiny.holdout_arrays is None and len(tiny.train) == 6
    assert sorted(tiny.holdout[j][1] for j in range(3)) == [0, 1, 2]
    samples = tiny.holdout.dataset.samples
    expected = plain(tiny.mean, tiny.std)
    for j, position in enumerate(tiny.holdout.indices):
        with Image.open(samples[position][0]) as image:
            assert torch.allclose(tiny.holdout[j][0], expected(image.convert("RGB")), atol=1e-6)
    holdout = datasets.make_loaders(tiny, 4, 2, workers=0).holdout
    assert _collect(holdout)[0].shape == (3, 3, 64, 64)
    cifar = datasets.build("cifar10", root=cifar10_root, holdout=0.5)
    assert len(cifar.holdout) == len(cifar.train) == 30 and len(cifar.holdout_arrays[1]) == 30
    x, y = _collect(datasets.make_loaders(cifar, 8, 8, loader="tensor").holdout)
    assert torch.equal(y, cifar.holdout_arrays[1])
    assert torch.allclose(x, torch.stack([cifar.holdout[j][0] for j in range(30)]), atol=1e-6)


@pytest.mark.parametrize("holdout", [120, 500, -3, 0.9999, 2.5])
def test_bad_holdout_names_the_value(holdout):
    with pytest.raises(ValueError, match=rf"^holdout {holdout!r}\b.*between 1 and 119"):
        datasets.build("synthetic", synthetic=HOLDOUT_OPTIONS, holdout=holdout)
