"""
Structured pruning of the base (ALGORITHMS.md §2, §5): the 20% / 50% table and the ranking test of the criteria.

    python experiments/table_structured.py table   [--sparsities 0.2,0.5] [--limit 100] [--ppl_pages 5] [--ppl_windows 100]
                                             [--steps 200] [--dry_run]
    python experiments/table_structured.py report  # the table of the rows evaluated so far (results/structured); runs nothing
    python experiments/table_structured.py speed   # inference tokens/s and weight memory: dense against each pruned model
    python experiments/table_structured.py ranking [--heads 64] [--blocks 64] [--block 32] [--tokens 2048]
    python experiments/plot_structured.py    # kept heads / MLP width per layer of every method

table: one row per model, each evaluated by eval.py on the seven zero-shot tasks (the first --limit rows of each)
and on WikiText-2 (lm-eval's word perplexity over the first --ppl_pages pages; LLM-Pruner's token perplexity over
the first --ppl_windows windows of 128 tokens); a limit of 0 means all rows (the GPU's table):
  dense;
  magnitude / random / wanda / llm_pruner, one shot (prune.py, calibration: --calib_tokens of pydocs), without
  recovery, and each followed by the same LoRA recovery budget (train.py config/structured_recover.py: --steps
  optimizer steps of --batch_size x --block_size tokens, r=8, on --data);
  loraprune: iterative pruning during a LoRA fine-tune of the same steps on the same data (config/loraprune.py);
  lorashear: `python lorashear.py --eval` writes its rows with the same evaluation (evaluate() below).
Sparsity = the fraction of ALL parameters removed (embeddings included, LoRA excluded); the achieved fraction
of every row is in the table. Every step is skipped when its output exists (the zero-shot log-likelihoods are
kept as they are computed, eval.py --use_cache), so a stopped run resumes. Results: results/structured/<row>.json
(eval.py's numbers + parameters, per-layer widths, training tokens), table.json and a markdown table at the end.

ranking: for a sample of groups (query heads; blocks of MLP channels, one layer each), the Spearman rank
correlation between each criterion's group score and the actual increase of the held-out loss (data/pydocs
val windows) when that one group alone is masked. Results: results/structured/ranking.json.
"""
import argparse
import copy
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import prune  # noqa: E402
from lora import apply_lora  # noqa: E402
from results import MC_TASKS as TASKS, REPORTED, merge_results, read_results  # noqa: E402
from model import Transformer  # noqa: E402

MODEL = ROOT / "models" / "smollm2-135m-instruct"
OUT, RESULTS = ROOT / "out" / "structured", ROOT / "results" / "structured"
ONE_SHOT = ("magnitude", "random", "wanda", "llm_pruner")
LIMIT, PPL_PAGES, PPL_WINDOWS = 100, 5, 100  # CPU: zero-shot rows per task, WikiText-2 pages and 128-token windows


# ----------------------------------------------------------------------------- the table
def train_cmd(config, model_dir, out_dir, args, extra=()):
    """train.py LoRA-fine-tunes model_dir and writes the merged (for loraprune: also compacted) model to
    out_dir/merged, an ordinary model folder."""
    return [sys.executable, "train.py", f"config/{config}.py", f"--model={model_dir}", f"--out_dir={out_dir}",
            f"--max_iters={args.steps}", f"--batch_size={args.batch_size}", f"--block_size={args.block_size}",
            f"--dataset={args.data}", *extra]


def same_value(a, b):
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return str(a) == str(b)


def continue_or_restart(cmd):
    """A train.py command as it should run now: with --init_from=resume where a run of the same settings stopped
    before its end left a checkpoint in its out_dir; a finished run there, or one of other settings, is removed
    first (out_dir is this script's own folder for the row, whose result was not kept), so the row is made anew."""
    settings = dict(a[2:].split("=", 1) for a in map(str, cmd) if a.startswith("--"))
    out_dir = Path(settings["out_dir"])
    if (out_dir / "ckpt.pt").exists():
        ckpt = torch.load(out_dir / "ckpt.pt", map_location="cpu", weights_only=True)
        same = all(same_value(ckpt["config"].get(k), v) for k, v in settings.items())
        if same and ckpt["iter_num"] < int(settings["max_iters"]):
            print(f"[resume] {out_dir} from iter {ckpt['iter_num']}", flush=True)
            return [*cmd, "--init_from=resume"]
    if out_dir.exists():
        print(f"[restart] {out_dir}: an earlier run of this row, finished or of other settings, is removed", flush=True)
        shutil.rmtree(out_dir)
    return cmd


