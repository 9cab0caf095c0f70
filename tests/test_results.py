"""results.py: lm-evaluation-harness's results layout read both ways (lm-eval's own file, written by hand as
lm_eval/evaluator.py writes it, against ours), eval.py's earlier layout and the committed results files still
readable, the provenance record against what git, platform and torch say, the progress meter on a fake clock."""
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import eval as E
import results
from conftest import ROOT


def test_progress_meter_rewrites_a_line_on_a_terminal_and_logs_every_10_s_elsewhere(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(results.time, "time", lambda: clock[0])
    for tty in (False, True):
        stream = io.StringIO()
        stream.isatty = lambda: tty
        tick = results.progress("boolq", 10, "requests", stream)
        for at, n in [(1001, 2), (1005, 2), (1012, 2), (1013, 4)]:  # done: 2, 4, 6, 10
            clock[0] = at
            tick(n)
        first, second = "boolq: 2/10 requests, 2.00/s, 0:00:04 left", "boolq: 6/10 requests, 0.50/s, 0:00:08 left"
        if tty:  # every tick at least 0.5 s after the last shown line rewrites it; the end erases it
            third = "boolq: 4/10 requests, 0.80/s, 0:00:07 left"
            assert stream.getvalue() == "".join(f"\r{x}\033[K" for x in (first, third, second)) + "\r\033[K"
        else:  # a line at the first tick, then one 10 s or more later; none at the end (the results row follows)
            assert stream.getvalue() == f"{first}\n{second}\n"
        clock[0] = 1000.0


# ----------------------------------------------------------------------------- lm-evaluation-harness's layout
LM_EVAL_FILE = {
    "results": {"arc_easy": {"alias": "arc_easy", "acc,none": 0.65, "acc_stderr,none": 0.10942433098048311,
                             "acc_norm,none": 0.35, "acc_norm_stderr,none": 0.10942433098048311},
                "wikitext": {"alias": "wikitext", "word_perplexity,none": 32.5, "word_perplexity_stderr,none": "N/A",
                             "byte_perplexity,none": 1.96, "byte_perplexity_stderr,none": "N/A",
                             "bits_per_byte,none": 0.97, "bits_per_byte_stderr,none": "N/A"},
                "gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.25,
                          "exact_match,flexible-extract": 0.5,
                          "exact_match_stderr,flexible-extract": 0.28867513459481287}},
    "group_subtasks": {"arc_easy": [], "wikitext": [], "gsm8k": []}, "configs": {},
    "versions": {"arc_easy": 1.0, "wikitext": 2.0, "gsm8k": 3.0}, "n-shot": {"arc_easy": 0, "wikitext": 0, "gsm8k": 5},
    "higher_is_better": {"arc_easy": {"acc": True, "acc_norm": True}},
    "n-samples": {"arc_easy": {"original": 2376, "effective": 20}, "wikitext": {"original": 62, "effective": 2},
                  "gsm8k": {"original": 1319, "effective": 4}},
    "config": {"model": "hf", "model_args": "pretrained=models/smollm2-135m-instruct,dtype=float32", "batch_size": 8,
               "batch_sizes": [], "device": "cpu", "use_cache": None, "limit": 20.0, "bootstrap_iters": 100000},
    "git_hash": "e6bebcb", "date": 1764000000.0, "lm_eval_version": "0.4.9", "total_evaluation_time_seconds": "97.5"}


def ours_file(path):
    """A results file made as eval.py makes it, from the numbers eval.py's scorers give for the same outcomes."""
    out = {"results": {}, "n-samples": {}, "n-shot": {}, "versions": {}, "details": {}, "date": time.time()}
    arc = E.mean_stderr("acc", [1.0] * 13 + [0.0] * 7) | E.mean_stderr("acc_norm", [1.0] * 7 + [0.0] * 13)
    wikitext2 = {"word_perplexity,none": 32.5, "byte_perplexity,none": 1.96, "bits_per_byte,none": 0.97,
                 "token_perplexity": 46.3, "rows": 2}
    wikitext2 |= {"word_perplexity_stderr,none": "N/A", "byte_perplexity_stderr,none": "N/A",
                  "bits_per_byte_stderr,none": "N/A"}
    gsm8k = (E.mean_stderr("exact_match", [1.0, 0, 0, 0], "strict-match")
             | E.mean_stderr("exact_match", [1.0, 1.0, 0, 0], "flexible-extract") | {"shots": 5})
    for name, res, rows in [("arc_easy", arc, 2376), ("wikitext2", wikitext2, 62), ("gsm8k", gsm8k, 1319)]:
        limit = {"arc_easy": 20, "wikitext2": 2}.get(name, 4)
        results.record(out, name, res | {"seconds": 1.0}, list(range(rows)), limit, path)  # written after each task
    return out


