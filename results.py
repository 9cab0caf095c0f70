"""
Results files, and the plumbing the scripts that write them share: lm-evaluation-harness's results layout (a
task's entry written, any results file read back), the provenance record every results file carries, eval.py's
--use_cache store and printed rows, and a progress meter. docs/EVAL.md says what the numbers mean.

    from results import read_results
    read_results("results/dense/boolq.json")["boolq"]["acc,none"]   # either layout, lm-eval's metric names
"""
import json
import os
import platform
import re
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from checkpoint import append_jsonl, atomic_open, save_json

ROOT = Path(__file__).resolve().parent
MC_TASKS = ["boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]
REPORTED = {"boolq": "acc", "piqa": "acc", "hellaswag": "acc_norm", "winogrande": "acc",  # the metric the
            "arc_easy": "acc_norm", "arc_challenge": "acc_norm", "openbookqa": "acc_norm"}  # papers' tables report
VERSIONS = {"boolq": 2.0, "wikitext2": 2.0, "gsm8k": 3.0, "ptb": None}  # lm-eval's task versions; the others 1.0
CONFIG = ("model", "model_args", "batch_size", "device", "limit", "use_cache",  # lm-eval's "config" keys, then
          "max_length", "ppl_ctx", "ppl_windows", "gsm8k_mode", "max_new_tokens", "data_mirror")  # eval.py's own


# ----------------------------------------------------------------------------- lm-evaluation-harness's layout
# {"results": {task: {"alias": task, "metric,filter": value, "metric_stderr,filter": value or "N/A"}}, "n-samples",
# "n-shot", "versions", "config", "git_hash", "date"}, as lm_eval/evaluator.py writes it, and ours, which lm-eval's
# tools pass over: "details" (per task: token perplexity, words, seconds, ...), "zeroshot_average", "provenance".
def new_results(settings):
    """An empty results file of a run with these settings: lm-eval's "config" (CONFIG's keys) and our provenance."""
    prov = provenance(settings)
    return {"results": {}, "n-samples": {}, "n-shot": {}, "versions": {}, "details": {}, "git_hash": prov["git_commit"],
            "date": time.time(), "config": {k: settings[k] for k in CONFIG if k in settings}, "provenance": prov}


def record(out, name, res, rows, limit, path=None):
    """Put a task's numbers into the results `out` (lm-eval's entries, keys "metric,filter"; our details), and
    write `out` to `path` if given (after every task, so a long run keeps what it has)."""
    out["results"][name] = {"alias": name} | {k: v for k, v in res.items() if "," in k}
    out["details"][name] = {k: v for k, v in res.items() if "," not in k}
    out["n-samples"][name] = {"original": len(rows), "effective": len(rows[:limit])}
    out["n-shot"][name], out["versions"][name] = res.get("shots", 0), VERSIONS.get(name, 1.0)
    if all(t in out["results"] for t in MC_TASKS):  # the plain mean of the seven reported metrics
        out["zeroshot_average"] = sum(out["results"][t][f"{REPORTED[t]},none"] for t in MC_TASKS) / len(MC_TASKS)
    out["total_evaluation_time_seconds"] = str(round(time.time() - out["date"], 1))
    if path:
        save_json(out, path)


def merge_results(paths):
    """The results files `paths` as one: the first, with every later file's tasks added to its per-task sections."""
    first, *rest = [json.loads(Path(p).read_text()) for p in paths]
    for other in rest:
        for section in ("results", "details", "n-samples", "n-shot", "versions"):
            first.setdefault(section, {}).update(other.get(section, {}))
    return first


def read_results(path):
    """{task: {"acc,none": …, "acc_stderr,none": …, …, and our details (token_perplexity, …)}} from a results
    file of lm-eval's layout (eval.py's, or lm-eval's own: no details) or of eval.py's earlier {"tasks": {task:
    {"acc": …, "strict_match": …}}} one, its metrics named as lm-eval names them."""
    data = json.loads(Path(path).read_text())
    if "results" in data:
        return {task: data.get("details", {}).get(task, {}) | entry for task, entry in data["results"].items()}
    if "tasks" not in data:
        raise ValueError(f"{path}: no \"results\"; expected lm-evaluation-harness's results layout")
    return {task: {lm_eval_key(k): "N/A" if v is None and k.endswith("_stderr") else v for k, v in res.items()}
            for task, res in data["tasks"].items()}


def lm_eval_key(key):
    """lm-eval's name of one of eval.py's earlier metric names ("strict_match_stderr" ->
    "exact_match_stderr,strict-match"); any other key as it is."""
    old = {"acc": "acc,none", "acc_norm": "acc_norm,none", "word_perplexity": "word_perplexity,none",
           "byte_perplexity": "byte_perplexity,none", "bits_per_byte": "bits_per_byte,none",
           "strict_match": "exact_match,strict-match", "flexible_extract": "exact_match,flexible-extract"}
    base = key.removesuffix("_stderr")
    return key if base not in old else old[base] if key == base else old[base].replace(",", "_stderr,")


def write_jsonl(path, rows):
    """`rows` as JSON lines, written whole or not at all (eval.py's --samples)."""
    with atomic_open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


# ----------------------------------------------------------------------------- eval.py's cache and printed rows
def open_store(path, header):
    """--use_cache: {request key: log-likelihood} computed by earlier runs into the JSON-lines file `path` (its
    first line `header` names the model; a line cut off by a kill is dropped), and a function that appends more."""
    path = Path(path)
    if not path.exists() or not path.read_text():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(header) + "\n")
    text, known = path.read_text(), {}
    first, *lines = text.splitlines()
    if json.loads(first) != header:
        raise SystemExit(f"{path} holds log-likelihoods of {first}, not of {json.dumps(header)}: "
                         "give this evaluation its own --use_cache folder")
    for line in lines:
        try:
            known.update(json.loads(line))
        except json.JSONDecodeError:  # the last line of a killed run
            pass
    if not text.endswith("\n"):  # appends start on a line of their own
        with open(path, "a") as f:
            f.write("\n")
    return known, lambda new: append_jsonl(path, new)


