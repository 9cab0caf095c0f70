"""
PrunedLoRA (ALGORITHMS.md §1, issue 6): the rank-pruning table on GSM8K with the default model.

    python experiments/table_prunedlora.py table [--scale cpu-small|gpu] [--seeds 0,1] [--rows a,b] [--dry_run]
    python experiments/table_prunedlora.py rows                       # the rows and their train.py settings
    python experiments/table_prunedlora.py report [--rows a,b]        # the table of the results there are; runs nothing
    python experiments/table_prunedlora.py table --smoke --rows prunedlora_64to8   # a minute: does it all run?

Every row is one train.py run per seed (config/prunedlora_64to8.py or config/prunedlora_lora.py, then
--key=value), on data/gsm8k with the same
number of optimizer steps; the adapter it saves is scored by the held-out answer NLL of the first
--items GSM8K test items (mean over answer tokens, each item alone with its question as context; the
prototype's metric, ALGORITHMS.md §1) and, with --gsm8k, by eval.py's zero-shot chat GSM8K accuracy.
Rows:
  LoRA baselines at the final rank: r=8 alpha=8 (s=1, the pruned runs' scale), r=8 alpha=16, r=64 alpha=64;
  PrunedLoRA 64->8 (the defaults of prunedlora.py: scale-correct Fisher score, compensation with trust region);
  each baseline score 64->8: magnitude, taylor, adalora, random (score only, as published), activation_obs
  (SparseGPT-style, with its own OBS update), prunedlora_paper (the paper's formula and full update);
  ablations: no gradient term (obs), no recovery, magnitude + the same recovery, global allocation,
  recovery on both factors, Newton step on, no trust region, neither (no trust region and both factors);
  (K1, K2) in {(10, 2), (1, 1), (50, 10)};
  r0 in {32, ..., 512} -> 8 with alpha = r0 (K2 scaled so every schedule has the same 28 events; for r0 > 192
  without k_proj / v_proj, which are 192 wide in the default model); alpha in
  {r0, 2 r0, 16} at r0 = 64. Pruning starts after the learning-rate warmup. Seeds: 1337 + seed for train.py.
--scale: gpu (400 steps of 16 x 512 tokens, K1 as written, 3 seeds, 500 items) or cpu-small (80 steps of
2 x 256 tokens, K1 / 5, one seed, 50 items).
Results: results/prunedlora/<row>-s<seed>.json (settings, command, final ranks, every pruning event's
predicted and actual loss change, the ranking test, the metrics), a summary results/prunedlora/table.json,
and a markdown table. A row whose result exists is skipped, so a stopped run resumes.
"""
import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

from lora import load_adapter  # noqa: E402
from model import Transformer  # noqa: E402
from prunedlora import spearman  # noqa: E402
from table_structured import continue_or_restart  # noqa: E402

MODEL = ROOT / "models" / "smollm2-135m-instruct"
OUT, RESULTS = ROOT / "out" / "prunedlora", ROOT / "results" / "prunedlora"
# the size knob: train.py settings, where pruning starts, how K1 scales, seeds and eval items
SCALES = {
    "gpu": dict(train=dict(max_iters=400, warmup_iters=30, block_size=512, batch_size=16, eval_interval=100,
                           eval_iters=20), start=30, k1_factor=1.0, seeds=(0, 1, 2), items=500),
    "cpu-small": dict(train=dict(max_iters=80, warmup_iters=6, block_size=256, batch_size=2, eval_interval=1000,
                                 eval_iters=2, device="cpu"), start=6, k1_factor=0.2, seeds=(0,), items=50),
}
SMOKE = dict(train=dict(max_iters=4, warmup_iters=1, block_size=64, batch_size=1, eval_interval=1000, eval_iters=1,
                        device="cpu"), start=1, k1_factor=0.1, seeds=(0,), items=4)


