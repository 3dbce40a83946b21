"""The released recipe's extra augmentations: RandAugment (``rand-m9-mstd0.5-inc1``), random erasing, colour
jitter and bicubic resizing — their arithmetic, their seeding and their flag errors."""
import numpy as np
import pytest
import torch
from PIL import Image

from megatron_ls.data.image_randaugment import (OPERATIONS, RandAugmentSpec, _argument, parse_rand_augment,
                                                rand_augment)
from megatron_ls.data.image_transforms import ImageTransform, color_jitter, random_erase, resize

MEAN = (0.485, 0.456, 0.406)


def _image(h=20, w=24, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_spec_parsing_and_errors():
    assert parse_rand_augment("rand-m9-mstd0.5-inc1") == RandAugmentSpec(2, 9.0, 0.5, 10.0, True, 0.5)
    assert parse_rand_augment("rand-n3-m5-p1.0-mmax8") == RandAugmentSpec(3, 5.0, 0.0, 8.0, False, 1.0)
    for bad, match in (("auto-m9", "only RandAugment"), ("rand-m9-x3", "unknown option 'x3'"),
                       ("rand-mfoo", "needs a number"), ("rand-n0", "n >= 1"), ("rand-p2", "p <= 1")):
        with pytest.raises(ValueError, match=f"--auto-augment.*{match}"):
            parse_rand_augment(bad)


def test_operations_do_what_they_name():
    image = _image()
    pixels = np.asarray(image, dtype=np.int64)
    rng = np.random.default_rng(0)
    apply = {name: (lambda level, inc=True, n=name: np.asarray(
        OPERATIONS[n](image, _argument(n, level, inc, rng), MEAN), dtype=np.int64)) for name in OPERATIONS}
    assert len(OPERATIONS) == 15
    assert np.array_equal(apply["Invert"](9), 255 - pixels)
    assert np.array_equal(apply["Solarize"](10), 255 - pixels)  # increasing: threshold 0 inverts everything
    assert np.array_equal(apply["Solarize"](0), pixels)  # threshold 256 inverts nothing
    assert np.array_equal(apply["Posterize"](0), pixels & 0xF0)  # increasing: 4 bits at level 0
    assert np.array_equal(apply["Posterize"](9), pixels & 0x80)  # ... 1 bit at level 9
    assert np.array_equal(apply["SolarizeAdd"](10), np.where(pixels < 128, np.minimum(pixels + 110, 255), pixels))
    for name in ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"):
        assert np.array_equal(apply[name](0), pixels), name  # level 0: the identity
    for name in ("Color", "Contrast", "Brightness", "Sharpness"):
        assert np.array_equal(apply[name](0), pixels), name  # increasing: factor 1 at level 0
    fill = [round(255 * m) for m in MEAN]
    shifted = np.asarray(OPERATIONS["TranslateXRel"](image, 0.25, MEAN), dtype=np.int64)  # 6 of 24 columns
    assert np.array_equal(shifted[:, :18], pixels[:, 6:]) and (shifted[:, 18:] == fill).all()


def test_increasing_set_grows_with_the_level():
    rng = np.random.default_rng(1)
    levels = np.linspace(0, 10, 11)
    bits = [_argument("Posterize", lv, True, rng) for lv in levels]
    thresholds = [_argument("Solarize", lv, True, rng) for lv in levels]
    strength = [abs(_argument("Contrast", lv, True, rng) - 1) for lv in levels]
    assert bits == sorted(bits, reverse=True) and thresholds == sorted(thresholds, reverse=True)
    assert strength == sorted(strength) and strength[-1] == pytest.approx(0.9)
    assert abs(_argument("Rotate", 10, True, rng)) == 30 and abs(_argument("ShearX", 10, True, rng)) == 0.3


def test_rand_augment_is_seeded_and_respects_its_probability():
    image, spec = _image(), parse_rand_augment("rand-m9-mstd0.5-inc1")
    outs = [np.asarray(rand_augment(image, spec, np.random.default_rng([7, i]), MEAN)) for i in range(12)]
    again = [np.asarray(rand_augment(image, spec, np.random.default_rng([7, i]), MEAN)) for i in range(12)]
    assert all(np.array_equal(a, b) for a, b in zip(outs, again))
    assert len({o.tobytes() for o in outs}) > 6  # different samples get different operations
    never = parse_rand_augment("rand-m9-p0")
    assert np.array_equal(np.asarray(rand_augment(image, never, np.random.default_rng(0), MEAN)), np.asarray(image))
    gray = Image.fromarray(np.asarray(image)[..., 0])  # one channel: every operation keeps mode L
    for i in range(20):
        assert rand_augment(gray, parse_rand_augment("rand-m9-p1.0-n4"), np.random.default_rng(i), (0.5,)).mode == "L"


def test_random_erase_replaces_one_rectangle():
    x = torch.full((3, 32, 32), 7.0)
    for seed in range(20):
        out = random_erase(x, np.random.default_rng(seed))
        changed = (out != 7.0).any(0)
        rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
        h, w = int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)
        assert int(changed.sum()) == h * w  # a filled rectangle ...
        assert 0.02 * 1024 * 0.5 <= h * w <= 1024 / 3 * 1.5  # ... of the drawn area (rounding aside)
        assert torch.equal(x, torch.full((3, 32, 32), 7.0))  # the input is not modified
        assert abs(float(out[:, changed].mean())) < 1.0  # standard normal values