def print_header():
    print(f"{'task':<14} {'metric':<28} {'value':>10} {'stderr':>8} {'rows':>6} {'seconds':>8}")


def print_row(name, res):
    """One line per metric of a task's numbers `res`: value, stderr, rows, seconds; then its definition."""
    for key, value in res.items():
        if isinstance(value, float) and "_stderr" not in key and key != "seconds":
            err = res.get(key.replace(",", "_stderr,")) if "," in key else None
            err = f"{err:.4f}" if isinstance(err, float) else ""  # lm-eval's "N/A": none
            print(f"{name:<14} {key.removesuffix(',none'):<28} {value:>10.4f} {err:>8} {res.get('rows', ''):>6} "
                  f"{res['seconds']:>8}", flush=True)
    if "definition" in res:
        print(f"{'':<14} ({res['definition']})", flush=True)


def print_average(out):
    if "zeroshot_average" in out:
        print(f"{'average (7)':<14} {'reported metrics':<28} {out['zeroshot_average']:>10.4f}")


# ----------------------------------------------------------------------------- provenance
def provenance(settings):
    """What made a results file: the command, its resolved settings, the code's commit, the machine, the date."""
    return {"command": list(sys.argv), "settings": json.loads(json.dumps(settings, default=str)),
            "git_commit": git_commit(), "machine": machine(str(settings.get("device", "cpu"))),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def git_commit(folder=ROOT):
    """The commit checked out in `folder`'s git clone, + "-dirty" when its files differ from it (untracked ones
    included, ignored ones not); None outside a git clone or without git."""
    run = lambda *cmd: subprocess.run(["git", *cmd], cwd=folder, capture_output=True, text=True)
    try:
        head, status = run("rev-parse", "HEAD"), run("status", "--porcelain")
    except OSError:  # no git
        return None
    return None if head.returncode else head.stdout.strip() + ("-dirty" if status.stdout.strip() else "")


def machine(device="cpu"):
    """The platform, CPU model, cores, torch version and the device the numbers were computed on."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = re.search(r"model name\s*:\s*(.*)", info)
    gpu = {"gpu": torch.cuda.get_device_name(device)} if device.startswith("cuda") and torch.cuda.is_available() else {}
    return {"platform": platform.platform(), "cpu": cpu.group(1).strip() if cpu else platform.processor() or None,
            "cores": os.cpu_count(), "torch": torch.__version__, "device": device} | gpu


# ----------------------------------------------------------------------------- progress
def quiet(total, unit):
    """A progress meter that shows nothing: meter(total, unit) gives tick(n), called as n more are done."""
    return lambda n: None


def progress(name, total, unit, stream=sys.stderr):
    """A meter's tick(n): done / total, rate and time left on `stream`, one line rewritten in place on a
    terminal (erased at the end), else a line every 10 s."""
    tty, start, done, shown = stream.isatty(), time.time(), 0, 0.0

    def tick(n):
        nonlocal done, shown
        done, now = done + n, time.time()
        if not n or done < total and now - shown < (0.5 if tty else 10):
            return
        rate, shown = done / max(now - start, 1e-9), now
        s = int((total - done) / rate)
        line = f"{name}: {done}/{total} {unit}, {rate:.2f}/s, {s // 3600}:{s // 60 % 60:02d}:{s % 60:02d} left"
        if tty:  # rewrite the line; erase it at the end
            stream.write("\r\033[K" if done >= total else f"\r{line}\033[K")
        elif done < total:
            stream.write(line + "\n")
        stream.flush()
    return tick