def test_read_results_gives_the_same_numbers_from_lm_evals_file_and_ours(tmp_path):
    (tmp_path / "lm_eval.json").write_text(json.dumps(LM_EVAL_FILE))
    written = ours_file(tmp_path / "ours.json")
    theirs, ours = results.read_results(tmp_path / "lm_eval.json"), results.read_results(tmp_path / "ours.json")
    for task, our_task in [("arc_easy", "arc_easy"), ("wikitext", "wikitext2"), ("gsm8k", "gsm8k")]:
        for key, value in theirs[task].items():
            if key != "alias":
                assert ours[our_task][key] == (value if value == "N/A" else pytest.approx(value, rel=1e-12)), key
    assert ours["wikitext2"]["token_perplexity"] == 46.3 and ours["gsm8k"]["seconds"] == 1.0  # our details beside
    assert {k: written[k]["gsm8k"] for k in ("n-samples", "n-shot", "versions")} == {
        k: LM_EVAL_FILE[k]["gsm8k"] for k in ("n-samples", "n-shot", "versions")}
    old = {"tasks": {"arc_easy": {"acc": 0.65, "acc_stderr": 0.10942433098048311, "acc_norm": 0.35,  # eval.py's
                                  "acc_norm_stderr": 0.10942433098048311, "rows": 20, "seconds": 1.0},  # earlier
                     "gsm8k": {"strict_match": 0.25, "strict_match_stderr": 0.25, "flexible_extract": 0.5,  # layout
                               "flexible_extract_stderr": 0.28867513459481287, "shots": 5, "seconds": 1.0},
                     "wikitext2": {"word_perplexity": 32.5, "byte_perplexity": 1.96, "bits_per_byte": 0.97,
                                   "token_perplexity": 46.3, "rows": 2, "seconds": 1.0}}, "zeroshot_average": None}
    (tmp_path / "old.json").write_text(json.dumps(old))
    for task, res in results.read_results(tmp_path / "old.json").items():
        metrics = {k: v for k, v in res.items() if "," in k}
        assert metrics == pytest.approx({k: v for k, v in ours[task].items() if "," in k and v != "N/A"}, rel=1e-12)
    assert results.read_results(tmp_path / "old.json")["wikitext2"]["token_perplexity"] == 46.3
    (tmp_path / "other.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="other.json: no \"results\"; expected lm-evaluation-harness's results layout"):
        results.read_results(tmp_path / "other.json")


def test_lm_evals_own_table_reads_our_results_file(tmp_path):
    """lm_eval.utils.make_table (what `lm_eval` prints) on eval.py's file: every task, metric and value."""
    make_table = pytest.importorskip("lm_eval.utils").make_table
    table, rows, task = make_table(ours_file(tmp_path / "ours.json")), set(), None
    for line in table.splitlines()[2:]:
        name, version, filt, shots, metric, _, value, _, stderr = [c.strip() for c in line.strip("|").split("|")]
        task = name or task
        rows.add((task, version or None, filt, shots, metric, float(value), stderr))
    assert rows == {("arc_easy", "1", "none", "0", "acc", 0.65, "0.1094"),
                    ("arc_easy", None, "none", "0", "acc_norm", 0.35, "0.1094"),
                    ("wikitext2", "2", "none", "0", "bits_per_byte", 0.97, "N/A"),
                    ("wikitext2", None, "none", "0", "byte_perplexity", 1.96, "N/A"),
                    ("wikitext2", None, "none", "0", "word_perplexity", 32.5, "N/A"),
                    ("gsm8k", "3", "flexible-extract", "5", "exact_match", 0.5, "0.2887"),
                    ("gsm8k", None, "strict-match", "5", "exact_match", 0.25, "0.2500")}


