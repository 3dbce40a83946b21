"""ViT-LS / ViL-LS models in one process: shapes, losses, the released options, presets and the ImageNet recipe."""
import os
import subprocess
from pathlib import Path

import pytest
import torch

from megatron_ls.config import ConfigError, TransformerConfig
from megatron_ls.model.vil import ViLModel, training_flops_per_image
from megatron_ls.model.vit import ViTModel, classification_loss, drop_path
from megatron_ls.model.vit_config import VisionConfig, parse_stages

REPO = Path(__file__).resolve().parents[3]


def _config(**kw):
    base = dict(num_layers=2, hidden_size=16, num_attention_heads=2, window_size=2, projection_rank=2,
                causal=False, position_embedding_type="none", hidden_dropout=0.0, attention_dropout=0.0,
                full_attention_layers=(1,), seed=3)
    base.update(kw)
    return TransformerConfig(**base)


def _vision(**kw):
    base = dict(img_h=16, img_w=12, num_channels=1, patch_dim=4, num_classes=5)
    base.update(kw)
    return VisionConfig(**base)


def test_vit_shapes_losses_and_padding_labels():
    model = ViTModel(_config(), _vision())
    images = torch.randn(3, 1, 16, 12)
    logits = model(images)
    assert logits.shape == (3, 5)
    losses = model(images, torch.tensor([0, 4, -1]))
    assert losses.shape == (3,) and losses[2] == 0 and losses[:2].gt(0).all()
    soft = torch.full((3, 5), 0.2)
    assert torch.allclose(model(images, soft), classification_loss(logits, soft))
    losses[:2].sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_released_options_change_the_model():
    images = torch.randn(2, 1, 16, 12)
    names = {n for n, _ in ViTModel(_config(), _vision()).named_parameters()}
    assert "layers.0.self_attention.relative_position.bias" in names  # LS window bias
    assert "layers.1.self_attention.relative_position.cls.bias" in names  # full layer: grid + CLS biases
    none = {n for n, _ in ViTModel(_config(), _vision(relative_position_bias=False)).named_parameters()}
    assert not any("relative_position" in n for n in none)
    ape = {n for n, _ in ViTModel(_config(position_embedding_type="learned"), _vision()).named_parameters()}
    assert {"embedding.position.rows.bias", "embedding.position.cols.bias"} <= ape
    post = ViTModel(_config(), _vision(cls_attention="post"))(images)
    full = ViTModel(_config(), _vision(cls_attention="full"))(images)
    assert not torch.allclose(post, full)  # same weights (same seed), another CLS rule
    mean = ViTModel(_config(), _vision(pooling="mean"))
    assert mean.embedding.cls_token is None and mean(images).shape == (2, 5)


def test_same_seed_same_weights_and_drop_path():
    a, b = ViTModel(_config(), _vision()), ViTModel(_config(), _vision())
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    x = torch.ones(8, 3, 4)
    assert torch.equal(drop_path(x, 0.5, training=False), x)
    y = drop_path(x, 0.5, training=True)
    per_sample = y.flatten(1)
    assert all(row.eq(0).all() or row.eq(2).all() for row in per_sample)


def test_vil_presets_and_errors():
    stages = parse_stages("medium")
    assert [s.blocks for s in stages] == [1, 4, 16, 1] and [s.long_short for s in stages] == [True, True, False, False]
    assert [s.cls_tokens for s in stages] == [1, 1, 1, 0] and stages[0].rank == 8 and stages[0].window == 7
    medium = ViLModel(_config(), VisionConfig(vil_stages="medium"))
    assert abs(sum(p.numel() for p in medium.parameters()) / 1e6 - 39.8) < 0.05  # the paper's 39.8M
    gmacs = training_flops_per_image(_config(full_attention_layers=()), VisionConfig(vil_stages="medium")) / 6e9
    assert abs(gmacs - 8.7) < 0.1  # the paper's 8.7 G(MAC)s
    tiny = ViLModel(_config(), VisionConfig(img_h=16, img_w=16, num_classes=4, vil_stages="tiny"))
    out = tiny(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]))
    out.sum().backward()
    with pytest.raises(ConfigError, match="patch size 4 does not divide"):
        VisionConfig(img_h=18, img_w=16, vil_stages="tiny").validate()
    with pytest.raises(ConfigError, match="bad item 'x3'"):
        parse_stages("l1,h2,d32,x3")
    with pytest.raises(ConfigError, match="--patch-dim 5 must divide"):
        ViTModel(_config(), _vision(patch_dim=5))


