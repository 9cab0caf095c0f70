"""
Plant small bugs in the code, one at a time, and see whether the tests that cover it notice (mutation testing).
Each mutant replaces one exact piece of a file by a wrong variant; the file must hold that piece exactly once.

    python scripts/mutants.py                        # every mutant; a table on stdout, results/mutants.json
    python scripts/mutants.py --only acc_norm_plus_one,taylor_without_A

A mutant is "caught" when its tests fail (or stop with an error) on the mutated code; the unmutated code must pass
the same tests first. Each runs in a copy of the working tree under a temporary folder (models/ linked, not copied).
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from mutant_list import MUTANTS  # noqa: E402  (name, file, piece, wrong piece, test selection, what it breaks)

SKIP = {".git", "models", "out", "__pycache__", ".pytest_cache", "results"}


def copy_tree(dest):
    shutil.copytree(ROOT, dest, ignore=lambda d, names: [n for n in names if n in SKIP or n.endswith(".bin")
                                                           or (Path(d).name == "data" and n == "cache")])
    for link in ("models", "data/cache"):
        if (ROOT / link).exists():
            os.symlink(ROOT / link, dest / link)
    for prepared in ROOT.glob("data/*/*.bin"):  # prepared token files: linked, the tests read them
        os.symlink(prepared, dest / prepared.relative_to(ROOT))


def run_tests(tree, tests, timeout):
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    t0 = time.time()
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests.split()],
                           cwd=tree, capture_output=True, text=True, env=env, timeout=timeout)
        code, tail = r.returncode, (r.stdout + r.stderr).strip().splitlines()[-1:]
    except subprocess.TimeoutExpired:
        code, tail = "timeout", ["timed out"]
    return code, (tail or [""])[0], time.time() - t0


def try_mutant(mutant, timeout):
    name, file, piece, wrong, tests, what = mutant
    with tempfile.TemporaryDirectory(prefix="mutant-") as tmp:
        tree = Path(tmp) / "tree"
        copy_tree(tree)
        source = (tree / file).read_text()
        if source.count(piece) != 1:
            return dict(name=name, file=file, tests=tests, what=what, result="stale",
                        detail=f"the piece occurs {source.count(piece)} times in {file}")
        (tree / file).write_text(source.replace(piece, wrong))
        code, tail, seconds = run_tests(tree, tests, timeout)
    result = "not caught" if code == 0 else "caught"
    return dict(name=name, file=file, tests=tests, what=what, result=result, detail=tail, seconds=round(seconds, 1))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--only", help="comma-separated mutant names")
    p.add_argument("--timeout", type=int, default=900, help="seconds per mutant's tests")
    p.add_argument("--output", type=Path, default=ROOT / "results" / "mutants.json")
    args = p.parse_args()
    chosen = [m for m in MUTANTS if not args.only or m[0] in args.only.split(",")]
    unknown = set(args.only.split(",")) - {m[0] for m in MUTANTS} if args.only else set()
    if unknown:
        p.error(f"--only: unknown mutants {sorted(unknown)}")
    rows = []
    for mutant in chosen:
        rows.append(try_mutant(mutant, args.timeout))
        r = rows[-1]
        print(f"{r['result']:>10}  {r['name']:<36} {r['tests']:<48} {r.get('seconds', '')}s  {r['detail'][:80]}",
              flush=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(dict(
        command=" ".join(sys.argv), commit=commit + ("+uncommitted" if dirty else ""), machine=platform.platform(),
        cpus=os.cpu_count(), date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        caught=sum(r["result"] == "caught" for r in rows), total=len(rows), mutants=rows), indent=1) + "\n")
    print(f"{sum(r['result'] == 'caught' for r in rows)} of {len(rows)} caught; wrote {args.output}")
    sys.exit(0 if all(r["result"] == "caught" for r in rows) else 1)


if __name__ == "__main__":
    main()