def test_record_averages_the_seven_reported_metrics_and_writes_the_file(tmp_path):
    """zeroshot_average: the plain mean of acc (boolq, piqa, winogrande) and acc_norm (the other four), by hand;
    n-samples counts the rows --limit took; the file on disk holds what `out` holds."""
    out = {"results": {}, "n-samples": {}, "n-shot": {}, "versions": {}, "details": {}, "date": time.time()}
    acc = dict(boolq=0.1, piqa=0.2, hellaswag=0.3, winogrande=0.4, arc_easy=0.5, arc_challenge=0.6, openbookqa=0.7)
    for i, task in enumerate(results.MC_TASKS):
        res = {"acc,none": acc[task], "acc_norm,none": acc[task] + 0.05, "rows": 3, "seconds": 1.0}
        results.record(out, task, res, list(range(10)), 3 if i else None, tmp_path / "r.json")
        assert ("zeroshot_average" in out) == (task == "openbookqa")  # only once all seven are there
    assert out["zeroshot_average"] == pytest.approx((0.1 + 0.2 + 0.4 + 0.35 + 0.55 + 0.65 + 0.75) / 7)
    assert out["n-samples"]["boolq"] == {"original": 10, "effective": 10} and out["n-samples"]["piqa"]["effective"] == 3
    assert out["versions"]["boolq"] == 2.0 and out["details"]["piqa"] == {"rows": 3, "seconds": 1.0}
    assert json.loads((tmp_path / "r.json").read_text()) == out


def test_merge_results_unites_the_tasks_of_two_files(tmp_path):
    out = {}
    for part, task in (("a", "boolq"), ("b", "wikitext2")):
        out[part] = {"results": {}, "n-samples": {}, "n-shot": {}, "versions": {}, "details": {}, "date": time.time(),
                     "config": {"limit": len(part)}}
        results.record(out[part], task, {"x,none": 1.0, "token_perplexity": 2.0}, [0, 1], None, tmp_path / part)
    merged = results.merge_results([tmp_path / "a", tmp_path / "b"])
    assert set(merged["results"]) == set(merged["details"]) == set(merged["n-samples"]) == {"boolq", "wikitext2"}
    assert merged["config"] == out["a"]["config"] and merged["versions"] == {"boolq": 2.0, "wikitext2": 2.0}


def test_every_committed_results_file_of_the_earlier_layout_reads_with_its_numbers():
    """results/**/*.json in eval.py's earlier {"tasks": ...} layout: each metric under lm-eval's name, same value."""
    found = [p for p in ROOT.glob("results/**/*.json") if "tasks" in json.loads(p.read_text())]
    assert len(found) >= 10
    names = {"acc": "acc,none", "acc_norm_stderr": "acc_norm_stderr,none", "strict_match": "exact_match,strict-match",
             "flexible_extract_stderr": "exact_match_stderr,flexible-extract", "bits_per_byte": "bits_per_byte,none",
             "word_perplexity": "word_perplexity,none", "token_perplexity": "token_perplexity"}
    for path in found:
        raw, read = json.loads(path.read_text())["tasks"], results.read_results(path)
        assert set(read) == set(raw)
        for task, metrics in raw.items():
            for old, new in names.items():
                if old in metrics:
                    assert read[task][new] == (metrics[old] if metrics[old] is not None else "N/A"), (path, task, old)


def structured_row(part, tasks, value):
    """An eval.py results file of `tasks`, every metric `value` (as table_structured's evaluate runs eval.py)."""
    out = results.new_results({"limit": 100})
    for task in tasks:
        res = {"acc,none": value, "acc_norm,none": value + 0.01, "word_perplexity,none": 30.0, "token_perplexity": 40.0}
        results.record(out, task, res | {"rows": 100, "seconds": 1.0}, list(range(100)), 100, part)


