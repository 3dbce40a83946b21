"""Per-rank entry point: for each layout, set up the groups and run the requested check suites.

    torchrun --nproc_per_node 4 worker.py --layouts 2,1,1 2,2,1 --suites layers groups rng
"""
from __future__ import annotations

import argparse

import check_groups
import check_layers
import check_model_comm
import check_rng
from _common import finish, run_checks, start
from megatron_ls.parallel import state

SUITES = {"layers": check_layers.checks, "rng": check_rng.checks, "model-comm": check_model_comm.checks}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layouts", nargs="+", required=True, help="tp,pp,cp triples")
    parser.add_argument("--suites", nargs="+", default=["layers"], choices=["layers", "groups", "rng", "model-comm"])
    args = parser.parse_args()
    start()
    for spec in args.layouts:
        key = tuple(int(v) for v in spec.split(","))
        if len(key) != 3:
            raise SystemExit(f"--layouts entry {spec!r} is not tp,pp,cp")
        state.initialize_model_parallel(*key)
        tag = "tp{}pp{}cp{}".format(*key)
        todo = []
        for suite in args.suites:
            todo += check_groups.checks(key) if suite == "groups" else SUITES[suite](tag)
        run_checks(todo)
        state.destroy_model_parallel()
    if "groups" in args.suites:
        run_checks([("bad-size", check_groups.check_bad_size)])
    finish()


if __name__ == "__main__":
    main()
