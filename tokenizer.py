"""
Byte-level BPE tokenizer: Hugging Face's tokenizer.json turned into a tiktoken.Encoding.

tiktoken merges the adjacent pair whose merged token has the lowest rank; HF merges by the order of
its merges list. With rank = token id and the vocabulary ordered like the merges (true of GPT-2-style
BPE vocabularies, checked below), the two agree. The split pattern comes from the pre-tokenizer.
"""
import json
from functools import lru_cache
from pathlib import Path

import tiktoken

# Pre-tokenizer regexes (tiktoken syntax). GPT-2's, and SmolLM2's: digits one by one, then GPT-2's.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
SMOLLM_PATTERN = r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
LLAMA3_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


@lru_cache(None)
def byte_decoder():
    """GPT-2's map from the printable unicode stand-ins in vocab strings back to raw bytes: printable
    bytes stand for themselves, the n-th non-printable byte is written as chr(256 + n)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(others)}


def split_pattern(pre, where):
    """tiktoken regex for an HF pre_tokenizer config (SmolLM2, GPT-2, Llama-3 forms)."""
    if pre is None:
        raise ValueError(f"{where}: no pre_tokenizer; expected a byte-level BPE tokenizer")
    kinds = [p["type"] for p in pre.get("pretokenizers", [pre])]
    if kinds == ["ByteLevel"]:
        return GPT2_PATTERN
    if kinds == ["Digits", "ByteLevel"] and pre["pretokenizers"][0].get("individual_digits"):
        return SMOLLM_PATTERN
    if kinds == ["Split", "ByteLevel"]:
        regex = pre["pretokenizers"][0]["pattern"].get("Regex")
        if regex and regex.replace("\\p{N}{1,3}", "") != regex:
            return LLAMA3_PATTERN
    raise ValueError(f"{where}: pre-tokenizer {kinds} is not one this tokenizer can represent")


class Tokenizer:
    def __init__(self, enc: tiktoken.Encoding, n_vocab, specials: dict, bos=None, eos=None, add_bos=False, chat="chatml"):
        self.enc, self.n_vocab, self.specials, self.add_bos, self.chat = enc, n_vocab, specials, add_bos, chat
        self.bos_id, self.eos_id = specials.get(bos), specials.get(eos)
        self.unencodable = set(range(n_vocab, enc.max_token_value + 1))  # stand-ins for bytes the vocab lacks

    @classmethod
    def from_pretrained(cls, folder):
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"{folder}: no tokenizer.json")
        tj = json.loads(path.read_text(encoding="utf-8"))
        model = tj.get("model", {})
        if model.get("type") != "BPE" or model.get("byte_fallback") or tj.get("normalizer"):
            kind = model.get("type") if model.get("type") != "BPE" else "BPE with byte fallback (SentencePiece style)"
            raise ValueError(f"{path}: tokenizer type {kind} cannot be represented; only byte-level BPE "
                             f"(GPT-2, SmolLM2, Llama-3 style) is supported")
        cfg_path = folder / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.exists() else {}
        specials = {t["content"]: t["id"] for t in tj.get("added_tokens", [])}
        dec = byte_decoder()
        ranks = {}
        for token, i in model["vocab"].items():
            if token in specials:
                continue
            ranks[bytes(dec[c] for c in token)] = i
        # Bytes the vocabulary lacks: HF drops them silently (no unk token); tiktoken needs every single
        # byte, so they get ids past the vocabulary, which encode() then drops the same way.
        top = max([*model["vocab"].values(), *specials.values()]) + 1
        missing = [b for b in range(256) if bytes([b]) not in ranks]
        ranks.update({bytes([b]): top + n for n, b in enumerate(missing)})
        enc = tiktoken.Encoding(name=folder.name, pat_str=split_pattern(tj.get("pre_tokenizer"), path),
                                mergeable_ranks=ranks, special_tokens=specials)
        name = lambda v: v.get("content") if isinstance(v, dict) else v
        chat = "llama3" if "<|start_header_id|>" in specials else "chatml"
        return cls(enc, top, specials, name(cfg.get("bos_token")), name(cfg.get("eos_token")),
                   cfg.get("add_bos_token", False), chat)

    def encode(self, text: str, allow_special=True, bos=None) -> list[int]:
        """Special tokens written in the text (e.g. <|im_start|>) become their ids, as HF does by default."""
        ids = self.enc.encode(text, allowed_special="all" if allow_special else set(), disallowed_special=())
        if not self.unencodable.isdisjoint(ids):
            ids = self.encode_dropping_missing_bytes(text, allow_special)
        if (self.add_bos if bos is None else bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def encode_dropping_missing_bytes(self, text, allow_special):
        """HF drops bytes its vocabulary lacks inside each pre-token *before* merging, so '!\\x04!' is the
        single token '!!'. Redo that piece by piece; only text with such bytes takes this slow path."""
        import regex  # tiktoken's own dependency, for the \p{..} in the split pattern
        missing = {self.enc.decode_single_token_bytes(i)[0] for i in self.unencodable}
        specials = sorted(self.specials, key=len, reverse=True) if allow_special else []
        parts = regex.split("(" + "|".join(map(regex.escape, specials)) + ")", text) if specials else [text]
        ids = []
        for n, part in enumerate(parts):
            if n % 2:  # split() puts the matched special tokens at odd positions
                ids.append(self.specials[part])
                continue
            for piece in regex.findall(self.enc._pat_str, part):
                kept = bytes(b for b in piece.encode() if b not in missing)
                ids += self.enc._encode_single_piece(kept) if kept else []
        return ids

    def decode(self, ids) -> str:
        bad = [i for i in ids if not 0 <= i < self.n_vocab]
        if bad:
            raise ValueError(f"token ids outside the vocabulary [0, {self.n_vocab}): {bad[:5]}")
        return self.enc.decode(list(ids))

    def apply_chat(self, messages, add_generation_prompt=True) -> str:
        """The model's chat format: ChatML (SmolLM2, with its default system prompt) or Llama-3."""
        if self.chat == "llama3":
            s = "<|begin_of_text|>" + "".join(
                f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>" for m in messages)
            return s + ("<|start_header_id|>assistant<|end_header_id|>\n\n" if add_generation_prompt else "")
        s = ""
        if messages and messages[0]["role"] != "system":
            s = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        s += "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return s + ("<|im_start|>assistant\n" if add_generation_prompt else "")

    @property
    def stop_ids(self):
        """Ids that end a chat turn."""
        return [self.specials[t] for t in ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>")
                if t in self.specials]