def run(cmd, done, dry_run):
    """Run cmd unless its output `done` exists already."""
    if Path(done).exists():
        print(f"[have] {done}")
        return
    print("[run]", " ".join(map(str, cmd)), flush=True)
    if not dry_run:
        t0 = time.time()
        cmd = continue_or_restart(cmd) if "train.py" in cmd else cmd
        subprocess.run(list(map(str, cmd)), check=True, cwd=ROOT)
        print(f"[done] {time.time() - t0:.0f}s", flush=True)


def model_facts(model_dir):
    """Parameters and per-layer widths (query heads, key/value heads, MLP channels) of a model folder."""
    model = Transformer.from_pretrained(model_dir)
    layers = model.model.layers
    return dict(params=prune.count_params(model), heads=[b.self_attn.n_head for b in layers],
                kv_heads=[b.self_attn.n_kv_head for b in layers], widths=[b.mlp.down_proj.in_features for b in layers])


def evaluate(model_dir, name, limit=LIMIT, ppl_pages=PPL_PAGES, ppl_windows=PPL_WINDOWS, train_tokens=0,
             dry_run=False):
    """eval.py on one row of the table, into results/structured/<name>.json: the seven zero-shot tasks (first
    `limit` rows of each; 0 = all), WikiText-2's word perplexity (first `ppl_pages` pages; 0 = all) and token
    perplexity (first `ppl_windows` windows of 128 tokens), with the model's facts."""
    result = RESULTS / f"{name}.json"
    if result.exists():
        print(f"[have] {result}")
        return
    options = {"zeroshot": {"--limit": limit, "--use_cache": OUT / "eval" / f"{name}-cache"},  # --limit 0: all rows
               "wikitext2": {"--limit": ppl_pages, "--ppl_windows": ppl_windows}}
    parts = {}
    for task, opts in options.items():  # the zero-shot log-likelihoods go to a cache as they come: a rerun resumes
        parts[task] = OUT / "eval" / f"{name}-{task}.json"
        flags = [x for flag, value in opts.items() if value or flag == "--ppl_windows" for x in (flag, value)]
        run([sys.executable, "eval.py", "--model", model_dir, "--tasks", task, "--output", parts[task], *flags],
            result, dry_run)
    if dry_run:
        return
    limits = dict(zeroshot=limit, wikitext2_pages=ppl_pages, wikitext2_windows=ppl_windows)
    out = dict(merge_results(parts.values()), limit=limits, train_tokens=train_tokens, **model_facts(model_dir))
    RESULTS.mkdir(parents=True, exist_ok=True)
    result.write_text(json.dumps(out, indent=1) + "\n")


def table(args):
    tokens = args.steps * args.batch_size * args.block_size
    evaluate(args.model, "dense", args.limit, args.ppl_pages, args.ppl_windows, dry_run=args.dry_run)
    for sp in args.sparsities:
        for method in ONE_SHOT:
            name = f"{method}-{sp:g}"
            run([sys.executable, "prune.py", "--model", args.model, "--method", method, "--sparsity", sp,
                 "--calib", "pydocs", "--calib_tokens", args.calib_tokens, "--out_dir", OUT / name], OUT / name, args.dry_run)
            evaluate(OUT / name, name, args.limit, args.ppl_pages, args.ppl_windows, dry_run=args.dry_run)
            run(train_cmd("structured_recover", OUT / name, OUT / f"{name}-lora", args),
                OUT / f"{name}-lora" / "merged", args.dry_run)
            evaluate(OUT / f"{name}-lora" / "merged", f"{name}-lora", args.limit, args.ppl_pages, args.ppl_windows,
                     tokens, args.dry_run)
        name = f"loraprune-{sp:g}"
        run(train_cmd("loraprune", args.model, OUT / name, args, [f"--struct_sparsity={sp}",
                                                                   f"--struct_every={args.struct_every}"]),
            OUT / name / "merged", args.dry_run)
        evaluate(OUT / name / "merged", name, args.limit, args.ppl_pages, args.ppl_windows, tokens, args.dry_run)
    if not args.dry_run:
        report(args)