def test_imagenet_recipe_dry_run():
    """Every flag of the ViL-LS-Medium recipe parses, the DeepSpeed config loads, the model builds and takes a
    224x224 batch forward and backward (no data, no cluster)."""
    env = dict(os.environ, DRY_RUN="1", OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(["bash", "examples/vision/imagenet_vil_ls_medium.sh"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ViLModel 39.80M parameters, batch (1, 3, 224, 224)" in proc.stdout
    assert "train_batch_size 1024 (DP=8), ZeRO 1" in proc.stdout


def _fashion_mnist_example(tmp_path, nproc: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, DATA=str(tmp_path), NPROC=str(nproc), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(["bash", "examples/vision/fashion_mnist.sh", "--dry-run", "--save", str(tmp_path / "c")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_fashion_mnist_recipe_dry_run(tmp_path):
    """The Fashion-MNIST example's flags parse and its model (conv stem, 4 LS layers) takes a batch."""
    proc = _fashion_mnist_example(tmp_path, 1)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ViTModel 0.54M parameters, batch (1, 1, 28, 28)" in proc.stdout
    assert "train_batch_size 128 (DP=1)" in proc.stdout
    bad = _fashion_mnist_example(tmp_path, 3)
    assert bad.returncode != 0 and "NPROC=3 must divide the global batch 128" in bad.stderr


@pytest.mark.distributed
def test_fashion_mnist_recipe_dry_run_on_two_data_parallel_ranks(tmp_path):
    """NPROC=2: torchrun starts two ranks of micro-batch 64; the global batch stays 128."""
    proc = _fashion_mnist_example(tmp_path, 2)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("train_batch_size 128 (DP=2)") == 2, proc.stdout


@pytest.mark.parametrize("kernel", [4, 5, 7, 8])
def test_overlapping_patch_embedding_keeps_the_grid_and_sees_neighbours(kernel):
    """--patch-embed-kernel k > p: CvT's overlapping conv tokens, same grid; a patch sees pixels of its neighbours."""
    model = ViTModel(_config(), _vision(patch_embed_kernel=kernel))
    assert model.embedding.proj.kernel_size == (kernel, kernel)
    images = torch.randn(2, 1, 16, 12)
    tokens = model.embedding(images)
    assert tokens.shape == (2, 1 + 4 * 3, 16)
    # a pixel just left of patch (1, 1)'s 4x4 square: inside its receptive field iff the kernel overlaps
    changed = images.clone()
    changed[:, :, 5, 3] += 1.0
    moved = (model.embedding(changed) - tokens).abs().amax(dim=(0, 2))[1:].view(4, 3)
    assert bool(moved[1, 1] > 0) == (kernel > 4)  # padding (k - p + 1) // 2 >= 1 exactly when k > p
    assert moved[1, 0] > 0  # its own patch always


def test_patch_embed_kernel_errors():
    with pytest.raises(ConfigError, match="--patch-embed-kernel 3 must be 0 or >= --patch-dim 4"):
        _vision(patch_embed_kernel=3).validate()
    with pytest.raises(ConfigError, match="not --vil-stages"):
        _vision(img_h=16, img_w=16, patch_embed_kernel=7, vil_stages="tiny").validate()


@pytest.mark.parametrize("stem,proj_kernel", [([8], 2), ([8, 12], 1)])
def test_conv_stem_keeps_the_grid(stem, proj_kernel):
    """--conv-stem-channels: stride-2 3x3 convs (+ channel LN + GELU), then kernel = stride = p / 2^n; same grid,
    a patch sees pixels of its neighbours, and no parameter depends on the batch (no batch norm buffers)."""
    model = ViTModel(_config(), _vision(conv_stem_channels=stem))
    convs = [m for m in model.embedding.stem if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == stem and all(c.stride == (2, 2) for c in convs)
    assert model.embedding.proj.kernel_size == model.embedding.proj.stride == (proj_kernel, proj_kernel)
    assert not list(model.embedding.buffers())
    images = torch.randn(3, 1, 16, 12)
    tokens = model.embedding(images)
    assert tokens.shape == (3, 1 + 4 * 3, 16)
    changed = images.clone()
    changed[:, :, 5, 3] += 1.0  # just left of patch (1, 1)'s 4x4 square: the 3x3 convs reach it
    moved = (model.embedding(changed) - tokens).abs().amax(dim=(0, 2))[1:].view(4, 3)
    assert moved[1, 1] > 0 and moved[1, 0] > 0 and moved[3, 2] == 0
    torch.testing.assert_close(model.embedding(images[:1]), tokens[:1])  # per image: the batch does not matter
    model(images, torch.tensor([0, 1, 2])).sum().backward()
    assert all(c.weight.grad is not None and c.weight.grad.abs().sum() > 0 for c in convs)


def test_conv_stem_errors():
    with pytest.raises(ConfigError, match="need --patch-dim divisible by 8, got 4"):
        _vision(conv_stem_channels=[8, 8, 8]).validate()
    with pytest.raises(ConfigError, match="without --patch-embed-kernel"):
        _vision(conv_stem_channels=[8], patch_embed_kernel=7).validate()
    with pytest.raises(ConfigError, match="must be positive"):
        _vision(conv_stem_channels=[0]).validate()


def test_resume_refuses_another_patch_embedding(tmp_path):
    """pretrain_vit_ls.check_resume names the stem / kernel flags that differ from the checkpoint's."""
    import json
    import sys

    from megatron_ls.checkpoint_files import CheckpointError
    from megatron_ls.model.vit_config import vision_config_to_dict

    sys.path.insert(0, str(REPO))
    from pretrain_vit_ls import check_resume

    tag = tmp_path / "iter_0000002"
    tag.mkdir()
    saved = vision_config_to_dict(_vision(conv_stem_channels=[8, 16]))
    (tag / "megatron_ls.json").write_text(json.dumps({"iteration": 2, "consumed_samples": 8, "vision": saved}))
    (tmp_path / "latest").write_text("iter_0000002")

    class Args:
        class checkpoint:
            load = str(tmp_path)

    check_resume(Args, _vision(conv_stem_channels=[8, 16]))  # the same: accepted
    with pytest.raises(CheckpointError, match=r"--conv-stem-channels is \[8\] here but \[8, 16\] in the checkpoint"):
        check_resume(Args, _vision(conv_stem_channels=[8]))
    with pytest.raises(CheckpointError, match="--patch-embed-kernel is 7 here but 0 in the checkpoint"):
        check_resume(Args, _vision(patch_embed_kernel=7))
