"""
Raw data files, by data set and file name as data/manifest.json lists them:

    from data.fetch import fetch
    path = fetch("gsm8k", "train.jsonl")

A file is looked for in the project's cache (data/cache/<dataset>/), then in the folder named by the environment
variable DATA_MIRROR (laid out as <dataset>/<file>), and is otherwise downloaded from the manifest's URL (urllib,
resumed, size and SHA-256 checked, written under a temporary name and renamed). When none of that works it stops
with one line naming the file, the URL, the folder to put it in and DATA_MIRROR.
"""
import hashlib
import http.client
import json
import os
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

MANIFEST = Path(__file__).with_name("manifest.json")
CACHE = Path(__file__).with_name("cache")


class DataUnavailable(SystemExit):
    """A raw file that cannot be had: a script that does not catch it stops with the one-line message."""


def entry(dataset, name):
    datasets = json.loads(MANIFEST.read_text())
    if name not in datasets.get(dataset, {}).get("files", {}):
        raise ValueError(f"{dataset}/{name}: not in data/manifest.json, which lists "
                         + ", ".join(f"{d}/{f}" for d in datasets for f in datasets[d]["files"]))
    return datasets[dataset]["files"][name]


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def problem(path, digest, size):
    """How the file differs from the listed size and SHA-256 (either may be unknown: None), or None."""
    if size is not None and path.stat().st_size != size:
        return f"{path}: {path.stat().st_size:,} bytes, not the listed {size:,}"
    if digest and (got := sha256(path)) != digest:
        return f"{path}: SHA-256 {got[:12]}..., not the listed {digest[:12]}..."


def fetch(dataset, *names):
    """The local path of the first of `names` (files of `dataset`) found in the cache or the mirror, else of
    names[0] downloaded into the cache. Several names: alternative forms of the same data (e.g. HellaSwag's
    original jsonl and llama.cpp's text form)."""
    infos, mirror = {name: entry(dataset, name) for name in names}, os.environ.get("DATA_MIRROR")
    for name in names:
        for path in [CACHE / dataset / name] + ([Path(mirror) / dataset / name] if mirror else []):
            if path.is_file():
                recorded = path.with_name(name + ".sha256")  # kept by the first download of a file without one
                digest = infos[name].get("sha256") or recorded.is_file() and recorded.read_text().split()[0]
                if why := problem(path, digest, infos[name].get("size")):
                    raise DataUnavailable(f"{why} (data/manifest.json): another file; remove or replace it")
                return path
    return download(dataset, names[0], infos[names[0]])


def download(dataset, name, info):
    """Download into the cache (an archive member: the archive first, then the member out of it)."""
    folder, url = CACHE / dataset, info.get("url")
    missing = f"{dataset}/{name}: not in {folder}/ nor in DATA_MIRROR ({os.environ.get('DATA_MIRROR') or 'not set'})"
    where = f"Put the file in {folder}/, or set DATA_MIRROR to a folder holding {dataset}/{name}"
    if not url:
        raise DataUnavailable(f"{missing}, and data/manifest.json has no download for it ({info.get('note')}). {where}")
    target = folder / name
    archive = folder / Path(url).name if info.get("member") else target
    try:
        if not archive.is_file():
            fetch_url(url, archive)
            of = "archive_" if info.get("member") else ""  # an archive's own size and SHA-256
            verify(archive, info.get(of + "sha256"), info.get(of + "size"))
        if info.get("member"):
            with zipfile.ZipFile(archive) as z:
                target.with_name(name + ".partial").write_bytes(z.read(info["member"]))
            target.with_name(name + ".partial").replace(target)
            verify(target, info.get("sha256"), info.get("size"))
    except (OSError, http.client.HTTPException, zipfile.BadZipFile, KeyError) as e:  # URLError is an OSError
        reason = e if isinstance(e, urllib.error.HTTPError) else getattr(e, "reason", None) or e
        raise DataUnavailable(f"{missing}, and the download from {url} failed ({reason}). {where}") from None
    if not info.get("sha256"):  # keep the first download's, which later copies are checked against
        digest = sha256(target)
        target.with_name(name + ".sha256").write_text(f"{digest}  {name}\n")
        print(f"note: data/manifest.json has no SHA-256 for {dataset}/{name}; this download's, {digest}, is kept "
              f"in {target}.sha256", file=sys.stderr)
    return target


def verify(path, digest, size):
    if why := problem(path, digest, size):
        path.unlink()
        raise DataUnavailable(f"{why}: the download was removed. Try again, or put a good copy in {path.parent}/")


def fetch_url(url, path, headers=None, open_url=urllib.request.urlopen, chunk=1 << 20):
    """url -> path through path.partial, resuming what an interrupted download left there; progress on stderr."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    have = partial.stat().st_size if partial.exists() else 0
    headers = {"User-Agent": "lora-prune", **(headers or {}), **({"Range": f"bytes={have}-"} if have else {})}
    try:
        response = open_url(urllib.request.Request(url, headers=headers), timeout=30)
    except urllib.error.HTTPError as e:
        if e.code != 416 or not have:  # 416: the range starts at the end, so the partial file is whole
            raise
        return partial.replace(path)
    with response, open(partial, "ab" if have and response.status == 206 else "wb") as f:
        have = have if response.status == 206 else 0  # a server that ignores the range sends it all
        length = response.headers.get("Content-Length")
        total = have + int(length) if length else None
        for block in progress(iter(lambda: response.read(chunk), b""), path.name, total, len, have):
            f.write(block)
    if total is not None and partial.stat().st_size != total:
        raise OSError(f"got {partial.stat().st_size:,} bytes of {total:,}; run again to resume")
    partial.replace(path)


def progress(items, label, total=None, size=None, done=0, after=3.0):
    """Yields the items; once that has taken `after` seconds, reports on stderr how many have passed (with
    size=len: how many bytes) of the total: one updating line on a terminal, else a line every 10 s."""
    tty, start, shown = sys.stderr.isatty(), time.time(), 0.0
    show = (lambda n: f"{n / 2**20:,.1f}") if size else (lambda n: f"{n:,}")
    for item in items:
        yield item
        done += size(item) if size else 1
        if time.time() - start > after and time.time() - shown > (0.5 if tty else 10):
            shown = time.time()
            line = f"  {label}: {show(done)}" + (f" of {show(total)}" if total else "") + (" MiB" if size else "")
            print("\r" + line if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)
    if shown and tty:
        print(file=sys.stderr)
