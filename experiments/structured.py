"""
Structured pruning of the base (ALGORITHMS.md §2, §5): the 20% / 50% table and the ranking test of the criteria.

    python experiments/structured.py table   [--sparsities 0.2,0.5] [--limit 200] [--steps 200] [--dry_run]
    python experiments/structured.py ranking [--heads 64] [--blocks 64] [--block 32] [--tokens 2048]

table: one row per model, each evaluated by eval.py on WikiText-2 (lm-eval's word perplexity, and LLM-Pruner's
token perplexity with windows of 128) and on the seven zero-shot tasks, the first --limit rows of each (CPU):
  dense;
  magnitude / random / wanda / llm_pruner, one shot (prune.py), without recovery;
  the same, each followed by the same LoRA recovery budget (train.py config/structured_recover.py: --steps
  optimizer steps, r=8, on --data);
  loraprune: iterative pruning during LoRA fine-tuning of the same --steps on the same data (train.py
  config/loraprune.py).
Sparsity = the fraction of ALL parameters removed (embeddings included, LoRA excluded); the achieved fraction
of every row is in its pruning.json / printed by prune.py. Every step is skipped when its output exists, so a
stopped run resumes. Results: results/structured/<row>.json and a markdown table at the end.

ranking: for a sample of groups (query heads; blocks of MLP channels, one layer each), the Spearman rank
correlation between each criterion's group score and the actual increase of the held-out loss (data/pydocs
val windows) when that one group alone is masked. Results: results/structured/ranking.json.
"""
import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import prune  # noqa: E402
from lora import apply_lora  # noqa: E402
from model import Transformer  # noqa: E402

MODEL = ROOT / "models" / "smollm2-135m-instruct"
OUT, RESULTS = ROOT / "out" / "structured", ROOT / "results" / "structured"
ONE_SHOT = ("magnitude", "random", "wanda", "llm_pruner")


# ----------------------------------------------------------------------------- the table
def train_cmd(config, model_dir, out_dir, steps, data, extra=()):
    """train.py LoRA-fine-tunes model_dir and writes the merged (for loraprune: also compacted) model to
    out_dir/merged, an ordinary model folder."""
    return [sys.executable, "train.py", f"config/{config}.py", f"--model_dir={model_dir}", f"--out_dir={out_dir}",
            f"--max_iters={steps}", f"--dataset={data}", *extra]


def eval_cmd(model_dir, output, limit):
    return [sys.executable, "eval.py", "--model", str(model_dir), "--tasks", "wikitext2,zeroshot",
            "--limit", str(limit), "--output", str(output)]


def run(cmd, done, dry_run):
    """Run cmd unless its output `done` exists already."""
    if Path(done).exists():
        print(f"[have] {done}")
        return
    print("[run]", " ".join(map(str, cmd)), flush=True)
    if not dry_run:
        t0 = time.time()
        subprocess.run(list(map(str, cmd)), check=True, cwd=ROOT)
        print(f"[done] {time.time() - t0:.0f}s", flush=True)


def table(args):
    rows = [("dense", MODEL)]
    run(eval_cmd(MODEL, RESULTS / "dense.json", args.limit), RESULTS / "dense.json", args.dry_run)
    for sp in args.sparsities:
        for method in ONE_SHOT:
            name = f"{method}-{sp:g}"
            run([sys.executable, "prune.py", "--model", MODEL, "--method", method, "--sparsity", sp,
                 "--calib", "pydocs", "--calib_tokens", args.calib_tokens, "--out", OUT / name], OUT / name, args.dry_run)
            run(train_cmd("structured_recover", OUT / name, OUT / f"{name}-lora", args.steps, args.data),
                OUT / f"{name}-lora" / "merged", args.dry_run)
            rows += [(name, OUT / name), (f"{name}-lora", OUT / f"{name}-lora" / "merged")]
        name = f"loraprune-{sp:g}"
        run(train_cmd("loraprune", MODEL, OUT / name, args.steps, args.data, [f"--struct_sparsity={sp}"]),
            OUT / name / "merged", args.dry_run)
        rows.append((name, OUT / name / "merged"))
    for name, model_dir in rows[1:]:
        run(eval_cmd(model_dir, RESULTS / f"{name}.json", args.limit), RESULTS / f"{name}.json", args.dry_run)
    if not args.dry_run:
        print_table(rows, args.limit)


