"""The tokenizer against Hugging Face's `tokenizers` (where installed), the golden chat prompt, the
model's own jinja chat template, and round trips decode(encode(s)) == s."""
import json

import pytest

from tokenizer import Tokenizer

try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # the property tests skip; the hand cases still run
    st = None

# Bytes the SmolLM2 vocabulary has no token for. HF drops them silently (there is no unk token), so
# text containing them cannot round trip: these control characters, and code points whose UTF-8 lead
# byte is F1 or F2 (U+40000..U+BFFFF). 0xC0, 0xC1 and 0xF5..0xFF never occur in valid UTF-8.
MISSING_BYTES = [0x04, 0x06, 0x13, 0x14, 0x16, 0x1D, 0xC0, 0xC1, 0xF1, 0xF2, *range(0xF5, 0x100)]
LOST_CHARS = "\x04\x06\x13\x14\x16\x1d"
LOST_PLANES = (0x40000, 0xBFFFF)


def property_test(make_strategy):
    """@given(text=make_strategy()), 300 examples, derandomized (the same every run), no example database;
    a skipped test where hypothesis is not installed."""
    if st is None:
        return pytest.mark.skip(reason="hypothesis is not installed")
    return lambda test: settings(derandomize=True, max_examples=300, deadline=None, database=None)(
        given(text=make_strategy())(test))


def whitespace_heavy():
    return st.text(st.sampled_from(list(" \t\n\r\x0b\x0c\x85\xa0\u2028\u3000\u200b a1é!")), max_size=40)


def round_trip_text():
    """Everything UTF-8 can carry except the lost characters above; hypothesis favours low code points,
    and whitespace-heavy strings are mixed in."""
    chars = (st.characters(codec="utf-8", max_codepoint=LOST_PLANES[0] - 1, exclude_characters=LOST_CHARS)
             | st.characters(codec="utf-8", min_codepoint=LOST_PLANES[1] + 1))
    return st.one_of(st.text(chars, max_size=60), whitespace_heavy())


def any_text():
    """Anything, lost characters included, with special tokens and lost bytes among punctuation."""
    lost_among_punctuation = st.text(st.sampled_from(list("!=.-_ a1\x04\x13\U00040000")), max_size=20)
    pieces = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", " user", "\n", "x", "12", "\x04", "!", "\U00040000", "  "]
    return st.one_of(st.text(st.characters(codec="utf-8"), max_size=60), whitespace_heavy(), lost_among_punctuation,
                     st.lists(st.sampled_from(pieces), max_size=12).map("".join))


HAND_CASES = [
    "", " ", "  ", "a", "hello world", "Hello, World!", "\t", "\ttabbed\tline\t", "a\r\nb\r\n", "\r\r\n\n",
    "runs    of     spaces   ", "   leading and trailing   ", "\n\n\n", " \n \n ", "1234567", "3.14159",
    "$1,234,567.89", "-42e+10", "2024-01-22T12:12:53Z", "I'm, you're, they'll, she'd, WE'VE, it's, 'quoted'",
    "def f(x):\n    return x ** 2  # square\n", "for (int i = 0; i < n; ++i) { a[i] = b[i]; }",
    "<html><body class=\"x\">&amp;</body></html>", "emoji 😀 👩‍👩‍👧 🇫🇷 ❤️", "漢字かなカナ한국어 中文测试",
    "e\u0301 n\u0303 a\u0308\u0301", "\u00a0nbsp\u00a0", "zero\u200bwidth", "العربية", "हिन्दी", "ελληνικά",
    "\U0001f600\U0010ffff\U000c0000", "a" * 500, "ab " * 200,
    "<|im_start|>user\nHi<|im_end|>\n", "<|endoftext|>", "<|im_start", "text<|im_end|>more", "<|im_end|><|im_end|>",
]


