"""GPT-LS as a DeepSpeed ``PipelineModule``: the same layers as ``GPTModel``, cut into stages.

Stage contents: [embedding (tied)] + transformer layers + [final norm, LM head (tied to the embedding, or with
``--untie-embeddings-and-output-weights`` its own ``OutputLayer``)]. Layers are
balanced by counting ``TransformerLayer``s. Every layer seeds its own initialisation (``init_rng``), so a stage that
builds only its own layers gets exactly the weights a single-process ``GPTModel`` has.
"""
from __future__ import annotations

import torch
from torch import nn

from megatron_ls.config import TransformerConfig
from megatron_ls.model.gpt import GPTEmbedding, OutputLayer, language_model_loss
from megatron_ls.model.transformer import TransformerLayer
from megatron_ls.parallel.sequence_parallel import LayerNorm, RMSNorm


class FinalLayerNorm(LayerNorm):
    """The last LayerNorm before the LM head, as its own pipeline layer."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__(config.hidden_size, eps=config.layernorm_epsilon, sequence_parallel=config.sequence_parallel)


class FinalRMSNorm(RMSNorm):
    """The last RMSNorm before the LM head (``--normalization RMSNorm``), as its own pipeline layer."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__(config.hidden_size, eps=config.layernorm_epsilon, sequence_parallel=config.sequence_parallel)


def _lm_head_forward(embedding: GPTEmbedding, hidden: torch.Tensor) -> torch.Tensor:
    return embedding.lm_logits(hidden)


def pipeline_loss(logits: torch.Tensor, labels_and_mask: tuple) -> torch.Tensor:
    """Last-stage loss: mean cross entropy over unmasked tokens of the micro-batch (under context parallelism
    this rank's CP-scaled term; the engine averages it over its data axis, DP x CP)."""
    labels, loss_mask = labels_and_mask
    return language_model_loss(logits, labels, loss_mask)


def build_gpt_pipeline(config: TransformerConfig, activation_checkpoint_interval: int | None = None) -> nn.Module:
    """A ``deepspeed.pipe.PipelineModule`` over the current TP/CP/DP/PP layout (parallel state initialised).

    DeepSpeed's topology has axes (pipe, data, model); context-parallel ranks hold the same weights, so its data
    axis is DP x CP. With our rank order ``((pp*DP + dp)*CP + cp)*TP + tp`` that is exactly
    ``PipeModelDataParallelTopology(num_pp=PP, num_mp=TP, num_dp=DP*CP)`` with data index ``dp*CP + cp``, so the
    engine's data-parallel gradient reduction, its loss average and each tied-embedding group (first + last
    stage of one (dp, cp) pipeline) come out right.
    """
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    from megatron_ls.parallel import state as ps

    pp = ps.get_pipeline_model_parallel_world_size()
    tp = ps.get_tensor_model_parallel_world_size()
    dp = ps.get_data_parallel_world_size_with_context_parallel()
    if config.num_layers % pp:
        raise ValueError(f"--num-layers {config.num_layers} is not divisible by --pipeline-model-parallel-size {pp}")
    specs = [TiedLayerSpec("embed", GPTEmbedding, config, tied_weight_attr="word_embeddings.weight")]
    specs += [LayerSpec(TransformerLayer, config, i) for i in range(config.num_layers)]
    specs.append(LayerSpec(FinalRMSNorm if config.normalization == "RMSNorm" else FinalLayerNorm, config))
    if config.untie_embeddings_and_output_weights:
        specs.append(LayerSpec(OutputLayer, config))
    else:
        specs.append(TiedLayerSpec("embed", GPTEmbedding, config, forward_fn=_lm_head_forward,
                                   tied_weight_attr="word_embeddings.weight"))
    interval = activation_checkpoint_interval
    if interval is None:  # full recomputation of uniform groups; selective happens inside each layer
        interval = (config.recompute_num_layers or 1) if config.recompute_granularity == "full" else 0
        if config.recompute_granularity == "full" and config.recompute_method == "block":
            raise ValueError("--recompute-method block is not available with pipeline parallelism; use uniform")
    from megatron_ls.parallel.random import checkpoint as rng_checkpoint

    return PipelineModule(layers=specs, loss_fn=pipeline_loss,
                          topology=PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp),
                          partition_method="type:TransformerLayer", activation_checkpoint_interval=interval,
                          activation_checkpoint_func=rng_checkpoint)
