"""
Kill train.py with SIGKILL at random moments and check that nothing is lost: after every kill the last
checkpoint loads with torch.load(weights_only=True), and resuming from it gives the same next losses as a run
that was never stopped. Half of the kills are aimed at a checkpoint write (the moment out_dir holds a
ckpt.pt.tmp-* file), the others land at a random time after training started.

    python scripts/kill_resume.py [--trials 10] [--seed 0]

Runs on a tiny random model and random tokens in a temporary folder (a few seconds per trial on a CPU).
"""
import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from model import ModelConfig, Transformer  # noqa: E402

VOCAB, T = 97, 32


def make_inputs(folder):
    """A tiny model folder and token bins."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, n_layer=2, n_head=4,
                                    n_kv_head=2, head_dim=8, max_seq_len=64, rope_theta=10000.0))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    model.save_pretrained(folder / "model", dtype=torch.float32)
    rng = np.random.default_rng(0)
    (folder / "data").mkdir()
    for split, n in (("train", 3000), ("val", 500)):
        rng.integers(0, VOCAB, n).astype(np.uint16).tofile(folder / "data" / f"{split}.bin")
    (folder / "data" / "meta.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": VOCAB}))


def args(folder, out, **kw):
    """A checkpoint at every iteration (many writes to land in); the schedule does not depend on max_iters."""
    a = dict(model=folder / "model", data_dir=folder / "data", out_dir=out, block_size=T, batch_size=2, lora_r=4,
             lora_alpha=16, rank_prune=False, dtype="float32", device="cpu", eval_iters=2, eval_interval=1,
             warmup_iters=2, learning_rate=1e-2, min_lr=1e-3, lr_decay_iters=50, lora_dropout=0.1, max_iters=10**6)
    a.update(kw)
    return [sys.executable, "-u", "train.py", *(f"--{k}={v}" for k, v in a.items())]


ENV = dict(os.environ, OMP_NUM_THREADS="1")


def losses(stdout):
    return {int(m[1]): m[2] for m in re.finditer(r"^iter (\d+)/\d+: loss ([\d.]+)", stdout, re.M)}


def kill_run(folder, out, aim_at_write, rng):
    """Start train.py, SIGKILL it; returns whether a checkpoint write was under way at the kill."""
    log = open(out.with_suffix(".log"), "w")
    out.mkdir()
    proc = subprocess.Popen(args(folder, out), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=ENV)
    while "saved checkpoint" not in out.with_suffix(".log").read_text() and proc.poll() is None:
        time.sleep(0.01)  # the first checkpoint is there (importing torch takes seconds on a busy machine)
    deadline = time.time() + rng.uniform(0.0, 2.0)
    while proc.poll() is None and (time.time() < deadline or (aim_at_write and not list(out.glob("ckpt.pt.tmp-*")))):
        time.sleep(0.0002 if aim_at_write else 0.01)
    if proc.poll() is not None:
        raise RuntimeError(f"train.py exited ({proc.returncode}) before it was killed:\n{out.with_suffix('.log').read_text()[-2000:]}")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    log.close()
    return bool(list(out.glob("ckpt.pt.tmp-*")))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--next", type=int, default=3, help="iterations compared after each resume")
    a = p.parse_args(argv)
    rng = random.Random(a.seed)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_inputs(folder)
        for trial in range(a.trials):
            out = folder / f"trial{trial}"
            aimed = trial % 2 == 1
            in_write = kill_run(folder, out, aimed, rng)
            r = {"trial": trial, "aimed_at_write": aimed, "killed_during_write": in_write}
            try:
                ckpt = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)
                r["loadable"], r["ckpt_iter"] = True, ckpt["iter_num"]
            except Exception as e:  # noqa: BLE001 (anything here is a failure to report)
                r["loadable"], r["error"] = False, f"{type(e).__name__}: {e}"
            if r["loadable"]:
                k = r["ckpt_iter"]
                res = subprocess.run(args(folder, out, init_from="resume", max_iters=k + a.next), cwd=ROOT,
                                     capture_output=True, text=True, env=ENV)
                r["resumed"] = losses(res.stdout) if res.returncode == 0 else f"failed: {res.stderr[-500:]}"
            results.append(r)
            print(json.dumps(r), flush=True)
        end = max([r["ckpt_iter"] for r in results if r.get("loadable")], default=0) + a.next
        ref = subprocess.run(args(folder, folder / "reference", max_iters=end), cwd=ROOT, capture_output=True,
                             text=True, env=ENV, check=True)
        reference = losses(ref.stdout)
    for r in results:
        if isinstance(r.get("resumed"), dict):
            r["same_losses"] = r["resumed"] == {i: reference[i] for i in r["resumed"]} and len(r["resumed"]) == a.next
    ok = all(r["loadable"] and r.get("same_losses") for r in results)
    summary = {"trials": len(results), "killed_during_write": sum(r["killed_during_write"] for r in results),
               "all_loadable": all(r["loadable"] for r in results),
               "all_resumed_identically": all(r.get("same_losses") for r in results), "ok": ok}
    print(json.dumps(summary))
    return summary, results


if __name__ == "__main__":
    summary, _ = main()
    sys.exit(0 if summary["ok"] else 1)