def test_color_jitter_factors():
    gray = torch.full((3, 6, 6), 0.4)  # equal channels, one colour: only brightness can change it
    for seed in range(10):
        out = color_jitter(gray, 0.4, np.random.default_rng(seed))
        assert torch.allclose(out, out[0, 0, 0].expand_as(out)) and 0.4 * 0.6 - 1e-6 <= out[0, 0, 0] <= 0.4 * 1.4
    single = torch.rand(1, 5, 5, generator=torch.Generator().manual_seed(0))
    assert color_jitter(single, 0.5, np.random.default_rng(0)).shape == (1, 5, 5)
    assert torch.equal(color_jitter(single, 0.0, np.random.default_rng(0)), single)


def test_bicubic_resize_is_clamped_and_differs_from_bilinear():
    x = (torch.arange(64.0).view(1, 8, 8) % 2)  # a stripe pattern: bicubic overshoots here
    bicubic, bilinear = resize(x, (5, 5), "bicubic"), resize(x, (5, 5), "bilinear")
    assert bicubic.min() >= 0 and bicubic.max() <= 1 and not torch.allclose(bicubic, bilinear)


def test_transform_order_seeding_and_errors():
    image = np.random.default_rng(0).integers(0, 256, (3, 40, 36), dtype=np.uint8)
    kw = dict(size=(32, 32), mean=MEAN, std=(0.229, 0.224, 0.225))
    full = ImageTransform(train=True, interpolation="bicubic", auto_augment="rand-m9-mstd0.5-inc1",
                          random_erase_prob=0.25, color_jitter=0.4, **kw)
    a = [full(image, np.random.default_rng([3, i])) for i in range(8)]
    assert all(torch.equal(x, full(image, np.random.default_rng([3, i]))) for i, x in enumerate(a))
    assert a[0].shape == (3, 32, 32)
    plain = ImageTransform(train=True, **kw)
    b = [plain(image, np.random.default_rng([3, i])) for i in range(8)]
    assert all(not torch.equal(x, y) for x, y in zip(a, b))
    # evaluation ignores every augmentation but honours the interpolation
    ev = ImageTransform(train=False, interpolation="bicubic", auto_augment="rand-m9", random_erase_prob=1.0, **kw)
    assert torch.equal(ev(image), ImageTransform(train=False, interpolation="bicubic", **kw)(image))
    assert not torch.equal(ev(image), ImageTransform(train=False, **kw)(image))
    for bad, match in ((dict(interpolation="nearest"), "--interpolation"), (dict(color_jitter=-1), "--color-jitter"),
                       (dict(random_erase_prob=2), "--random-erase-prob"), (dict(auto_augment="aa-v0"),
                                                                            "--auto-augment")):
        with pytest.raises(ValueError, match=match):
            ImageTransform(train=True, **kw, **bad)


def _vit_dry_run(*flags: str) -> dict:
    import pretrain_vit_ls

    return pretrain_vit_ls.main(["--data-path", "/nonexistent", "--img-h", "16", "--img-w", "16", "--patch-dim", "4",
                                 "--num-classes", "4", "--num-layers", "1", "--hidden-size", "16",
                                 "--num-attention-heads", "2", "--window-size", "2", "--projection-rank", "2",
                                 "--micro-batch-size", "1", "--global-batch-size", "1", "--train-iters", "1",
                                 "--dry-run", *flags])


def test_pretrain_vit_flags():
    result = _vit_dry_run("--auto-augment", "rand-m9-mstd0.5-inc1", "--random-erase-prob", "0.25",
                          "--color-jitter", "0.4", "--interpolation", "bicubic")
    assert np.isfinite(result["loss"])
    from megatron_ls.config import ConfigError

    with pytest.raises(ConfigError, match="--auto-augment 'rand-m9-q1': unknown option 'q1'"):
        _vit_dry_run("--auto-augment", "rand-m9-q1")
    with pytest.raises(ConfigError, match="--random-erase-prob must be in"):
        _vit_dry_run("--random-erase-prob", "1.5")
    with pytest.raises(ConfigError, match="--normalization RMSNorm, --disable-bias-linear: GPT-LS options, not "
                                          "built for the vision"):
        _vit_dry_run("--normalization", "RMSNorm", "--disable-bias-linear")
    import pretrain_vit_ls

    with pytest.raises(ConfigError, match="--mock-data is GPT-LS's synthetic text"):
        pretrain_vit_ls.main(["--mock-data", "--img-h", "16", "--img-w", "16", "--patch-dim", "4", "--dry-run"])
