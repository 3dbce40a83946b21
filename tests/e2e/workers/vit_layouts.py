"""Run several ViT-LS trainings in one torchrun world, one layout after another (saves launches).

    torchrun --nproc_per_node 2 vit_layouts.py OUT.json -- <common pretrain_vit_ls flags> ;; <layout 1> ;; ...

Each layout is ``NAME flag value ...``; between runs the model-parallel groups are rebuilt. Rank 0 writes
``{name: {"losses": [...], "validation": {...}}}``.
"""
import json
import sys

from megatron_ls.training.initialize import select_accelerator

select_accelerator()

import pretrain_vit_ls  # noqa: E402
from megatron_ls.parallel import state as ps  # noqa: E402


def main() -> None:
    out, rest = sys.argv[1], sys.argv[3:]
    chunks, current = [], []
    for token in rest:
        if token == ";;":
            chunks.append(current)
            current = []
        else:
            current.append(token)
    chunks.append(current)
    common, layouts = chunks[0], chunks[1:]
    results = {}
    for name, *flags in layouts:
        summary = pretrain_vit_ls.main(common + flags)
        results[name] = {"losses": summary["train_losses"], "validation": summary.get("validation_metrics"),
                         "iteration": summary["iteration"]}
        ps.destroy_model_parallel()
    import torch.distributed as dist

    if dist.get_rank() == 0:
        with open(out, "w") as fh:
            json.dump(results, fh)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
