"""One PrunedLoRA pruning event of the default model (prunedlora.step, the adapters of a shape stacked per group): the
torch calls it makes and the reads that wait for a result (on a GPU each call is a kernel launch or more and each read
waits for the queue, so these counts are what an event costs there beyond its arithmetic), and its wall time here.
Runs on the CPU.
    python scripts/event_ops.py [--rank0 64] [--events 5] [--model models/smollm2-135m-instruct]
"""
import argparse
import contextlib
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import prunedlora  # noqa: E402
from lora import apply_lora  # noqa: E402
from model import Transformer  # noqa: E402

VIEWS = {"aten::" + name for name in (  # no kernel of their own
    "view", "as_strided", "unsqueeze", "expand", "select", "slice", "transpose", "t", "diagonal", "unbind", "squeeze",
    "permute", "movedim", "_reshape_alias", "reshape", "flatten", "alias", "detach", "lift_fresh", "empty",
    "empty_strided", "empty_like", "split", "narrow", "view_as", "result_type")}
READS = {"aten::_local_scalar_dense", "aten::nonzero"}  # .item(), int(), bool(tensor); nonzero (its size). Not .tolist()
CFG = prunedlora.DEFAULTS | dict(rank_every=1, rank_k=2, rank_target=1, rank_ranking_test=False)


def event(model, optimizer, state, step, profile=False):
    """One step's statistics (not timed), then the event: (seconds, torch profile or None)."""
    idx = torch.randint(0, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(step))
    model(idx, idx)[1].backward()
    prunedlora.accumulate(model, state)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if profile else contextlib.nullcontext() as prof:
        start = time.perf_counter()
        assert prunedlora.step(model, optimizer, step, CFG, state) is not None
    return time.perf_counter() - start, prof


def counts(prof):
    top = [e for e in prof.events() if e.name.startswith("aten::") and not (e.cpu_parent and e.cpu_parent.name.startswith("aten::"))]
    return sum(e.name not in VIEWS for e in top), sum(e.name in READS for e in prof.events())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--model", default="models/smollm2-135m-instruct")
    p.add_argument("--rank0", type=int, default=64)
    p.add_argument("--events", type=int, default=5, help="timed events (an event's cost does not depend on the rank left)")
    args = p.parse_args()
    if 2 * (args.events + 1) > args.rank0 - 1:
        raise SystemExit(f"--rank0 {args.rank0} leaves too few components for {args.events} events of 2")
    torch.manual_seed(0)
    model = apply_lora(Transformer.from_pretrained(args.model), r=args.rank0, alpha=args.rank0).train()
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
    steps, state = itertools.count(1), prunedlora.new_state(CFG)
    _, prof = event(model, optimizer, state, next(steps), profile=True)
    seconds = [event(model, optimizer, state, next(steps))[0] for _ in range(args.events)]
    calls, reads = counts(prof)
    print(f"{calls} torch calls (views not counted), {reads} reads of a result; "
          f"median {statistics.median(seconds):.2f} s per event over {args.events}")


if __name__ == "__main__":
    main()
