"""Runs recipes/finetune_long_context.py with a fault injected into one rank (test helper).

Usage (as the script of ``torchrun`` / ``accelerate launch``)::

    fault_recipe.py --fault {none,raise,hang} --fault-rank 1 --fault-step 3 -- <recipe arguments>

Every rank prints ``fault_recipe rank=R pid=P`` first, so a test can SIGKILL a chosen rank from
outside (``--fault none``). ``raise``: that rank raises in its ``--fault-step``-th optimizer step;
``hang``: it sleeps there forever (its peers wait in the next collective).
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser()
    p.add_argument("--fault", choices=["none", "raise", "hang"], default="none")
    p.add_argument("--fault-rank", type=int, default=1)
    p.add_argument("--fault-step", type=int, default=3)
    args = p.parse_args(argv[:split])
    rank = int(os.environ.get("RANK", "0"))
    # one write call: print() under PYTHONUNBUFFERED writes the text and the newline separately, so
    # two ranks starting together on one pipe could join their lines ("...pid=12fault_recipe rank=0 ...")
    sys.stdout.write(f"fault_recipe rank={rank} pid={os.getpid()}\n")
    sys.stdout.flush()
    if args.fault != "none" and rank == args.fault_rank:
        original, calls = torch.optim.AdamW.step, [0]

        def step(self, *a, **k):
            calls[0] += 1
            if calls[0] == args.fault_step:
                if args.fault == "raise":
                    raise RuntimeError(f"injected failure on rank {rank} in optimizer step {calls[0]}")
                while True:
                    time.sleep(1)
            return original(self, *a, **k)

        torch.optim.AdamW.step = step
    recipe = os.path.join(ROOT, "recipes", "finetune_long_context.py")
    sys.argv = [recipe, *argv[split + 1 :]]
    runpy.run_path(recipe, run_name="__main__")


if __name__ == "__main__":
    main()