def row_order(sparsities):
    names = ["dense"]
    for sp in sparsities:
        names += [f"{m}-{sp:g}" for m in ONE_SHOT] + [f"{m}-{sp:g}-lora" for m in ONE_SHOT]
        names += [f"loraprune-{sp:g}", f"lorashear-{sp:g}", f"lorashear_halfspace-{sp:g}"]
    return names


def saved_sparsities():
    """The sparsities of every row evaluated so far (its result is <method>-<sparsity>[-lora].json)."""
    found = (re.search(r"-(\d*\.?\d+)(-lora)?$", f.stem) for f in RESULTS.glob("*.json"))
    return {float(m.group(1)) for m in found if m}


def report(args):
    """The markdown table of the rows of --sparsities evaluated so far; results/structured/table.json, of every
    row evaluated so far (a run at one sparsity keeps the others' rows there)."""
    every = sorted(set(args.sparsities) | saved_sparsities())
    rows = {n: json.loads((RESULTS / f"{n}.json").read_text()) for n in row_order(every)
            if (RESULTS / f"{n}.json").exists()}
    shown = set(row_order(args.sparsities))
    if "dense" not in rows:
        raise SystemExit(f"no {RESULTS / 'dense.json'} yet: run `python experiments/table_structured.py table` first")
    dense, limits = rows["dense"]["params"], rows["dense"]["limit"]
    print(f"\nSmolLM2-135M-Instruct; zero-shot: first {limits['zeroshot'] or 'all'} rows of each task (acc_norm, "
          f"acc for boolq/piqa/winogrande); WikiText-2: token perplexity over the first "
          f"{limits['wikitext2_windows'] or 'all'} windows of 128 tokens (LLM-Pruner's), word perplexity over the first "
          f"{limits['wikitext2_pages'] or 'all'} pages (lm-eval's); removed = fraction of all parameters; tokens = "
          f"LoRA training tokens\n")
    print("| row | removed | tokens | wikitext2 ppl (128) | word ppl | " + " | ".join(TASKS) + " | average |")
    print("|---" * (len(TASKS) + 6) + "|")
    summary = {}
    for name, res in rows.items():
        if res["limit"] != limits:
            print(f"(skipped {name}: evaluated with {res['limit']}, not {limits})")
            continue
        tasks = read_results(RESULTS / f"{name}.json")  # lm-eval's layout, or eval.py's earlier one
        accs = [100 * tasks[t][f"{REPORTED[t]},none"] for t in TASKS]
        summary[name] = dict(removed=1 - res["params"] / dense, train_tokens=res["train_tokens"],
                             token_perplexity=tasks["wikitext2"]["token_perplexity"],
                             word_perplexity=tasks["wikitext2"]["word_perplexity,none"], accuracy=dict(zip(TASKS, accs)),
                             average=statistics.mean(accs), heads=res["heads"], widths=res["widths"])
        s = summary[name]
        if name not in shown:
            continue
        print(f"| {name} | {s['removed']:.1%} | {s['train_tokens']:,} | {s['token_perplexity']:.1f} | "
              f"{s['word_perplexity']:.1f} | "
              + " | ".join(f"{a:.1f}" for a in accs) + f" | {s['average']:.2f} |")
    (RESULTS / "table.json").write_text(json.dumps(dict(limit=limits, rows=summary), indent=1) + "\n")