def rows(scale):
    """{row name: (config file, train.py overrides)}; K1 is scaled by the scale's k1_factor."""
    K1 = lambda k: max(1, round(k * scale["k1_factor"]))
    prune = lambda r0=64, **kw: ("prunedlora_64to8", {"lora_r": r0, "lora_alpha": r0, "rank_start": scale["start"],
                                                      "rank_every": K1(10), **kw})
    table = {
        "lora_r8_a8": ("prunedlora_lora", dict(lora_r=8, lora_alpha=8)),
        "lora_r8_a16": ("prunedlora_lora", dict(lora_r=8, lora_alpha=16)),
        "lora_r64": ("prunedlora_lora", dict(lora_r=64, lora_alpha=64)),
        "prunedlora_64to8": prune(),
        # baseline scores, as published: score only, or (activation_obs, the paper) with their own update
        **{f"{m}_64to8": prune(rank_method=m, rank_recovery=False) for m in ("magnitude", "taylor", "adalora", "random")},
        "activation_obs_64to8": prune(rank_method="activation_obs", rank_tau=0.0),
        "prunedlora_paper_64to8": prune(rank_method="prunedlora_paper", rank_recovery_lr=1.0, rank_tau=0.0,
                                        rank_recovery_side="AB"),
        # ablations of the default
        "abl_no_gradient_term": prune(rank_method="obs"),
        "abl_no_recovery": prune(rank_recovery=False),
        "abl_magnitude_with_recovery": prune(rank_method="magnitude"),
        "abl_global": prune(rank_allocation="global"),
        "abl_recovery_AB": prune(rank_recovery_side="AB"),
        "abl_newton_step": prune(rank_recovery_lr=1.0),
        "abl_no_trust_region": prune(rank_tau=0.0),
        "abl_no_trust_region_AB": prune(rank_tau=0.0, rank_recovery_side="AB"),  # both safety settings off
        "abl_K1_1_K2_1": prune(rank_every=1, rank_k=1),
        "abl_K1_50_K2_10": prune(rank_every=K1(50), rank_k=10),
        "abl_alpha_128": prune(lora_alpha=128),
        "abl_alpha_16": prune(lora_alpha=16),
    }
    for r0 in (32, 128, 256, 512):  # 64 is the main row; K2 keeps the 28 events of 64 -> 8 with K2 = 2
        # lora.py wants r <= min(in, out): the default model's k_proj / v_proj (192 x 576) sit out r0 > 192
        narrow = {"lora_targets": "q_proj,o_proj,gate_proj,up_proj,down_proj"} if r0 > 192 else {}
        table[f"r0_{r0}to8"] = prune(r0, rank_k=math.ceil((r0 - 8) / 28), **narrow)
    return table


def train_cmd(config, overrides, out_dir, scale, seed):
    settings = {**scale["train"], **overrides, "seed": 1337 + seed, "rank_seed": seed, "out_dir": out_dir}
    return [sys.executable, "train.py", f"config/{config}.py", *(f"--{k}={v}" for k, v in settings.items())]


def test_items(n):
    """The first n GSM8K test items of data/gsm8k/test.bin: (tokens, targets with -1 off the answer)."""
    tokens = np.fromfile(ROOT / "data" / "gsm8k" / "test.bin", dtype=np.uint16).astype(np.int64)
    mask = np.fromfile(ROOT / "data" / "gsm8k" / "test_mask.bin", dtype=np.uint8)
    ends = (np.nonzero((mask[:-1] == 1) & (mask[1:] == 0))[0] + 1)[:n]  # an item ends with its response
    items = []
    for start, end in zip(np.concatenate([[0], ends[:-1]]), ends):
        x, y = torch.from_numpy(tokens[start:end - 1]), torch.from_numpy(tokens[start + 1:end])
        items.append((x, torch.where(torch.from_numpy(mask[start + 1:end] == 1), y, -1)))
    return items


@torch.no_grad()
def answer_nll(adapter, items, device, batch_size=8):
    """Mean NLL per answer token of the items, with the adapter loaded onto the default model."""
    model = load_adapter(Transformer.from_pretrained(MODEL, dtype=torch.float32, device=device), adapter).eval()
    total, count = 0.0, 0
    for i in range(0, len(items), batch_size):
        group = items[i:i + batch_size]
        T = max(len(x) for x, _ in group)
        x = torch.stack([torch.cat([x, x.new_zeros(T - len(x))]) for x, _ in group]).to(device)  # right padding
        y = torch.stack([torch.cat([y, y.new_full((T - len(y),), -1)]) for _, y in group]).to(device)
        n = int((y != -1).sum())
        total += model(x, y)[1].item() * n
        count += n
    return total / count


