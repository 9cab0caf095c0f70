"""data/fetch.py against a local web server (http.server on 127.0.0.1, with Range requests) and a manifest of
its own: downloads checked against hashes computed here with hashlib, resumed, refused, and the order cache ->
DATA_MIRROR -> download. Then data/manifest.json itself: complete, pinned, and equal to the mirror's copies."""
import hashlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from data import fetch as F
from test_download import hub  # noqa: F401 (the fixture: a local web server with Range requests)

ROOT = Path(__file__).resolve().parents[1]
BODY = b"".join(b"line %d of a raw data file\n" % i for i in range(5000))  # 130 kB


def sha(data):
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def web(hub):
    """test_download's fake Hub serves web.files[path] at web.url(path)."""
    hub.url = lambda path: f"http://127.0.0.1:{hub.server_port}{path}"
    return hub


@pytest.fixture
def manifest(tmp_path, monkeypatch):
    """manifest(dataset, name, **entry) writes a manifest of our own; a fresh cache folder, no DATA_MIRROR."""
    datasets = {}
    monkeypatch.setattr(F, "MANIFEST", tmp_path / "manifest.json")
    monkeypatch.setattr(F, "CACHE", tmp_path / "cache")
    monkeypatch.delenv("DATA_MIRROR", raising=False)

    def set_entry(dataset, name, **entry):
        datasets.setdefault(dataset, {"files": {}})["files"][name] = entry
        F.MANIFEST.write_text(json.dumps(datasets))
    return set_entry


def unavailable(*args):
    with pytest.raises(F.DataUnavailable) as e:
        F.fetch(*args)
    message = str(e.value)
    assert isinstance(e.value, SystemExit) and e.value.code == message and "\n" not in message
    return message


def test_good_file_is_downloaded_once(web, manifest, tmp_path):
    web.files["/d/a.txt"] = BODY
    manifest("ds", "a.txt", url=web.url("/d/a.txt"), sha256=sha(BODY), size=len(BODY))
    path = F.fetch("ds", "a.txt")
    assert path == tmp_path / "cache" / "ds" / "a.txt" and path.read_bytes() == BODY
    assert F.fetch("ds", "a.txt") == path and len(web.requests) == 1  # the second time from the cache
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.txt"]  # no .partial left


@pytest.mark.parametrize("server_range", ["honoured", "ignored"])
def test_partial_download_is_resumed(web, manifest, tmp_path, server_range):
    web.files["/d/a.txt"] = BODY
    web.honour_range = server_range == "honoured"
    manifest("ds", "a.txt", url=web.url("/d/a.txt"), sha256=sha(BODY), size=len(BODY))
    (tmp_path / "cache" / "ds").mkdir(parents=True)
    (tmp_path / "cache" / "ds" / "a.txt.partial").write_bytes(BODY[:40_000])
    assert F.fetch("ds", "a.txt").read_bytes() == BODY
    assert [r["range"] for r in web.requests] == ["bytes=40000-"]


@pytest.mark.parametrize("wrong", ["sha256", "size"])
def test_bad_checksum_removes_the_download(web, manifest, tmp_path, wrong):
    served = BODY.replace(b"line 7 ", b"line 8 ") if wrong == "sha256" else BODY + b"more\n"
    web.files["/d/a.txt"] = served
    manifest("ds", "a.txt", url=web.url("/d/a.txt"), sha256=sha(BODY), size=len(BODY))
    message = unavailable("ds", "a.txt")
    assert (f"SHA-256 {sha(served)[:12]}..., not the listed" if wrong == "sha256" else
            f"{len(served):,} bytes, not the listed {len(BODY):,}") in message
    assert "the download was removed" in message and str(tmp_path / "cache" / "ds" / "a.txt") in message
    assert list((tmp_path / "cache" / "ds").iterdir()) == []


def check_names_the_ways(message, url, tmp_path):
    """The one line names the file, the URL, the folder to put it in and DATA_MIRROR."""
    folder = tmp_path / "cache" / "ds"
    assert message.startswith("ds/a.txt: not in ") and url in message
    assert f"Put the file in {folder}/, or set DATA_MIRROR to a folder holding ds/a.txt" in message


def test_404_names_file_url_folder_and_mirror(web, manifest, tmp_path):
    manifest("ds", "a.txt", url=web.url("/nothing/a.txt"), sha256=sha(BODY), size=len(BODY))
    message = unavailable("ds", "a.txt")
    check_names_the_ways(message, web.url("/nothing/a.txt"), tmp_path)
    assert "HTTP Error 404" in message and not (tmp_path / "cache" / "ds" / "a.txt").exists()