# ----------------------------------------------------------------------------- inference speed and memory
@torch.inference_mode()
def speed(args):
    """Prefill (1 x --prompt tokens) and greedy decoding (--new tokens) of dense and every pruned model folder
    (one per method and sparsity, before recovery: recovery does not change the shapes); weight memory."""
    torch.set_num_threads(args.threads)
    folders = {"dense": args.model}
    for sp in args.sparsities:  # loraprune's shapes are the one-shot methods' (the same plan); lorashear's its own
        folders |= {f"{m}-{sp:g}": OUT / f"{m}-{sp:g}" for m in ONE_SHOT}
        folders[f"lorashear-{sp:g}"] = ROOT / "out" / "lorashear" / f"lorashear-{sp:g}"
    folders = {name: folder for name, folder in folders.items() if (Path(folder) / "config.json").exists()}
    prompt = torch.randint(0, 1000, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    out = {}
    for name, folder in folders.items():
        model = Transformer.from_pretrained(folder, dtype=torch.float32).eval()
        times = {"prefill": [], "decode": []}
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            model(prompt, last_only=True)
            t1 = time.perf_counter()
            model.generate(prompt[:, :8], args.new, stop_ids=())
            times["prefill"].append(t1 - t0)
            times["decode"].append(time.perf_counter() - t1)
        out[name] = dict(params=prune.count_params(model),
                         weight_mib=sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
                         prefill_tok_s=args.prompt / statistics.median(times["prefill"]),
                         decode_tok_s=args.new / statistics.median(times["decode"]))
        o = out[name]
        print(f"{name:>16}: {o['params'] / 1e6:6.1f}M parameters, {o['weight_mib']:6.0f} MiB float32, prefill "
              f"{o['prefill_tok_s']:7.0f} tok/s, decode {o['decode_tok_s']:5.1f} tok/s", flush=True)
    settings = dict(prompt=args.prompt, new=args.new, repeats=args.repeats, threads=args.threads, dtype="float32",
                    device="cpu")
    (RESULTS / "speed.json").write_text(json.dumps(dict(settings=settings, rows=out), indent=1) + "\n")


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
    from prunedlora import spearman  # Spearman's rank correlation, as PrunedLoRA's ranking test computes it
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
        result["spearman"][method] = {k: spearman(predicted[k], actual[k]) for k in predicted}
        print(f"{method:>16}: Spearman heads {result['spearman'][method]['heads']:+.3f}  "
              f"channel blocks {result['spearman'][method]['blocks']:+.3f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ranking.json").write_text(json.dumps(result, indent=1))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("what", choices=("table", "report", "speed", "ranking"))
    p.add_argument("--model", type=Path, default=MODEL)
    p.add_argument("--sparsities", default="0.2,0.5")
    p.add_argument("--limit", type=int, default=LIMIT, help="zero-shot rows per task (0: all, the GPU's table)")
    p.add_argument("--ppl_pages", type=int, default=PPL_PAGES, help="WikiText-2 pages of the word perplexity (0: all 62)")
    p.add_argument("--ppl_windows", type=int, default=PPL_WINDOWS, help="128-token windows of the token perplexity (0: all)")
    p.add_argument("--steps", type=int, default=200, help="LoRA recovery / LoRAPrune optimizer steps")
    p.add_argument("--batch_size", type=int, default=1, help="sequences per step (recovery and LoRAPrune)")
    p.add_argument("--block_size", type=int, default=256, help="tokens per sequence (recovery and LoRAPrune)")
    p.add_argument("--struct_every", type=int, default=10, help="LoRAPrune: optimizer steps between pruning events")
    p.add_argument("--data", default="alpaca", help="recovery data (data/<name>); LLM-Pruner recovers on Alpaca")
    p.add_argument("--calib_tokens", type=int, default=8192)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--heads", type=int, default=64)
    p.add_argument("--blocks", type=int, default=64)
    p.add_argument("--block", type=int, default=32, help="MLP channels per block in the ranking test")
    p.add_argument("--tokens", type=int, default=2048, help="held-out tokens of the ranking test")
    p.add_argument("--dry_run", action="store_true", help="print the commands of the table only")
    p.add_argument("--prompt", type=int, default=256, help="speed: prefill tokens")
    p.add_argument("--new", type=int, default=64, help="speed: generated tokens")
    p.add_argument("--repeats", type=int, default=3, help="speed: timings per model (the median is reported)")
    p.add_argument("--threads", type=int, default=2, help="speed: torch CPU threads")
    args = p.parse_args()
    try:
        args.sparsities = [float(s) for s in args.sparsities.split(",")]
    except ValueError:
        p.error(f"--sparsities {args.sparsities!r}: expected numbers separated by commas")
    if any(not 0 <= sp < 1 for sp in args.sparsities):
        p.error(f"--sparsities {args.sparsities}: each must lie in [0, 1)")
    {"table": table, "report": report, "speed": speed, "ranking": ranking}[args.what](args)


if __name__ == "__main__":
    main()
