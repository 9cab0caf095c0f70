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


def manifest():
    return json.loads(MANIFEST.read_text())


def entry(dataset, name):
    datasets = manifest()
    if dataset not in datasets:
        raise ValueError(f"unknown data set {dataset!r}; data/manifest.json lists {', '.join(sorted(datasets))}")
    files = datasets[dataset]["files"]
    if name not in files:
        raise ValueError(f"{dataset}: unknown file {name!r}; data/manifest.json lists {', '.join(files)}")
    return files[name]


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check(path, info):
    """The file's size and SHA-256 against the manifest (either may be unknown: null)."""
    size, digest = path.stat().st_size, info.get("sha256")
    if info.get("size") is not None and size != info["size"]:
        return f"{path}: {size:,} bytes, expected {info['size']:,}"
    if digest and sha256(path) != digest:
        return f"{path}: SHA-256 differs from data/manifest.json's {digest[:12]}..."
    return None


def fetch(dataset, *names):
    """The local path of the first of `names` (files of `dataset`) found in the cache or the mirror, else of
    names[0] downloaded into the cache. Several names: alternative forms of the same data (e.g. HellaSwag's
    original jsonl and llama.cpp's text form)."""
    infos = {name: entry(dataset, name) for name in names}
    for name in names:
        for folder in (CACHE / dataset, mirror_folder(dataset)):
            path = folder / name if folder else None
            if path and path.is_file():
                problem = check(path, infos[name]) if folder != CACHE / dataset else None
                if problem:
                    raise DataUnavailable(f"{problem} (the copy in DATA_MIRROR is not the listed file)")
                return path
    return download(dataset, names[0], infos[names[0]])


def mirror_folder(dataset):
    mirror = os.environ.get("DATA_MIRROR")
    return Path(mirror) / dataset if mirror else None


def download(dataset, name, info):
    """Download into the cache (an archive member: the archive first, then the member out of it)."""
    folder = CACHE / dataset
    target = folder / name
    source = folder / Path(info["url"]).name if info.get("member") else target
    try:
        if not source.is_file():
            fetch_url(info["url"], source, None if info.get("member") else info)
        if info.get("member"):
            extract(source, info["member"], target)
    except (OSError, urllib.error.URLError, zipfile.BadZipFile, KeyError) as e:
        reason = getattr(e, "reason", None) or e
        raise DataUnavailable(
            f"{dataset}/{name}: not in {folder}/ nor in DATA_MIRROR ({os.environ.get('DATA_MIRROR') or 'not set'}), "
            f"and the download from {info['url']} failed ({reason}). Put the file in {folder}/, or set DATA_MIRROR "
            f"to a folder holding {dataset}/{name}") from None
    problem = check(target, info)
    if problem:
        target.unlink()
        raise DataUnavailable(f"{problem}; the download from {info['url']} was removed. Try again, or put a good "
                              f"copy in {folder}/")
    if not info.get("sha256"):
        record_hash(target)
    return target


def fetch_url(url, path, info=None, chunk=1 << 20):
    """url -> path, resuming a `.partial` file left by an interrupted download; progress on stderr."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    have = partial.stat().st_size if partial.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    with urllib.request.urlopen(request, timeout=60) as response:
        if have and response.status != 206:  # the server ignored the range: start again
            have = 0
        total = have + int(response.headers.get("Content-Length") or 0) or None
        with open(partial, "ab" if have else "wb") as f:
            done, shown = have, time.time()
            while block := response.read(chunk):
                f.write(block)
                done += len(block)
                if time.time() - shown > 2:
                    shown = time.time()
                    print(f"  {path.name}: {done / 2**20:.1f}" + (f" of {total / 2**20:.1f}" if total else "")
                          + " MiB", file=sys.stderr)
    if total and partial.stat().st_size != total:
        raise OSError(f"got {partial.stat().st_size:,} bytes of {total:,}; run again to resume")
    partial.rename(path)


def extract(archive, member, target):
    with zipfile.ZipFile(archive) as z, z.open(member) as src:
        tmp = target.with_name(target.name + ".partial")
        tmp.write_bytes(src.read())
        tmp.rename(target)


def record_hash(path):
    """No SHA-256 is listed for this file: keep the first download's, which later copies can be checked against."""
    digest = sha256(path)
    path.with_name(path.name + ".sha256").write_text(f"{digest}  {path.name}\n")
    print(f"note: {path} has no SHA-256 in data/manifest.json; its first download's is {digest} "
          f"(kept in {path.name}.sha256)", file=sys.stderr)
