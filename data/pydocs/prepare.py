"""
Python 3.11 documentation (reST sources) -> data/pydocs/{train,val}.bin, meta.json (plain text, no mask).

Raw data (default ../shared/data/pydocs/): python311_docs.jsonl.gz, one line {"path", "text"} per page (497
pages, 11.0 M characters, PSF License), the usr/share/doc/python3.11/html/_sources/**/*.rst.txt files of the
Debian package python3.11-doc 3.11.2-6+deb12u9 (.rst.txt trimmed to .rst in "path"):
  https://packages.debian.org/bookworm/python3.11-doc
(the same pages are online as https://docs.python.org/3.11/_sources/<page>.rst.txt).

Each page is encoded as plain text (special-token strings stay text) followed by <|endoftext|> (the eos
token if the vocabulary has none). Pages are shuffled with seed 1337; the last 5% are val, so train and
val never share a page.

    python data/pydocs/prepare.py [--src DIR|FILE] [--model DIR] [--out DIR]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # data/, for common.py
import common  # noqa: E402

URL = "https://packages.debian.org/bookworm/python3.11-doc"


def main(argv=None):
    args = common.parse_args(__doc__, __file__, "pydocs", argv)
    path = common.source_file(args.src, "python311_docs.jsonl.gz",
                              what='python311_docs.jsonl.gz (gzipped JSON lines of {"path", "text"})', url=URL)
    tok = common.load_tokenizer(args.model)
    eot = tok.specials.get("<|endoftext|>", tok.eos_id)
    pages = common.read_records(path, ("text",))
    train, val = common.split_off(pages, round(0.05 * len(pages)))
    splits = {name: [common.encode_text(tok, p["text"]) + [eot] for p in part]
              for name, part in (("train", train), ("val", val))}
    return common.write_outputs(args, tok, splits, path)


if __name__ == "__main__":
    main()
