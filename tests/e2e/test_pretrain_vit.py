"""pretrain_vit_ls.py end to end on generated images: log and accuracy lines, TP2 / PP2 / DP2 ZeRO-2 equal one
process (fp32, dropout off), exact resume, ViL-LS under ZeRO-0 and ZeRO-3, consolidation + the eval tool.

The parallel runs share ONE torchrun launch (workers/vit_layouts.py runs the layouts one after another)."""
from __future__ import annotations

import json
import os
import sys

import pytest

from tests.e2e.conftest import run_cli
from tests.vision_data import make_idx_dataset, make_image_folder

pytestmark = [pytest.mark.e2e]

ITERS = 4
# 2 layers: one LS (window 2 on a 4x4 grid, r = 2, RPE, post-CLS), one MASFormer full layer; PP2 puts one per stage;
# a two-conv early-convolution stem in the embedding.
VIT_FLAGS = ["--img-h", "16", "--img-w", "16", "--num-channels", "1", "--patch-dim", "4", "--num-classes", "4",
             "--conv-stem-channels", "4", "8",
             "--num-layers", "2", "--hidden-size", "16", "--num-attention-heads", "2", "--window-size", "2",
             "--projection-rank", "2", "--full-attention-layers", "1", "--micro-batch-size", "2",
             "--global-batch-size", "4", "--train-iters", str(ITERS), "--lr", "3e-3", "--log-interval", "1",
             "--eval-iters", "10", "--seed", "5", "--crop-scale", "0.5", "1.0", "--eval-crop-fraction", "1.0"]
VIL_FLAGS = ["--img-h", "16", "--img-w", "16", "--num-channels", "3", "--num-classes", "4", "--vil-stages", "tiny",
             "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "3", "--log-interval", "1",
             "--eval-iters", "2", "--seed", "5", "--mixup-alpha", "0.8", "--cutmix-alpha", "1.0",
             "--label-smoothing", "0.1", "--drop-path-rate", "0.1"]


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    return make_idx_dataset(str(tmp_path_factory.mktemp("idx")))


@pytest.fixture(scope="module")
def folder_dir(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp("folder")), per_class={"train": 4, "val": 2})


@pytest.fixture(scope="module")
def reference(idx_dir, tmp_path_factory):
    """One plain-python run: its stdout, results JSON and checkpoint."""
    out = tmp_path_factory.mktemp("ref")
    cmd = [sys.executable, "pretrain_vit_ls.py", "--data-path", idx_dir, *VIT_FLAGS, "--save", str(out / "ckpt"),
           "--results-json", str(out / "ref.json")]
    proc = run_cli(cmd, timeout=400)
    return proc.stdout, json.loads((out / "ref.json").read_text())["summary"], out / "ckpt"


def test_log_and_accuracy_lines(reference):
    stdout, summary, _ = reference
    assert " | loss: " in stdout and "lm loss" not in stdout
    assert "top-1 accuracy: " in stdout and "top-5 accuracy: " in stdout
    assert summary["validation_metrics"]["count"] == 22  # the whole split, last batch padded
    assert len(summary["train_losses"]) == ITERS