def event_summary(events):
    """What the rank-pruning log says: events, the summed predicted / actual loss change, their rank
    correlation over events, the once-per-run ranking test."""
    if not events:
        return {}
    pred, act = [e["predicted"] for e in events], [e["actual"] for e in events]
    ranking = next((e["ranking"] for e in events if e.get("ranking")), None)
    return dict(events=len(events), predicted_sum=sum(pred), actual_sum=sum(act),
                spearman_over_events=spearman(pred, act) if len(events) > 2 else None,
                ranking_spearman=ranking["spearman"] if ranking else None)


def gsm8k_accuracy(adapter, scale):
    """eval.py's zero-shot GSM8K in the fine-tuning (chat) format on the first `items` test questions."""
    out = adapter.parent / "gsm8k.json"
    device = scale["train"].get("device", "cuda" if torch.cuda.is_available() else "cpu")
    subprocess.run([sys.executable, "eval.py", "--model", MODEL, "--adapter", adapter, "--tasks", "gsm8k",
                    "--gsm8k_mode", "chat", "--limit", str(scale["items"]), "--batch_size", "25", "--device", device,
                    "--output", out], check=True, cwd=ROOT)
    r = json.loads(out.read_text())["results"]["gsm8k"]  # lm-evaluation-harness's layout
    return {f"{ours}{part}": r[f"exact_match{part},{theirs}"] for ours, theirs in
            (("strict_match", "strict-match"), ("flexible_extract", "flexible-extract")) for part in ("", "_stderr")}


def run_row(name, config, overrides, scale, seed, args):
    result_path, out_dir = RESULTS / f"{name}-s{seed}.json", OUT / f"{name}-s{seed}"
    if result_path.exists():
        print(f"[have] {result_path}")
        result = json.loads(result_path.read_text())
        if args.gsm8k and "gsm8k" not in result and not (out_dir / "adapter").exists():
            print(f"[skip] no {out_dir / 'adapter'}: cannot add the GSM8K accuracy to {result_path}")
        elif args.gsm8k and "gsm8k" not in result and not args.dry_run:  # an accuracy pass over earlier runs
            result["gsm8k"] = gsm8k_accuracy(out_dir / "adapter", scale)
            result_path.write_text(json.dumps(result, indent=1))
        return result
    cmd = train_cmd(config, overrides, out_dir, scale, seed)
    print("[run]", " ".join(map(str, cmd)), flush=True)
    if args.dry_run:
        return None
    t0 = time.time()
    cmd = continue_or_restart(cmd)  # a run stopped before its result goes on from its checkpoint
    subprocess.run(list(map(str, cmd)), check=True, cwd=ROOT)
    wall = time.time() - t0
    adapter = out_dir / "adapter"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    log = out_dir / "rank_pruning.jsonl"
    events = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    device = scale["train"].get("device", "cuda" if torch.cuda.is_available() else "cpu")
    result = dict(row=name, seed=seed, config=config, overrides=overrides, command=" ".join(map(str, cmd)),
                  train_wall_s=wall, final_rank=cfg["r"], rank_pattern=cfg["rank_pattern"],
                  answer_nll=answer_nll(adapter, test_items(scale["items"]), device), items=scale["items"],
                  pruning=event_summary(events), events=events)
    if args.gsm8k:
        result["gsm8k"] = gsm8k_accuracy(adapter, scale)
    RESULTS.mkdir(parents=True, exist_ok=True)
    result_path.write_text(json.dumps(result, indent=1))
    return result


def final_ranks(result):
    """'8' when every adapter ends at one rank, else 'mean (min-max)', from the last pruning event."""
    last = result["events"][-1] if result["events"] else None
    if last is None or last["rank_min"] == last["rank_max"]:
        return str(result["final_rank"])
    return f"{last['rank_mean']:.0f} ({last['rank_min']}-{last['rank_max']})"