def test_table_structured_reads_old_and_new_rows(tmp_path, monkeypatch, capsys):
    """experiments/table_structured.py: evaluate() keeps eval.py's two results files as one row in lm-eval's layout;
    report() reads it and the committed rows of the earlier layout (their numbers, as the files hold them)."""
    monkeypatch.syspath_prepend(str(ROOT / "experiments"))
    import table_structured as T
    shutil.copytree(ROOT / "results" / "structured", tmp_path / "rows")
    monkeypatch.setattr(T, "RESULTS", tmp_path / "rows")
    monkeypatch.setattr(T, "OUT", tmp_path / "out")
    dense = json.loads((tmp_path / "rows" / "dense.json").read_text())
    facts = {k: dense[k] for k in ("params", "heads", "kv_heads", "widths") if k in dense}
    monkeypatch.setattr(T, "model_facts", lambda model_dir: facts)

    def fake_eval(cmd, done, dry_run):  # what eval.py writes to --output
        part, task = Path(cmd[cmd.index("--output") + 1]), cmd[cmd.index("--tasks") + 1]
        part.parent.mkdir(parents=True, exist_ok=True)
        structured_row(part, results.MC_TASKS if task == "zeroshot" else [task], 0.5)
    monkeypatch.setattr(T, "run", fake_eval)
    T.evaluate("some/model", "magnitude-0.7", limit=100, ppl_pages=5, ppl_windows=100)
    row = json.loads((tmp_path / "rows" / "magnitude-0.7.json").read_text())
    assert set(row["results"]) == {*results.MC_TASKS, "wikitext2"} and row["limit"]["wikitext2_pages"] == 5
    T.report(SimpleNamespace(sparsities=[0.2, 0.7]))
    table = json.loads((tmp_path / "rows" / "table.json").read_text())["rows"]
    new = table["magnitude-0.7"]
    assert new["accuracy"]["boolq"] == 50.0 and new["accuracy"]["hellaswag"] == 51.0  # acc; acc_norm (+0.01)
    assert new["word_perplexity"] == 30.0 and new["token_perplexity"] == 40.0
    old = dense["tasks"]
    assert table["dense"]["accuracy"]["hellaswag"] == 100 * old["hellaswag"]["acc_norm"]
    assert table["dense"]["accuracy"]["piqa"] == 100 * old["piqa"]["acc"]
    assert table["dense"]["word_perplexity"] == old["wikitext2"]["word_perplexity"]
    assert "| magnitude-0.7 |" in capsys.readouterr().out


# ----------------------------------------------------------------------------- provenance
def git(folder, *args):
    return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, check=True).stdout.strip()


def test_git_commit_names_the_checkout_and_says_dirty(tmp_path):
    """HEAD's commit as `git rev-parse HEAD` gives it; "-dirty" after a change (an untracked file counts, an
    ignored one does not); None outside a git clone."""
    if shutil.which("git") is None:
        pytest.skip("needs git")
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / ".gitignore").write_text("out/\n")
    git(repo, "add", ".gitignore")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    head = git(repo, "rev-parse", "HEAD")
    assert results.git_commit(repo) == head
    (repo / "out").mkdir()
    (repo / "out" / "x").write_text("ignored")
    assert results.git_commit(repo) == head
    (repo / "new.py").write_text("untracked")
    assert results.git_commit(repo) == head + "-dirty"
    (tmp_path / "plain").mkdir()
    assert results.git_commit(tmp_path / "plain") is None


def test_provenance_of_a_results_file(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["eval.py", "--tasks", "boolq"])
    before = datetime.now(timezone.utc).replace(microsecond=0)
    out = results.new_results({"model": Path("models/x"), "limit": 3, "device": "cpu", "names": ["boolq"]})
    prov = out["provenance"]
    assert out["config"] == {"model": Path("models/x"), "limit": 3, "device": "cpu"}  # lm-eval's keys of the settings
    assert prov["command"] == ["eval.py", "--tasks", "boolq"]
    assert prov["settings"] == {"model": "models/x", "limit": 3, "device": "cpu", "names": ["boolq"]}  # plain JSON
    assert prov["git_commit"] == results.git_commit()
    assert prov["machine"] | {"cpu": None} == {"platform": platform.platform(), "cpu": None, "cores": os.cpu_count(),
                                                "torch": torch.__version__, "device": "cpu"}
    assert before <= datetime.fromisoformat(prov["date"]) <= datetime.now(timezone.utc)
    json.dumps(prov)  # nothing a results file cannot hold
