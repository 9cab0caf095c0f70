"""
Tiny Shakespeare -> data/shakespeare/{train,val}.bin, meta.json (plain text, no loss mask).

Raw data (default ../shared/data/tinyshakespeare/): input.txt (1,115,394 characters, public domain), from
  https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt

train: the first 90% of the characters, val: the last 10%, each encoded as one document.

    python data/shakespeare/prepare.py [--src DIR|FILE] [--model DIR] [--out DIR]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # data/, for common.py
import common  # noqa: E402

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


def main(argv=None):
    args = common.parse_args(__doc__, __file__, "tinyshakespeare", argv)
    path = common.source_file(args.src, "input.txt", what="input.txt (Tiny Shakespeare, plain text)", url=URL)
    tok = common.load_tokenizer(args.model)
    text = path.read_text(encoding="utf-8")
    n = int(0.9 * len(text))
    splits = {"train": [common.encode_text(tok, text[:n])], "val": [common.encode_text(tok, text[n:])]}
    return common.write_outputs(args, tok, splits, path)


if __name__ == "__main__":
    main()
