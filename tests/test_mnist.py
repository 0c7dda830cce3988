"""MNIST and Fashion-MNIST (datasets/mnist.py) on idx files the tests write in the real format.

The idx format (LeCun et al.): a big-endian magic number (0x0803 for unsigned-byte 3-D
images, 0x0801 for 1-D labels), one big-endian 32-bit size per dimension, then the bytes.
The files are written extracted and gzipped, in torchvision's layout and as the Debian
package lays them out, so torchvision's own reader runs on them unchanged. A last test
reads the real Fashion-MNIST where the Debian package is installed.
"""

import gzip
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets.mnist

import datasets
from datasets import mnist

REPO = Path(__file__).resolve().parent.parent

NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def idx_bytes(array: np.ndarray) -> bytes:
    """``array`` (uint8, 1-D labels or 3-D images) as an idx file."""
    magic = 0x0800 + array.ndim
    return struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()


def make_split(seed: int, n: int, classes: int = 10):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = np.arange(n) % classes
    return images, labels.astype(np.uint8)


SPLITS = {"train": make_split(0, 40), "test": make_split(1, 20)}


def write_idx(folder, gz=(), contents=None):
    """The four files in ``folder``; those named in ``gz`` gzipped, ``contents`` overriding a file's bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = dict(zip(NAMES, (*SPLITS["train"], *SPLITS["test"])))
    for name in NAMES:
        data = (contents or {}).get(name, idx_bytes(arrays[name]))
        if name in gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return folder


@pytest.fixture
def no_debian(monkeypatch, tmp_path):
    """No Debian package on this machine (its folder points to an empty place)."""
    monkeypatch.setattr(mnist, "DEBIAN_FOLDERS", {"fashionmnist": tmp_path / "no-debian"})


@pytest.fixture
def offline(monkeypatch):
    """torchvision's download step fails as it does without internet; the calls are recorded."""
    calls = []

    def fail(url, *args, **kwargs):
        calls.append(url)
        raise RuntimeError(f"<urlopen error [Errno -3] Temporary failure in name resolution> {url}")
    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", fail)
    return calls


