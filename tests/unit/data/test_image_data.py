"""Image data: IDX and ImageFolder readers on small generated images, clear errors, deterministic augmentation,
order and mixing (independent of workers and of where a run resumes)."""
import gzip
import os

import numpy as np
import pytest
import torch

from megatron_ls.data.image_dataset import ImageClassificationDataset, ImageCollator, open_sources
from megatron_ls.data.image_folder import ImageDataError, ImageFolderSource
from megatron_ls.data.image_idx import FASHION_MNIST_DIR, IdxFormatError, load_idx_split, read_idx, write_idx
from megatron_ls.data.image_mix import MixConfig, mix_batch
from megatron_ls.data.image_transforms import ImageTransform, resized_crop_box
from tests.vision_data import make_idx_dataset, make_image_folder


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.float32])
def test_idx_round_trip(tmp_path, gz, dtype):
    array = (np.arange(2 * 3 * 5) * 7 % 251).astype(dtype).reshape(2, 3, 5)
    path = str(tmp_path / ("a.idx" + (".gz" if gz else "")))
    write_idx(path, array)
    back = read_idx(path)
    assert back.shape == array.shape and np.array_equal(back.astype(dtype), array)


def test_idx_errors(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(IdxFormatError, match="bad magic"):
        read_idx(str(bad))
    short = tmp_path / "short"
    short.write_bytes(bytes([0, 0, 8, 1]) + np.asarray([10], ">u4").tobytes() + b"\x00" * 3)
    with pytest.raises(IdxFormatError, match="header says"):
        read_idx(str(short))
    root = make_idx_dataset(str(tmp_path / "fm"), train=12, test=5, classes=4)
    with pytest.raises(ValueError, match="--num-classes 3"):
        load_idx_split(root, "train", 3)
    with pytest.raises(ValueError, match="--num-classes 6.*4 classes"):
        load_idx_split(root, "train", 6)
    with pytest.raises(ImageDataError, match="--num-channels 3"):
        open_sources(root, num_classes=4, num_channels=3)
    os.remove(os.path.join(root, "t10k-labels-idx1-ubyte.gz"))
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_idx_split(root, "test", 4)


def test_idx_reader_on_generated_files(tmp_path):
    root = make_idx_dataset(str(tmp_path), train=10, test=6, classes=4, size=16, gz=False)
    train, valid, test = open_sources(root, num_classes=4, num_channels=1)
    assert (len(train), len(valid)) == (10, 6) and valid is test
    image, label = train.load(5)
    assert image.shape == (1, 16, 16) and image.dtype == np.uint8 and label == 1


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DIR),
                    reason=f"{FASHION_MNIST_DIR} missing: the Debian package dataset-fashion-mnist is not installed")
def test_fashion_mnist_from_debian():
    images, labels = load_idx_split(FASHION_MNIST_DIR, "test", 10)
    assert images.shape == (10000, 28, 28) and sorted(np.unique(labels)) == list(range(10))
    with gzip.open(os.path.join(FASHION_MNIST_DIR, "train-labels-idx1-ubyte.gz")) as fh:
        assert fh.read(4) == b"\x00\x00\x08\x01"


def test_image_folder_reader(tmp_path):
    root = make_image_folder(str(tmp_path), per_class={"train": 3, "val": 2}, size=12, channels=3)
    train, valid, test = open_sources(root, num_classes=4, num_channels=3)
    assert len(train) == 12 and len(valid) == 8 and test is valid
    assert train.classes == ["c0", "c1", "c2", "c3"] and list(train.labels) == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    image, label = valid.load(7)
    assert image.shape == (3, 12, 12) and label == 3
    gray = ImageFolderSource(root, "train", num_channels=1)
    assert gray.load(0)[0].shape == (1, 12, 12)
    with pytest.raises(ImageDataError, match="--num-classes 5 but .*train has 4 class folders"):
        open_sources(root, num_classes=5, num_channels=3)


def test_image_folder_errors(tmp_path):
    root = make_image_folder(str(tmp_path), per_class={"train": 2, "val": 1}, size=8)
    os.makedirs(os.path.join(root, "val", "stranger"))
    with pytest.raises(ImageDataError, match="not classes of the training split"):
        open_sources(root, num_classes=4, num_channels=3)
    os.rmdir(os.path.join(root, "val", "stranger"))
    for f in os.listdir(os.path.join(root, "train", "c2")):
        os.remove(os.path.join(root, "train", "c2", f))
    with pytest.raises(ImageDataError, match="c2: class folder has no images"):
        open_sources(root, num_classes=4, num_channels=3)


def test_unreadable_image_fails_or_is_skipped_with_a_count(tmp_path, capsys):
    root = make_image_folder(str(tmp_path), per_class={"train": 2, "val": 1}, size=8)
    broken = os.path.join(root, "train", "c1", "000.png")
    with open(broken, "wb") as fh:
        fh.write(b"not a png")
    with pytest.raises(ImageDataError, match="unreadable image .*000.png"):
        ImageFolderSource(root, "train").load(2)
    source = ImageFolderSource(root, "train", bad_image="skip")
    image, label = source.load(2)  # the next image of the split instead
    assert source.skipped == 1 and label == 1 and image.shape == (3, 8, 8)
    assert "skipped unreadable image" in capsys.readouterr().err