def summarise(results):
    """Per row: mean (and spread) over seeds of the answer NLL, and the pruning log's figures."""
    table = {}
    for name in dict.fromkeys(r["row"] for r in results):
        rs = [r for r in results if r["row"] == name]
        nll = [r["answer_nll"] for r in rs]
        acc = [100 * r["gsm8k"]["flexible_extract"] for r in rs if "gsm8k" in r]
        table[name] = dict(seeds=len(rs), answer_nll=statistics.mean(nll),
                           answer_nll_sd=statistics.stdev(nll) if len(nll) > 1 else None,
                           gsm8k_flexible=statistics.mean(acc) if acc else None, gsm8k_seeds=len(acc),
                           gsm8k_flexible_sd=statistics.stdev(acc) if len(acc) > 1 else None,
                           train_wall_s=statistics.mean(r["train_wall_s"] for r in rs),
                           final_rank=final_ranks(rs[0]), pruning=rs[0]["pruning"], command=rs[0]["command"])
    return table


def print_table(table, items):
    print(f"\nSmolLM2-135M-Instruct on GSM8K: held-out answer NLL of the first {items} test items (mean ± sd "
          f"over seeds); pruning: summed predicted / actual held-out loss change over the events, Spearman of the "
          f"single-component ranking test\n")
    print("| row | answer NLL | seeds | GSM8K acc % (flexible) | train s | final r | predicted / actual | ranking test |")
    print("|---|---|---|---|---|---|---|---|")
    for name, t in table.items():
        sd = f" ± {t['answer_nll_sd']:.3f}" if t["answer_nll_sd"] is not None else ""
        p = t["pruning"]
        pa = f"{p['predicted_sum']:.3g} / {p['actual_sum']:.3g}" if p else ""
        rk = f"{p['ranking_spearman']:.2f}" if p and p.get("ranking_spearman") is not None else ""
        acc_sd = f" ± {t['gsm8k_flexible_sd']:.1f}" if t.get("gsm8k_flexible_sd") is not None else ""
        acc = f"{t['gsm8k_flexible']:.1f}{acc_sd} ({t['gsm8k_seeds']})" if t["gsm8k_flexible"] is not None else ""
        print(f"| {name} | {t['answer_nll']:.3f}{sd} | {t['seeds']} | {acc} | {t['train_wall_s']:.0f} | "
              f"{t['final_rank']} | {pa} | {rk} |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("table", "rows", "report"))
    p.add_argument("--scale", choices=tuple(SCALES), default="gpu" if torch.cuda.is_available() else "cpu-small")
    p.add_argument("--seeds", help="comma list (default: the scale's)")
    p.add_argument("--rows", help="comma list of row names (default: all)")
    p.add_argument("--gsm8k", action="store_true", help="also eval.py's zero-shot GSM8K accuracy (slow on CPU)")
    p.add_argument("--smoke", action="store_true", help="a few steps and items per row, results under results/tmp")
    p.add_argument("--dry_run", action="store_true", help="print the train.py commands only")
    args = p.parse_args()
    global OUT, RESULTS
    scale = SMOKE if args.smoke else SCALES[args.scale]
    if args.smoke:
        OUT, RESULTS = ROOT / "results" / "tmp" / "prunedlora-out", ROOT / "results" / "tmp" / "prunedlora"
    table = rows(scale)
    if args.what == "rows":
        for name, (config, overrides) in table.items():
            print(f"{name:>28}: config/{config}.py {' '.join(f'--{k}={v}' for k, v in overrides.items())}")
        return
    names = args.rows.split(",") if args.rows else list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        p.error(f"unknown rows {unknown}; known: {', '.join(table)}")
    if args.what == "table":
        try:
            seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else scale["seeds"]
        except ValueError:
            p.error(f"--seeds {args.seeds!r}: expected whole numbers separated by commas")
        for n in names:
            for seed in seeds:
                run_row(n, *table[n], scale, seed, args)  # writes results/prunedlora/<row>-s<seed>.json
    if args.dry_run:
        return
    results = saved_results(list(table))  # table.json sums up every row run so far, not only these
    if not any(r["row"] in names for r in results):
        p.error(f"no results of rows {names} in {RESULTS}: make them with `table`")
    summary = summarise(results)
    (RESULTS / "table.json").write_text(json.dumps(dict(scale="smoke" if args.smoke else args.scale, rows=summary), indent=1))
    print_table({n: row for n, row in summary.items() if n in names}, scale["items"])


def saved_results(names):
    """Every seed's result JSON of the rows `names` there is, in that order."""
    return [json.loads(path.read_text()) for n in names for path in sorted(RESULTS.glob(f"{n}-s*.json"))]


if __name__ == "__main__":
    main()
