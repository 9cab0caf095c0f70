"""
Tiny Shakespeare -> data/shakespeare/{train,val}.bin, meta.json (plain text, no loss mask).

Raw data: input.txt (1,115,394 characters, public domain), data/manifest.json's "tinyshakespeare"
(karpathy/char-rnn), or --src DIR|FILE of your own.

train: the first 90% of the characters, val: the last 10%, each encoded as one document.

    python data/shakespeare/prepare.py [--src DIR|FILE] [--model DIR] [--out_dir DIR]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # data/, for common.py
import common  # noqa: E402


def main(argv=None):
    args = common.parse_args(__doc__, __file__, argv)
    path = common.raw_file(args, "tinyshakespeare", "input.txt", what="input.txt (Tiny Shakespeare, plain text)")
    tok = common.load_tokenizer(args.model)
    text = path.read_text(encoding="utf-8")
    n = int(0.9 * len(text))
    splits = {"train": [common.encode_text(tok, text[:n])], "val": [common.encode_text(tok, text[n:])]}
    return common.write_outputs(args, tok, splits, path)


if __name__ == "__main__":
    main()