def _transform(train=True):
    return ImageTransform(size=(8, 8), train=train, mean=(0.5,), std=(0.25,), crop_scale=(0.3, 1.0))


def test_augmentation_and_order_are_deterministic_under_a_seed(tmp_path):
    root = make_idx_dataset(str(tmp_path), train=10, test=4)
    source = open_sources(root, num_classes=4, num_channels=1)[0]
    a = ImageClassificationDataset(source, _transform(), seed=3, num_samples=25)
    b = ImageClassificationDataset(source, _transform(), seed=3, num_samples=25)
    c = ImageClassificationDataset(source, _transform(), seed=4, num_samples=25)
    for i in (0, 7, 13, 24):  # in any order, from fresh objects: the same sample
        assert torch.equal(a[i]["image"], b[i]["image"]) and a[i]["label"] == b[i]["label"]
    assert any(not torch.equal(a[i]["image"], c[i]["image"]) for i in range(5))
    epochs = [sorted(a.source_index(i) for i in range(e * 10, e * 10 + 10)) for e in range(2)]
    assert epochs == [list(range(10))] * 2  # each epoch is a permutation
    assert [a.source_index(i) for i in range(10)] != [a.source_index(i) for i in range(10, 20)]
    # DataLoader workers produce the same batches as the main process
    loaders = [torch.utils.data.DataLoader(a, batch_size=4, num_workers=w, collate_fn=ImageCollator())
               for w in (0, 2)]
    for x, y in zip(*loaders):
        assert torch.equal(x["tokens"], y["tokens"]) and torch.equal(x["labels"], y["labels"])
    evaluation = ImageClassificationDataset(source, _transform(train=False), seed=3)
    assert len(evaluation) == 10 and evaluation.source_index(4) == 4


def test_crop_box_and_eval_transform():
    rng = np.random.default_rng(0)
    for _ in range(50):
        top, left, h, w = resized_crop_box(20, 30, (0.08, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= top and top + h <= 20 and 0 <= left and left + w <= 30 and h > 0 and w > 0
    image = np.full((1, 10, 12), 255, dtype=np.uint8)
    out = ImageTransform(size=(8, 8), train=False, mean=(0.0,), std=(1.0,), eval_crop_fraction=0.875)(image)
    assert out.shape == (1, 8, 8) and torch.allclose(out, torch.ones_like(out))
    with pytest.raises(ValueError, match="--image-mean/--image-std"):
        ImageTransform(size=(8, 8), train=False, mean=(0.5,) * 3, std=(0.5,) * 3)(image)


def test_padded_crop_is_a_seeded_shift_without_rescaling():
    image = np.arange(1 * 8 * 8, dtype=np.uint8).reshape(1, 8, 8) * 3 + 10
    t = ImageTransform(size=(8, 8), train=True, mean=(0.0,), std=(1.0,), crop_padding=2, hflip_prob=0.0)
    padded = np.pad(image.astype(np.float32) / 255.0, ((0, 0), (2, 2), (2, 2)))
    shifts = set()
    for seed in range(40):
        out = t(image, np.random.default_rng(seed)).numpy()
        assert torch.equal(t(image, np.random.default_rng(seed)), torch.from_numpy(out))  # same seed, same crop
        match = [(dy, dx) for dy in range(5) for dx in range(5) if np.allclose(out, padded[:, dy:dy + 8, dx:dx + 8])]
        assert len(match) == 1  # exactly one shift of the padded image: pixels kept, black borders, no resize
        shifts.add(match[0])
    assert len(shifts) > 10  # the shift really is random over the 5x5 offsets
    with pytest.raises(ValueError, match="--crop-padding"):
        ImageTransform(size=(8, 8), train=True, mean=(0.0,), std=(1.0,), crop_padding=-1)


def test_mixup_cutmix_smoothing():
    images = torch.arange(4 * 1 * 6 * 6, dtype=torch.float32).view(4, 1, 6, 6)
    labels = torch.tensor([0, 1, 2, 3])
    cfg = MixConfig(num_classes=5, mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)
    x1, t1 = mix_batch(images, labels, cfg, seed=1, first_sample=8)
    x2, t2 = mix_batch(images, labels, cfg, seed=1, first_sample=8)
    assert torch.equal(x1, x2) and torch.equal(t1, t2)
    assert torch.allclose(t1.sum(-1), torch.ones(4)) and t1.min() >= 0.1 / 5 - 1e-7
    outs = [mix_batch(images, labels, cfg, seed=1, first_sample=s)[1] for s in range(8)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])
    plain = MixConfig(num_classes=5)
    assert mix_batch(images, labels, plain, 1, 0)[1] is labels  # integer labels untouched
    with pytest.raises(ValueError, match="--label-smoothing"):
        MixConfig(num_classes=5, label_smoothing=1.5)