@pytest.mark.distributed
def test_layouts_match_one_process_and_resume_exactly(reference, idx_dir, folder_dir, tmp_path):
    _, ref, _ = reference
    ckpt = tmp_path / "dp_ckpt"
    layouts = [["tp2", "--tensor-model-parallel-size", "2"],
               ["pp2", "--pipeline-model-parallel-size", "2"],
               ["dp2-zero2", "--zero-stage", "2"],
               ["dp2-zero2-first", "--zero-stage", "2", "--save", str(ckpt), "--exit-interval", "2"],
               ["dp2-zero2-resumed", "--zero-stage", "2", "--load", str(ckpt)]]
    vil = [["vil-zero0", "--data-path", folder_dir, *VIL_FLAGS], ["vil-zero3", "--data-path", folder_dir,
                                                                  *VIL_FLAGS, "--zero-stage", "3"]]
    out = tmp_path / "layouts.json"
    args = []
    for layout in layouts:
        args += [";;", layout[0], "--data-path", idx_dir, *VIT_FLAGS, *layout[1:]]
    for layout in vil:
        args += [";;", *layout]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "tests/e2e/workers/vit_layouts.py", str(out), "--", *args]  # no common flags: each layout has its own
    run_cli(cmd, timeout=900)
    got = json.loads(out.read_text())
    for name in ("tp2", "pp2", "dp2-zero2"):
        assert got[name]["losses"] == pytest.approx(ref["train_losses"], rel=2e-5), name
        val, want = got[name]["validation"], ref["validation_metrics"]
        assert (val["top1"], val["top5"], val["count"]) == (want["top1"], want["top5"], want["count"]), name
        assert val["loss"] == pytest.approx(want["loss"], rel=2e-5), name
    assert got["dp2-zero2-first"]["iteration"] == 2
    resumed = got["dp2-zero2-first"]["losses"] + got["dp2-zero2-resumed"]["losses"]
    assert resumed == got["dp2-zero2"]["losses"]  # bit-exact
    assert got["vil-zero3"]["losses"] == pytest.approx(got["vil-zero0"]["losses"], rel=2e-5)


def test_consolidate_and_evaluate(reference, idx_dir, tmp_path):
    _, summary, ckpt = reference
    from tools.convert_checkpoint import main as convert_main
    from tools.eval_image_classifier import main as eval_main

    convert_main(["--load", str(ckpt), "--consolidated-dir", str(tmp_path / "cons")])
    for path in (ckpt, tmp_path / "cons"):
        result = eval_main(["--load", str(path), "--data-path", idx_dir, "--micro-batch-size", "5"])
        assert result["images"] == 22
        assert result["top1"] == pytest.approx(summary["test_metrics"]["top1"])
        assert result["loss"] == pytest.approx(summary["test_metrics"]["loss"], rel=1e-5)


def test_hflip_tta_sees_an_image_and_its_mirror_alike(reference, idx_dir, tmp_path):
    """With --hflip-tta the data set and its mirrored copy score the same (each view set is the same pair)."""
    from megatron_ls.data.image_idx import read_idx, write_idx
    from tools.eval_image_classifier import main as eval_main

    ckpt = reference[2]
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for name in os.listdir(idx_dir):
        array = read_idx(os.path.join(idx_dir, name))
        write_idx(str(mirror / name.removesuffix(".gz")), array[..., ::-1].copy() if "images" in name else array)
    plain = [eval_main(["--load", str(ckpt), "--data-path", d]) for d in (idx_dir, str(mirror))]
    tta = [eval_main(["--load", str(ckpt), "--data-path", d, "--hflip-tta"]) for d in (idx_dir, str(mirror))]
    assert plain[0]["loss"] != pytest.approx(plain[1]["loss"], rel=1e-6)  # the model is not mirror-symmetric
    assert tta[0]["hflip_tta"] and tta[0]["top1"] == tta[1]["top1"] and tta[0]["top5"] == tta[1]["top5"]
    assert tta[0]["loss"] == pytest.approx(tta[1]["loss"], rel=1e-5)
    assert tta[0]["loss"] != pytest.approx(plain[0]["loss"], rel=1e-6)


def test_use_checkpoint_args_takes_the_vision_settings(reference, idx_dir):
    """--use-checkpoint-args brings the model and vision settings (image size, patch, stem, classes, ...)."""
    bare = [sys.executable, "pretrain_vit_ls.py", "--data-path", idx_dir, "--load", str(reference[2]), "--finetune",
            "--train-iters", "1", "--micro-batch-size", "2", "--global-batch-size", "4", "--eval-iters", "1",
            "--log-interval", "1"]
    refused = run_cli(bare, check=False)
    assert refused.returncode != 0 and "in the checkpoint" in refused.stderr
    out = run_cli([*bare, "--use-checkpoint-args"], timeout=400).stdout
    assert "loaded checkpoint" in out and "top-1 accuracy: " in out