def print_table(rows, limit):
    tasks = ["boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]
    metric = {"boolq": "acc", "piqa": "acc", "winogrande": "acc"}
    print(f"\nSmolLM2-135M-Instruct, first {limit} rows of each task (acc or acc_norm as the seeds report), "
          f"WikiText-2 word perplexity (lm-eval, first {limit} pages); removed = fraction of all parameters\n")
    print("| row | removed | wikitext2 ppl | " + " | ".join(tasks) + " | average |")
    print("|---" * (len(tasks) + 4) + "|")
    dense = prune.count_params(Transformer.from_pretrained(MODEL))
    for name, model_dir in rows:
        res = json.loads((RESULTS / f"{name}.json").read_text())
        removed = 1 - prune.count_params(Transformer.from_pretrained(model_dir)) / dense
        accs = [100 * res["tasks"][t][metric.get(t, "acc_norm")] for t in tasks]
        print(f"| {name} | {removed:.1%} | {res['tasks']['wikitext2']['word_perplexity']:.2f} | "
              + " | ".join(f"{a:.1f}" for a in accs) + f" | {sum(accs) / len(accs):.2f} |")


# ----------------------------------------------------------------------------- the ranking test
def sample_groups(model, n_heads, n_blocks, block, kept, seed=0):
    """n_heads (layer, head) pairs and n_blocks (layer, `block` channels) from the prunable layers."""
    g = torch.Generator().manual_seed(seed)
    layers = [l for l in range(len(model.model.layers)) if l not in kept]
    heads = [(l, h) for l in layers for h in range(model.model.layers[l].self_attn.n_head)]
    heads = [heads[i] for i in torch.randperm(len(heads), generator=g)[:n_heads].tolist()]
    blocks = []
    for _ in range(n_blocks):
        l = layers[int(torch.randint(len(layers), (1,), generator=g))]
        width = model.model.layers[l].mlp.down_proj.in_features
        blocks.append((l, torch.randperm(width, generator=g)[:block]))
    return heads, blocks


@torch.no_grad()
def loss_increases(model, batch, heads, blocks):
    """The held-out loss increase of masking each group alone."""
    prune.add_masks(model)
    base = prune.batch_loss(model, batch).item()
    out = {"heads": [], "blocks": []}
    for kind, groups in (("heads", heads), ("blocks", blocks)):
        for l, idx in groups:
            mask = model.model.layers[l].self_attn.head_mask if kind == "heads" else model.model.layers[l].mlp.channel_mask
            mask[idx] = 0
            out[kind].append(prune.batch_loss(model, batch).item() - base)
            mask[idx] = 1
    return base, out


def ranking(args):
    torch.manual_seed(0)
    model = Transformer.from_pretrained(args.model, dtype=torch.float32).eval()
    kept = prune.default_kept_layers(len(model.model.layers))
    calib = prune.token_batches("pydocs", args.calib_tokens, args.seq_len, batch_size=4, seed=0)
    held = torch.cat(prune.token_batches("pydocs", args.tokens, args.seq_len, batch_size=4, seed=1, split="val"))
    heads, blocks = sample_groups(model, args.heads, args.blocks, args.block, kept)
    t0 = time.time()
    scores = {"magnitude": prune.magnitude_scores(model), "random": prune.random_scores(model),
              "wanda": prune.wanda_scores(model, calib), "llm_pruner": prune.taylor_scores(model, calib),
              "llm_pruner_2nd": prune.taylor_scores(model, calib, order="second")}
    with_lora = apply_lora(copy.deepcopy(model), r=8, alpha=16)  # a fresh adapter: B = 0, so G_W ~ s G_B A
    scores["loraprune_fresh"] = prune.structured_scores(with_lora, "loraprune", calib)
    del with_lora
    print(f"scores in {time.time() - t0:.0f}s", flush=True)
    t0 = time.time()
    base, actual = loss_increases(model, held, heads, blocks)
    print(f"held-out loss {base:.4f} ({held.numel():,} tokens); {len(heads) + len(blocks)} removals in "
          f"{time.time() - t0:.0f}s", flush=True)
    result = {"model": str(args.model), "heldout_tokens": held.numel(), "calib_tokens": sum(b.numel() for b in calib),
              "base_loss": base, "actual": actual, "heads": heads, "block": args.block, "spearman": {}}
    for method, s in scores.items():
        predicted = {"heads": [s[l]["heads"][h].item() for l, h in heads],
                     "blocks": [s[l]["channels"][idx].sum().item() for l, idx in blocks]}
        result["spearman"][method] = {k: prune.spearman(predicted[k], actual[k]) for k in predicted}
        print(f"{method:>16}: Spearman heads {result['spearman'][method]['heads']:+.3f}  "
              f"channel blocks {result['spearman'][method]['blocks']:+.3f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ranking.json").write_text(json.dumps(result, indent=1))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("table", "ranking"))
    p.add_argument("--model", type=Path, default=MODEL)
    p.add_argument("--sparsities", default="0.2,0.5")
    p.add_argument("--limit", type=int, default=200, help="eval rows per task (pages for WikiText-2) on CPU")
    p.add_argument("--steps", type=int, default=200, help="LoRA recovery / LoRAPrune optimizer steps")
    p.add_argument("--data", default="alpaca", help="recovery data (data/<name>); LLM-Pruner recovers on Alpaca")
    p.add_argument("--calib_tokens", type=int, default=8192)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--heads", type=int, default=64)
    p.add_argument("--blocks", type=int, default=64)
    p.add_argument("--block", type=int, default=32, help="MLP channels per block in the ranking test")
    p.add_argument("--tokens", type=int, default=2048, help="held-out tokens of the ranking test")
    p.add_argument("--dry_run", action="store_true", help="print the commands of the table only")
    args = p.parse_args()
    args.sparsities = [float(s) for s in args.sparsities.split(",")]
    table(args) if args.what == "table" else ranking(args)


if __name__ == "__main__":
    main()