def bytes_to_unicode():
    """GPT-2's byte -> printable character table (openai/gpt-2 encoder.py), written out independently."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


@pytest.fixture(scope="module")
def hf_tokenizer(model_dir):
    tokenizers = pytest.importorskip("tokenizers")
    return tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))


def test_the_missing_bytes_are_those_the_vocabulary_lacks(model_dir):
    vocab = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
    byte_char = bytes_to_unicode()
    assert [b for b in range(256) if byte_char[b] not in vocab] == MISSING_BYTES


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("text", HAND_CASES)
def test_round_trip_hand_cases(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


@property_test(round_trip_text)
def test_round_trip_arbitrary_text(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_lost_characters_are_dropped(tokenizer):
    for c in LOST_CHARS:
        assert tokenizer.encode(c) == []
        assert tokenizer.decode(tokenizer.encode(f"a{c}b {c} !{c}!")) == "ab  !!"
        # dropped inside a pre-token *before* merging, so the neighbours merge as if adjacent
        assert tokenizer.encode(f"=={c}==") == tokenizer.encode("====")
    # U+40000: F1 80 80 80; the lead byte goes, the continuation bytes stay (and decode to U+FFFD)
    assert tokenizer.encode("\U00040000") == tokenizer.encode("\x80")[1:] * 3


def test_lost_characters_are_dropped_as_hugging_face_drops_them(tokenizer, hf_tokenizer):
    contexts = ["{}", "a{}b", " {}", "{} x", "!{}!", "=={}==", "..{}..", "12{}3", "<|im_start|>{}<|im_end|>", "{}{}"]
    for c in [*LOST_CHARS, "\U00040000", "\U000bffff", "\U00080a0b"]:
        for context in contexts:
            text = context.replace("{}", c)
            assert tokenizer.encode(text) == hf_tokenizer.encode(text).ids, repr(text)


# ----------------------------------------------------------------------------- against Hugging Face
@pytest.mark.parametrize("text", HAND_CASES)
def test_ids_match_hugging_face_hand_cases(tokenizer, hf_tokenizer, text):
    assert tokenizer.encode(text) == hf_tokenizer.encode(text).ids


@property_test(any_text)
def test_ids_match_hugging_face_arbitrary_text(tokenizer, hf_tokenizer, text):
    assert tokenizer.encode(text) == hf_tokenizer.encode(text).ids


def test_ids_match_hugging_face_on_golden_texts(tokenizer, hf_tokenizer, golden):
    for entry in golden["texts"]:
        assert tokenizer.encode(entry["text"]) == hf_tokenizer.encode(entry["text"]).ids


def test_decode_matches_hugging_face(tokenizer, hf_tokenizer, golden):
    for entry in golden["texts"] + [{"ids": list(range(0, 49152, 97))}]:
        assert tokenizer.decode(entry["ids"]) == hf_tokenizer.decode(entry["ids"], skip_special_tokens=False)


def test_decode_refuses_ids_outside_the_vocabulary(tokenizer):
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 49152\): \[49152\]"):
        tokenizer.decode([1, 49152])


# ----------------------------------------------------------------------------- chat format
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}],
    [{"role": "user", "content": "  spaced\n\ncontent  "}, {"role": "assistant", "content": "ok"}],
]


def test_chat_prompt_equals_golden(tokenizer, golden):
    chat = golden["greedy"][1]
    assert tokenizer.apply_chat([{"role": "user", "content": "What is the capital of France?"}]) == chat["prompt"]
    assert tokenizer.encode(chat["prompt"]) == chat["prompt_ids"]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_matches_the_models_jinja_template(tokenizer, model_dir, messages, add_generation_prompt):
    jinja2 = pytest.importorskip("jinja2")
    template = json.loads((model_dir / "tokenizer_config.json").read_text())["chat_template"]
    expected = jinja2.Template(template).render(messages=messages, add_generation_prompt=add_generation_prompt)
    assert tokenizer.apply_chat(messages, add_generation_prompt=add_generation_prompt) == expected


def test_stop_ids(tokenizer):
    assert 2 in tokenizer.stop_ids and tokenizer.decode([2]) == "<|im_end|>"


# ----------------------------------------------------------------------------- unsupported tokenizers
def write_tokenizer(folder, model):
    tj = {"version": "1.0", "added_tokens": [], "normalizer": None, "pre_tokenizer": None, "decoder": None,
          "model": model}
    (folder / "tokenizer.json").write_text(json.dumps(tj))
    return folder


def test_unigram_tokenizer_is_refused(tmp_path):
    write_tokenizer(tmp_path, {"type": "Unigram", "unk_id": 0, "vocab": [["<unk>", 0.0], ["▁a", -1.0]]})
    with pytest.raises(ValueError, match="tokenizer type Unigram"):
        Tokenizer.from_pretrained(tmp_path)


def test_sentencepiece_style_bpe_is_refused(tmp_path):
    write_tokenizer(tmp_path, {"type": "BPE", "byte_fallback": True, "unk_token": "<unk>",
                               "vocab": {"<unk>": 0, "<0x00>": 1, "▁": 2, "a": 3}, "merges": []})
    with pytest.raises(ValueError, match="byte fallback"):
        Tokenizer.from_pretrained(tmp_path)


def test_folder_without_tokenizer_json_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