def test_no_network_names_file_url_folder_and_mirror(manifest, tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/a.txt"
    manifest("ds", "a.txt", url=url, sha256=sha(BODY), size=len(BODY))
    message = unavailable("ds", "a.txt")
    check_names_the_ways(message, url, tmp_path)
    assert "Connection refused" in message


def test_entry_without_url_says_there_is_no_download(web, manifest, tmp_path):
    manifest("ds", "a.txt", url=None, sha256=sha(BODY), size=len(BODY), note="a mirror-only form")
    message = unavailable("ds", "a.txt")
    assert "has no download for it (a mirror-only form)" in message
    check_names_the_ways(message, "", tmp_path)
    assert web.requests == []


def test_archive_members(web, manifest, tmp_path):
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("set-1.0/README", "about")
        z.writestr("set-1.0/data/dev.jsonl", BODY)
        z.writestr("set-1.0/data/dev-labels.lst", "1\n2\n")
    web.files["/set-1.0.zip"] = archive.getvalue()
    common = dict(url=web.url("/set-1.0.zip"), archive_sha256=sha(archive.getvalue()), archive_size=None)
    manifest("ds", "dev.jsonl", member="set-1.0/data/dev.jsonl", sha256=sha(BODY), size=len(BODY), **common)
    manifest("ds", "dev-labels.lst", member="set-1.0/data/dev-labels.lst", sha256=sha(b"1\n2\n"), size=4, **common)
    assert F.fetch("ds", "dev.jsonl").read_bytes() == BODY
    assert F.fetch("ds", "dev-labels.lst").read_bytes() == b"1\n2\n"
    assert len(web.requests) == 1  # one archive for both members
    manifest("ds", "other.txt", member="set-1.0/other.txt", sha256=None, size=None, **common)
    assert "download from" in unavailable("ds", "other.txt")  # a member the archive lacks


def test_bad_archive_is_removed(web, manifest, tmp_path):
    web.files["/set.zip"] = b"not a zip at all"
    manifest("ds", "a.txt", url=web.url("/set.zip"), member="set/a.txt", archive_sha256=sha(b"another"),
             archive_size=None, sha256=sha(BODY), size=len(BODY))
    assert "not the listed" in unavailable("ds", "a.txt")
    assert list((tmp_path / "cache" / "ds").iterdir()) == []


def test_order_cache_then_mirror_then_download(web, manifest, tmp_path, monkeypatch):
    web.files["/d/a.txt"], web.files["/d/b.txt"] = BODY, BODY + b"b\n"
    manifest("ds", "a.txt", url=web.url("/d/a.txt"), sha256=sha(BODY), size=len(BODY))
    manifest("ds", "b.txt", url=web.url("/d/b.txt"), sha256=sha(BODY + b"b\n"), size=len(BODY) + 2)
    mirror, cache = tmp_path / "mirror", tmp_path / "cache"
    (mirror / "ds").mkdir(parents=True)
    (mirror / "ds" / "b.txt").write_bytes(BODY + b"b\n")
    monkeypatch.setenv("DATA_MIRROR", str(mirror))
    assert F.fetch("ds", "a.txt", "b.txt") == mirror / "ds" / "b.txt"  # an alternative form at hand
    assert F.fetch("ds", "b.txt") == mirror / "ds" / "b.txt" and web.requests == []
    (mirror / "ds" / "a.txt").write_bytes(BODY)
    assert F.fetch("ds", "a.txt", "b.txt") == mirror / "ds" / "a.txt"  # the first form first
    (cache / "ds").mkdir(parents=True)
    (cache / "ds" / "a.txt").write_bytes(BODY)
    assert F.fetch("ds", "a.txt") == cache / "ds" / "a.txt" and web.requests == []
    (cache / "ds" / "a.txt").unlink()
    (mirror / "ds" / "a.txt").unlink()
    (mirror / "ds" / "b.txt").unlink()
    assert F.fetch("ds", "a.txt", "b.txt") == cache / "ds" / "a.txt"  # nowhere: the first form downloaded
    assert [r["path"] for r in web.requests] == ["/d/a.txt"]


def test_wrong_copy_in_the_mirror_is_named_and_kept(manifest, tmp_path, monkeypatch):
    manifest("ds", "a.txt", url="http://127.0.0.1:9/a.txt", sha256=sha(BODY), size=len(BODY))
    (tmp_path / "mirror" / "ds").mkdir(parents=True)
    (tmp_path / "mirror" / "ds" / "a.txt").write_bytes(BODY[::-1])
    monkeypatch.setenv("DATA_MIRROR", str(tmp_path / "mirror"))
    message = unavailable("ds", "a.txt")
    assert message.startswith(f"{tmp_path / 'mirror' / 'ds' / 'a.txt'}: SHA-256 {sha(BODY[::-1])[:12]}..., not the "
                              f"listed {sha(BODY)[:12]}... (data/manifest.json): another file; remove or replace it")
    assert (tmp_path / "mirror" / "ds" / "a.txt").read_bytes() == BODY[::-1]


def test_entry_without_sha256_records_the_first_download(web, manifest, tmp_path, capsys):
    web.files["/d/a.txt"] = BODY
    manifest("ds", "a.txt", url=web.url("/d/a.txt"), sha256=None, size=None)
    path = F.fetch("ds", "a.txt")
    assert path.read_bytes() == BODY
    assert (path.parent / "a.txt.sha256").read_text() == f"{sha(BODY)}  a.txt\n"
    assert sha(BODY) in capsys.readouterr().err
    path.write_bytes(BODY + b"changed later\n")  # later copies are checked against the recorded hash
    assert "not the listed" in unavailable("ds", "a.txt")


def test_uncaught_in_a_script_it_is_one_line_and_exit_1(tmp_path):
    code = ("import sys; from pathlib import Path; from data import fetch as F; F.CACHE = Path(sys.argv[1]); "
            "F.fetch('pydocs', 'python311_docs.jsonl.gz')")
    env = {**os.environ, "DATA_MIRROR": str(tmp_path / "empty")}
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr
    assert run.stderr.startswith("pydocs/python311_docs.jsonl.gz: not in ") and "has no download" in run.stderr


@pytest.mark.parametrize("tty", [False, True])
def test_progress_reports_after_a_few_seconds(monkeypatch, tty):
    clock, err = SimpleNamespace(now=1e9), io.StringIO()
    clock.time, err.isatty = lambda: clock.now, lambda: tty
    monkeypatch.setattr(F, "time", clock)
    monkeypatch.setattr(F.sys, "stderr", err)
    for _ in F.progress([b"x" * (1 << 20)] * 40, "a.zip", total=40 << 20, size=len):
        clock.now += 1.0  # one block a second: past 3 s it reports, on a terminal at most twice a second
    lines = [f"  a.zip: {n:.1f} of 40.0 MiB" for n in (range(4, 41) if tty else (4, 15, 26, 37))]
    expected = "".join("\r" + line for line in lines) + "\n" if tty else "".join(line + "\n" for line in lines)
    assert err.getvalue() == expected
    err.seek(0)
    err.truncate()
    assert list(F.progress(range(3), "fast")) == [0, 1, 2] and err.getvalue() == ""  # a quick loop says nothing


# ----------------------------------------------------------------------------- data/manifest.json itself
def entries():
    return [(ds, name, f) for ds, d in json.loads((ROOT / "data" / "manifest.json").read_text()).items()
            for name, f in d["files"].items()]


def test_manifest_entries_are_complete_and_pinned():
    datasets = json.loads((ROOT / "data" / "manifest.json").read_text())
    for ds, d in datasets.items():
        assert d["description"] and d["licence"] and d["read_by"], ds
    for ds, name, f in entries():
        where = f"{ds}/{name}"
        assert list(f)[:1] == ["url"] and f["source"], where
        assert f["url"] is None and "no download" in f["note"] or f["url"].startswith("https://"), where
        if f["url"] and "raw.githubusercontent.com" in f["url"]:
            assert re.search(r"/[0-9a-f]{40}/", f["url"]), f"{where}: a GitHub file at a pinned commit"
        assert f["sha256"] is None and "recorded" in f["note"] or re.fullmatch(r"[0-9a-f]{64}", f["sha256"]), where
        assert f["size"] is None or isinstance(f["size"], int), where
        assert "member" not in f or f["url"].endswith(".zip") and re.fullmatch(r"[0-9a-f]{64}", f["archive_sha256"])
    read = {("gsm8k", "train.jsonl"), ("gsm8k", "test.jsonl"), ("tinyshakespeare", "input.txt"),
            ("alpaca", "alpaca_data.json"), ("alpaca", "alpaca_data_1k.json"), ("pydocs", "Python-3.11.2.tar.xz"),
            ("pydocs", "python311_docs.jsonl.gz"), ("wikitext2", "wiki.test.raw"), ("ptb", "ptb.test.txt"),
            ("boolq", "dev.jsonl"), ("piqa", "valid.jsonl"), ("piqa", "valid-labels.lst"),
            ("hellaswag", "hellaswag_val.jsonl"), ("hellaswag", "hellaswag_val_full.txt.bz2"),
            ("winogrande", "dev.jsonl"), ("winogrande", "dev-labels.lst"), ("arc", "arc_easy.jsonl"),
            ("arc", "arc_challenge.jsonl"), ("openbookqa", "test.jsonl")}  # by the prepare scripts and eval.py
    assert read <= {(ds, name) for ds, name, _ in entries()}


def test_mirror_copies_are_the_listed_files():
    if not os.environ.get("DATA_MIRROR"):
        pytest.skip("DATA_MIRROR is not set: no mirror to check against data/manifest.json")
    found = 0
    for ds, name, f in entries():
        path = Path(os.environ["DATA_MIRROR"]) / ds / name
        if path.is_file():
            found += 1
            assert sha(path.read_bytes()) == f["sha256"] and path.stat().st_size == f["size"], f"{ds}/{name}"
    assert found, f"no file of data/manifest.json in DATA_MIRROR={os.environ['DATA_MIRROR']}"
