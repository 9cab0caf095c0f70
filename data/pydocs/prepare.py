"""
Python 3.11 documentation (reST sources) -> data/pydocs/{train,val}.bin, meta.json (plain text, no mask).

Raw data (PSF License), data/manifest.json's "pydocs": python311_docs.jsonl.gz, one line {"path", "text"}
per page (the reST sources of the Debian package python3.11-doc), when the cache or DATA_MIRROR has it; else
CPython 3.11.2's source release Python-3.11.2.tar.xz, whose Doc/**/*.rst pages are read from the tarball
(the same kind of pages, not byte-identical ones). Or --src DIR|FILE of your own in either form.

Each page is encoded as plain text (special-token strings stay text) followed by <|endoftext|> (the eos
token if the vocabulary has none). Pages, sorted by path, are shuffled with seed 1337; the last 5% are val,
so train and val never share a page.

    python data/pydocs/prepare.py [--src DIR|FILE] [--model DIR] [--out_dir DIR]
"""
import re
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # data/, for common.py
import common  # noqa: E402


def tarball_pages(path):
    """{path, text} of each Doc/**/*.rst of a CPython source tarball but Doc/README.rst, sorted by path."""
    pages = []
    with tarfile.open(path) as tar:
        for m in common.progress(tar, f"{path.name}: files read"):
            page = re.fullmatch(r"[^/]+/Doc/(.+\.rst)", m.name)  # Python-3.11.2/Doc/library/os.rst
            if m.isfile() and page and page[1] != "README.rst":
                pages.append({"path": page[1], "text": tar.extractfile(m).read().decode("utf-8")})
    if not pages:
        raise SystemExit(f"{path}: no Doc/**/*.rst pages in it; expected a CPython source tarball")
    return sorted(pages, key=lambda p: p["path"])


def main(argv=None):
    args = common.parse_args(__doc__, __file__, argv)
    path = common.raw_file(args, "pydocs", "Python-3.11.2.tar.xz", "python311_docs.jsonl.gz",
                           what='Python-3.11.2.tar.xz (CPython\'s source) or python311_docs.jsonl.gz (gzipped JSON '
                                'lines of {"path", "text"})')
    tok = common.load_tokenizer(args.model)
    eot = tok.specials.get("<|endoftext|>", tok.eos_id)
    pages = tarball_pages(path) if ".tar" in path.name else common.read_records(path, ("text",))
    train, val = common.split_off(pages, round(0.05 * len(pages)))
    splits = {name: [common.encode_text(tok, p["text"]) + [eot] for p in common.progress(part, "pages", len(part))]
              for name, part in (("train", train), ("val", val))}
    return common.write_outputs(args, tok, splits, path)


if __name__ == "__main__":
    main()
