"""torchrun worker: load a TP-sharded training checkpoint into a TP GPTModel and save the full logits (rank 0)."""
import sys

import torch
import torch.distributed as dist

from megatron_ls.config import transformer_config_from_dict
from megatron_ls.model import GPTModel
from megatron_ls.parallel import state as ps
from megatron_ls.parallel.mappings import gather_from_tensor_model_parallel_region
from megatron_ls.training.checkpointing import read_latest_tag, read_metadata, safe_torch_load


def main(load_dir: str, out_path: str) -> None:
    ps.initialize_distributed(backend="gloo", timeout_s=120)
    tp = dist.get_world_size()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    tag = read_latest_tag(load_dir)
    config = transformer_config_from_dict(read_metadata(load_dir, tag)["args"]["model"])
    config.hidden_dropout = config.attention_dropout = 0.0
    model = GPTModel(config).eval()
    rank = ps.get_tensor_model_parallel_rank()
    state = safe_torch_load(f"{load_dir}/{tag}/mp_rank_{rank:02d}_model_states.pt")["module"]
    model.load_state_dict(state)
    tokens = torch.arange(2 * 48).reshape(2, 48) * 7 % 250
    with torch.no_grad():
        logits = gather_from_tensor_model_parallel_region(model(tokens))
    if dist.get_rank() == 0:
        torch.save({"tokens": tokens, "logits": logits}, out_path)
    ps.destroy_model_parallel()
    ps.shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