def files_below(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashionmnist", "FashionMNIST")])
@pytest.mark.parametrize("gz", [(), NAMES, NAMES[::2]], ids=["extracted", "gzipped", "mixed"])
def test_idx_files_in_torchvision_layout(name, folder, gz, tmp_path, no_debian, offline):
    write_idx(tmp_path / folder / "raw", gz=gz)
    before = files_below(tmp_path)
    bundle = datasets.build(name, root=tmp_path)
    assert files_below(tmp_path) == before and offline == []  # nothing written, nothing fetched
    x, y = bundle.train_arrays
    assert x.shape == (40, 3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert bundle.test_arrays[0].shape == (20, 3, 32, 32) and len(bundle.test) == 20
    images, labels = SPLITS["train"]
    assert torch.equal(x[:, 1, 2:30, 2:30], torch.from_numpy(images)) and torch.equal(x[:, 0], x[:, 2])
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert int(x[:, :, border].max()) == 0  # zero padding
    assert y.tolist() == labels.tolist() and bundle.test_arrays[1].tolist() == SPLITS["test"][1].tolist()
    assert (bundle.num_classes, bundle.image_size, bundle.crop_padding) == (10, 32, 4)
    assert bundle.flip == (name == "fashionmnist")
    assert bundle.source == str(tmp_path / folder / "raw")
    pixels = x.double() / 255
    assert bundle.mean == (round(float(pixels.mean()), 4),) * 3
    assert bundle.std == (round(float(pixels.std(unbiased=False)), 4),) * 3
    image, label = bundle.test[3]
    expected = (bundle.test_arrays[0][3].float() / 255 - bundle.mean[0]) / bundle.std[0]
    assert torch.allclose(image, expected, atol=1e-5) and label == SPLITS["test"][1][3]


def test_class_balanced_subsets(tmp_path, no_debian):
    write_idx(tmp_path / "FashionMNIST" / "raw", gz=NAMES)
    bundle = datasets.build("fashionmnist", root=tmp_path, train_subset=20, test_subset=10)
    assert torch.bincount(bundle.train_arrays[1]).tolist() == [2] * 10
    assert torch.bincount(bundle.test_arrays[1]).tolist() == [1] * 10
    assert [bundle.train[i][1] for i in range(20)] == bundle.train_arrays[1].tolist()


def test_tensor_and_torch_loaders_agree_on_test_split(tmp_path, no_debian):
    write_idx(tmp_path / "MNIST" / "raw")
    bundle = datasets.build("mnist", root=tmp_path)
    batches = {kind: list(datasets.make_loaders(bundle, 8, 8, loader=kind, workers=0).test)
               for kind in ("tensor", "torch")}
    for (a, ya), (b, yb) in zip(batches["tensor"], batches["torch"]):
        assert torch.allclose(a, b, atol=1e-6) and torch.equal(ya, yb)


def test_debian_package_is_read_whatever_the_data_root(tmp_path, monkeypatch, offline):
    debian = write_idx(tmp_path / "usr-share-datasets-fashion-mnist", gz=NAMES)
    monkeypatch.setattr(mnist, "DEBIAN_FOLDERS", {"fashionmnist": debian})
    bundle = datasets.build("fashionmnist", root=tmp_path / "nonexistent")
    assert bundle.source == str(debian) and len(bundle.train) == 40 and offline == []
    assert not (tmp_path / "nonexistent").exists()
    # files under --data-root come first
    write_idx(tmp_path / "mine" / "FashionMNIST" / "raw", contents={
        NAMES[1]: idx_bytes(np.zeros(40, dtype=np.uint8))})
    mine = datasets.build("fashionmnist", root=tmp_path / "mine")
    assert mine.source == str(tmp_path / "mine" / "FashionMNIST" / "raw") and mine.train_arrays[1].sum() == 0


@pytest.mark.parametrize("name", ["mnist", "fashionmnist"])
def test_missing_set_names_where_it_looked_and_both_ways(name, tmp_path, no_debian, offline):
    with pytest.raises(datasets.DatasetNotFoundError) as info:
        datasets.build(name, root=tmp_path / "nowhere")
    message = str(info.value)
    raw = tmp_path / "nowhere" / ("MNIST" if name == "mnist" else "FashionMNIST") / "raw"
    assert "\n" not in message and str(raw) in message and "--download" in message
    assert "train-images-idx3-ubyte" in message and offline == []
    assert ("apt-get install dataset-fashion-mnist" in message) == (name == "fashionmnist")
    if name == "fashionmnist":
        assert str(tmp_path / "no-debian") in message


def test_download_goes_through_torchvision(tmp_path, no_debian, monkeypatch):
    def fetch(url, download_root, filename, md5):  # what torchvision's download leaves: the extracted file
        name = filename.removesuffix(".gz")
        write_idx(tmp_path / "staged")
        (tmp_path / "staged" / name).rename(f"{download_root}/{name}")
    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", fetch)
    bundle = datasets.build("mnist", root=tmp_path / "data", download=True)
    assert len(bundle.train) == 40 and bundle.source == str(tmp_path / "data" / "MNIST" / "raw")


def test_download_failure_is_one_line(tmp_path, no_debian, offline):
    with pytest.raises(datasets.DatasetNotFoundError) as info:
        datasets.build("fashionmnist", root=tmp_path, download=True)
    message = str(info.value)
    assert "\n" not in message and "downloading it failed" in message and offline


@pytest.mark.parametrize("defect,words", [
    ("bad magic", "t10k-labels-idx1-ubyte is not a readable idx file"),
    ("truncated gzip", "train-images-idx3-ubyte.gz is not a readable idx file"),
    ("label count", "its train split has images of shape (40, 28, 28) and 39 labels"),
    ("label range", "its test labels range over 0..11"),
])
def test_unreadable_files_are_named(defect, words, tmp_path, no_debian, offline):
    contents, gz = {}, ()
    if defect == "bad magic":
        contents[NAMES[3]] = b"\x00\x00\x09\x09" + idx_bytes(SPLITS["test"][1])[4:]
    elif defect == "truncated gzip":
        gz = (NAMES[0],)
        write_idx(tmp_path / "MNIST" / "raw", gz=gz)
        path = tmp_path / "MNIST" / "raw" / f"{NAMES[0]}.gz"
        path.write_bytes(path.read_bytes()[:500])
    elif defect == "label count":
        contents[NAMES[1]] = idx_bytes(SPLITS["train"][1][:39])
    else:
        contents[NAMES[3]] = idx_bytes(np.arange(20, dtype=np.uint8) % 12)
    if defect != "truncated gzip":
        write_idx(tmp_path / "MNIST" / "raw", contents=contents)
    with pytest.raises(datasets.DatasetNotFoundError) as info:
        datasets.build("mnist", root=tmp_path)
    message = str(info.value)
    assert "\n" not in message and words in message and offline == []


def test_training_script_exits_2_naming_both_ways(tmp_path):
    """What the issue asks of a machine without MNIST (and so without Debian's Fashion-MNIST either)."""
    out = subprocess.run([sys.executable, "train_vanilla.py", "--dataset", "mnist", "--data-root", "/nonexistent",
                          "--out", str(tmp_path), "--epochs", "1"], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert "--download" in lines[0] and "/nonexistent/MNIST/raw" in lines[0]
    assert not list(tmp_path.iterdir())  # no run directory left behind


REAL = mnist.DEBIAN_FOLDERS["fashionmnist"]


@pytest.mark.skipif(not REAL.is_dir(), reason=f"the Debian package dataset-fashion-mnist is not installed ({REAL})")
def test_real_fashion_mnist_from_the_debian_package(tmp_path):
    bundle = datasets.build("fashionmnist", root=tmp_path / "anything")
    assert (len(bundle.train), len(bundle.test), bundle.num_classes) == (60000, 10000, 10)
    assert torch.bincount(bundle.train_arrays[1]).tolist() == [6000] * 10
    assert torch.bincount(bundle.test_arrays[1]).tolist() == [1000] * 10
    assert bundle.mean == (0.2190,) * 3 and bundle.std == (0.3318,) * 3  # docs/CPU_STUDY.md, datasets/mnist.py
