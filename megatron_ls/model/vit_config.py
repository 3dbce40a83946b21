"""Vision settings (Megatron's vision flag names) and the ViL-LS multi-scale stage layout.

``VisionConfig`` holds what ``TransformerConfig`` does not: image and patch shape, classes, CLS handling,
position biases, drop-path and, for the multi-scale model, the stages. Stages use the released code's
architecture string (``imagenet/launch/train/*.sh`` of NVIDIA/transformer-ls): stages joined by ``_``, each a
comma list of ``<letter><int>``: ``l`` stage number, ``h`` heads, ``d`` width, ``n`` blocks, ``s`` 1 = long-short /
0 = full attention, ``g`` global (CLS) tokens 0 or 1, ``p`` patch size of the stage's patch embedding (merging),
``f`` window size, ``a`` 1 = absolute position embedding / 0 = relative position bias, ``r`` projection rank.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from megatron_ls.config import ConfigError, _f

# The paper's ViL-LS layouts (Table 3; released launch scripts), for 224 x 224 images.
VIL_PRESETS = {
    "medium": "l1,h3,d96,n1,s1,g1,p4,f7,a0,r8_l2,h3,d192,n4,s1,g1,p2,f7,a0,r8_"
              "l3,h6,d384,n16,s0,g1,p2,f7,a0,r8_l4,h12,d768,n1,s0,g0,p2,f7,a0,r8",
    "base": "l1,h3,d96,n1,s1,g1,p4,f7,a0,r8_l2,h3,d192,n8,s1,g1,p2,f7,a0,r8_"
            "l3,h6,d384,n24,s0,g1,p2,f7,a0,r8_l4,h12,d768,n1,s0,g0,p2,f7,a0,r8",
    # a small layout for tests and CPU runs (two stages)
    "tiny": "l1,h2,d32,n1,s1,g1,p4,f2,a0,r2_l2,h2,d64,n1,s0,g0,p2,f2,a0,r2",
}
_STAGE_KEYS = {"l": 1, "h": 3, "d": 192, "n": 1, "s": 1, "g": 1, "p": 2, "f": 7, "a": 1, "r": 0}


@dataclass(frozen=True)
class StageSpec:
    """One ViL stage: a patch embedding (patch merging after the first), then ``blocks`` layers."""

    heads: int
    width: int
    blocks: int
    long_short: bool
    cls_tokens: int
    patch: int
    window: int
    absolute_position: bool
    rank: int


def parse_stages(text: str) -> list[StageSpec]:
    """The released architecture string (or a preset name) as stages; ConfigError naming ``--vil-stages``."""
    text = VIL_PRESETS.get(text, text)
    stages = []
    for index, chunk in enumerate(text.split("_"), start=1):
        cfg = dict(_STAGE_KEYS)
        for item in chunk.split(","):
            key, value = item[:1], item[1:]
            if key not in cfg or not value.lstrip("-").isdigit():
                raise ConfigError(f"--vil-stages: bad item {item!r} in stage {index} ({chunk!r}); expected "
                                  f"<letter><int> with letters {''.join(_STAGE_KEYS)}")
            cfg[key] = int(value)
        if cfg["l"] != index:
            raise ConfigError(f"--vil-stages: stage {index} is labelled l{cfg['l']}")
        if min(cfg["h"], cfg["d"], cfg["n"], cfg["p"]) < 1 or cfg["d"] % cfg["h"] or cfg["g"] not in (0, 1):
            raise ConfigError(f"--vil-stages: stage {index} ({chunk!r}) needs h, d, n, p >= 1, d divisible by h, "
                              f"g 0 or 1")
        stages.append(StageSpec(cfg["h"], cfg["d"], cfg["n"], bool(cfg["s"]), cfg["g"], cfg["p"], cfg["f"],
                                bool(cfg["a"]), cfg["r"]))
    return stages


@dataclass
class VisionConfig:
    """Image classification: inputs, head, CLS handling, positions, regularisation, multi-scale stages."""

    img_h: int = _f(224, "Image height in pixels.")
    img_w: int = _f(224, "Image width in pixels.")
    num_channels: int = _f(3, "Image channels (1 for Fashion-MNIST, 3 for RGB).")
    patch_dim: int = _f(16, "Patch size in pixels (single-scale ViT-LS).")
    patch_embed_kernel: int = _f(0, "Patch embedding convolution kernel (single-scale ViT-LS): 0 = --patch-dim "
                                    "(non-overlapping patches, the released ViT/ViL); larger = CvT's overlapping "
                                    "convolutional token embedding (stride --patch-dim, padding (k - p + 1) // 2, "
                                    "same grid).")
    conv_stem_channels: list = _f([], "Convolutional stem (single-scale ViT-LS; Xiao et al. 2021, 'Early "
                                      "convolutions help transformers see better'): one 3x3 stride-2 conv + "
                                      "channel LayerNorm + GELU per value, with these output channels, then a "
                                      "conv of kernel = stride = --patch-dim / 2^(values) to the hidden size. "
                                      "Default: none (one conv of kernel --patch-embed-kernel).",
                                  nargs="*", type=int)
    num_classes: int = _f(1000, "Number of classes; must equal the data set's.")
    pooling: str = _f("cls", "Classify the CLS token's output, or the mean of the patch outputs (no CLS token).",
                      choices=("cls", "mean"))
    cls_attention: str = _f("post", "CLS query in long-short layers: 'post' = the released post-CLS (its own key "
                                    "and the patch outputs), 'full' = every token.", choices=("post", "full"))
    relative_position_bias: bool = _f(True, "Turn the learnable relative position bias off (on window keys in "
                                            "long-short layers, on all patch pairs in full layers).",
                                      flag="--no-relative-position-bias")
    drop_path_rate: float = _f(0.0, "Stochastic depth: largest drop-path rate (linear from 0 over the blocks).")
    vil_stages: Optional[str] = _f(None, "Multi-scale ViL-LS: a preset (medium, base, tiny) or the released "
                                         "architecture string (see docs/vision.md). Overrides the single-scale "
                                         "shape flags.")

    @property
    def grid(self) -> tuple[int, int]:
        return self.img_h // self.patch_dim, self.img_w // self.patch_dim

    @property
    def cls_tokens(self) -> int:
        return 1 if self.pooling == "cls" else 0

    def stages(self) -> Optional[list[StageSpec]]:
        return parse_stages(self.vil_stages) if self.vil_stages else None

    def validate(self) -> None:
        """Raise ConfigError naming the flags."""
        problems = []
        for name in ("img_h", "img_w", "num_channels", "patch_dim"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.patch_embed_kernel and not self.patch_dim <= self.patch_embed_kernel:
            problems.append(f"--patch-embed-kernel {self.patch_embed_kernel} must be 0 or >= --patch-dim "
                            f"{self.patch_dim} (a smaller kernel would skip pixels)")
        if self.patch_embed_kernel and self.vil_stages:
            problems.append("--patch-embed-kernel applies to the single-scale ViT-LS, not --vil-stages")
        if self.conv_stem_channels:
            stride = 2 ** len(self.conv_stem_channels)
            if any(c < 1 for c in self.conv_stem_channels):
                problems.append(f"--conv-stem-channels must be positive, got {self.conv_stem_channels}")
            if self.vil_stages or self.patch_embed_kernel:
                problems.append("--conv-stem-channels applies to the single-scale ViT-LS without "
                                "--patch-embed-kernel (and not to --vil-stages)")
            if self.patch_dim % stride:
                problems.append(f"--conv-stem-channels: {len(self.conv_stem_channels)} stride-2 convs need "
                                f"--patch-dim divisible by {stride}, got {self.patch_dim}")
        if self.num_classes < 2:
            problems.append(f"--num-classes must be >= 2, got {self.num_classes}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            problems.append(f"--drop-path-rate must be in [0, 1), got {self.drop_path_rate}")
        if self.vil_stages:
            try:
                stages = self.stages()
                h, w = self.img_h, self.img_w
                for i, st in enumerate(stages, start=1):
                    if h % st.patch or w % st.patch:
                        problems.append(f"--vil-stages stage {i}: patch size {st.patch} does not divide the "
                                        f"{h}x{w} input of that stage (--img-h {self.img_h} --img-w {self.img_w})")
                        break
                    h, w = h // st.patch, w // st.patch
            except ConfigError as exc:
                problems.append(str(exc))
        elif self.patch_dim >= 1 and (self.img_h % self.patch_dim or self.img_w % self.patch_dim):
            problems.append(f"--patch-dim {self.patch_dim} must divide --img-h {self.img_h} and --img-w {self.img_w}")
        if problems:
            raise ConfigError("; ".join(problems))


def vision_config_to_dict(config: VisionConfig) -> dict:
    return dataclasses.asdict(config)


def vision_config_from_dict(values: dict) -> VisionConfig:
    names = {f.name for f in dataclasses.fields(VisionConfig)}
    return VisionConfig(**{k: v for k, v in values.items() if k in names})


@dataclass
class ImageDataConfig:
    """Image decoding, augmentation and the mixing recipe (mixup / cutmix / label smoothing)."""

    crop_scale: list = _f([0.08, 1.0], "Random-resized-crop area fraction range (training).", nargs=2, type=float)
    crop_padding: int = _f(0, "Training crop: pad this many black pixels on each side and take a random crop of "
                              "the image size (random translation, no change of scale) instead of the random "
                              "resized crop; 0 = random resized crop (--crop-scale).")
    hflip_prob: float = _f(0.5, "Horizontal flip probability (training).")
    data_augmentation: bool = _f(True, "Turn crop/flip augmentation off (training images are center-cropped like "
                                       "evaluation ones).", flag="--no-data-augmentation")
    interpolation: str = _f("bilinear", "Resampling of every resize (crops, evaluation): antialiased bilinear, or "
                                        "bicubic as the released recipe (INPUT.INTERPOLATION 3).",
                            choices=("bilinear", "bicubic"))
    auto_augment: str = _f("", "RandAugment after crop and flip, as a timm-style spec (the released recipe: "
                               "rand-m9-mstd0.5-inc1 = 2 ops of magnitude ~N(9, 0.5) from the increasing set, "
                               "each with p 0.5); empty = off. See docs/vision.md.")
    color_jitter: float = _f(0.0, "Brightness/contrast/saturation jitter strength; like the released (timm) "
                                  "recipe it is used only without --auto-augment.")
    random_erase_prob: float = _f(0.0, "Random erasing probability per training image, per-pixel normal values on "
                                       "the normalised image (the released recipe: 0.25; timm's --reprob).")
    eval_crop_fraction: float = _f(0.875, "Evaluation: resize so the center crop is this fraction of the shorter "
                                          "side (1.0 = resize to the image size).")
    image_mean: list = _f([], "Per-channel normalisation mean (default ImageNet's for RGB, 0.5 otherwise).",
                          nargs="*", type=float)
    image_std: list = _f([], "Per-channel normalisation std (default ImageNet's for RGB, 0.5 otherwise).",
                         nargs="*", type=float)
    mixup_alpha: float = _f(0.0, "Mixup Beta(alpha, alpha); 0 = off (the released recipe: 0.8).")
    cutmix_alpha: float = _f(0.0, "CutMix Beta(alpha, alpha); 0 = off (the released recipe: 1.0).")
    mix_prob: float = _f(1.0, "Probability that a micro-batch is mixed (mixup or cutmix).")
    mix_switch_prob: float = _f(0.5, "With both on: probability of cutmix rather than mixup.")
    label_smoothing: float = _f(0.0, "Label smoothing (the released recipe: 0.1).")
    bad_image: str = _f("fail", "An unreadable image file: fail naming it, or skip it (the next image is used, "
                                "a warning counts them).", choices=("fail", "skip"))
