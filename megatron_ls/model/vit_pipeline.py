"""ViT-LS as a DeepSpeed ``PipelineModule``: [patch embedding] + layers + [final LN, pooling, classifier].

The stages' layers are the single-process ``ViTModel``'s modules (``embedding``, ``layers.i``, ``head``), each
seeding its own initialisation, so a stage holds exactly the weights the one-process model has; pipeline
checkpoint file ``layer_00`` is the embedding, ``1..L`` the layers, ``L+1`` the head.
"""
from __future__ import annotations

import torch
from torch import nn

from megatron_ls.config import TransformerConfig
from megatron_ls.model.gpt import masked_token_mean
from megatron_ls.model.vit import ClassifierHead, ViTPatchEmbedding, VisionTransformerLayer, check_vit_config, \
    classification_loss, drop_path_rates, vit_layer_kwargs
from megatron_ls.model.vit_config import VisionConfig


def vit_pipeline_loss(logits: torch.Tensor, labels_and_mask: tuple) -> torch.Tensor:
    """Last-stage loss: mean per-image cross entropy of the micro-batch."""
    labels, loss_mask = labels_and_mask
    return masked_token_mean(classification_loss(logits, labels), loss_mask)


def build_vit_pipeline(config: TransformerConfig, vision: VisionConfig) -> nn.Module:
    """A ``deepspeed.pipe.PipelineModule`` over the current TP/DP/PP layout (parallel state initialised)."""
    from deepspeed.pipe import LayerSpec, PipelineModule
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    from megatron_ls.parallel import state as ps

    check_vit_config(config, vision)
    pp = ps.get_pipeline_model_parallel_world_size()
    if config.num_layers % pp:
        raise ValueError(f"--num-layers {config.num_layers} is not divisible by --pipeline-model-parallel-size {pp}")
    rates = drop_path_rates(vision.drop_path_rate, config.num_layers)
    specs = [LayerSpec(ViTPatchEmbedding, config, vision)]
    specs += [LayerSpec(VisionTransformerLayer, config, i, drop_path_rate=rates[i], **vit_layer_kwargs(vision))
              for i in range(config.num_layers)]
    specs.append(LayerSpec(ClassifierHead, config.hidden_size, vision.num_classes, vision.cls_tokens,
                           config.layernorm_epsilon, config.seed))
    topology = PipeModelDataParallelTopology(num_pp=pp, num_mp=ps.get_tensor_model_parallel_world_size(),
                                             num_dp=ps.get_data_parallel_world_size_with_context_parallel())
    from megatron_ls.parallel.random import checkpoint as rng_checkpoint

    return PipelineModule(layers=specs, loss_fn=vit_pipeline_loss, topology=topology,
                          partition_method="type:VisionTransformerLayer",
                          activation_checkpoint_interval=1 if config.recompute_activations else 0,
                          activation_checkpoint_func=rng_checkpoint)
