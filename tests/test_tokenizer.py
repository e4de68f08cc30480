"""dlm.tokenizer: byte-level BPE training, special roles, loading foreign tokenizers.

    python -m pytest tests/test_tokenizer.py -q
"""

import random

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from dlm.errors import DLMError
from dlm.tokenizer import (
    BOS,
    EOS,
    MASK,
    PAD,
    check_tokenizer,
    load_tokenizer,
    model_vocab_size,
    special_token_ids,
    tokenizer_fingerprint,
    train_tokenizer,
)

WORDS = "the cat sat on a mat while the dog ran in the park and a bird sang over the old red house".split()


def _texts(n=300, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30))) for _ in range(n)]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    train_tokenizer(_texts(), d, vocab_size=400)
    return d


@pytest.fixture(scope="module")
def tok(tok_dir):
    return AutoTokenizer.from_pretrained(str(tok_dir))


def _bare_bpe(eos="<|endoftext|>"):
    """A byte-level BPE with only an end-of-text token (GPT-2 style): no MASK, PAD or BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[eos], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(_texts(50), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=eos)


@pytest.mark.parametrize("text", [
    "the cat sat on the mat.",
    "Ünïcödé: naïve café, 日本語のテキスト, Ελληνικά, עברית, emoji 🐈‍⬛🎉",
    "  leading\n\n\ttabs\t\tand   many    spaces \r\n trailing   \n\n",
    "",
    "<not|special> <|mask> |> \x00\x7f",
])
def test_round_trip(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert tok.encode(text) == ids  # encoding never adds BOS/EOS on its own


def test_special_tokens_distinct_and_reloaded(tok_dir, tok):
    ids = special_token_ids(tok)
    assert set(ids) == {"bos", "eos", "pad", "mask"}
    assert len(set(ids.values())) == 4
    assert [tok.bos_token, tok.eos_token, tok.pad_token, tok.mask_token] == [BOS, EOS, PAD, MASK]
    # A special token in the text is one id, and decodes back.
    enc = tok.encode(f"a {MASK} b", add_special_tokens=False)
    assert ids["mask"] in enc and tok.decode(enc) == f"a {MASK} b"
    # load_tokenizer on our own directory changes nothing.
    again = load_tokenizer(str(tok_dir))
    assert special_token_ids(again) == ids and len(again) == len(tok)
    assert tokenizer_fingerprint(again) == tokenizer_fingerprint(tok)


def test_train_returns_saved_tokenizer(tmp_path):
    t = train_tokenizer(iter(_texts(100)), tmp_path / "t", vocab_size=300)
    assert (tmp_path / "t" / "tokenizer.json").is_file()
    re = AutoTokenizer.from_pretrained(str(tmp_path / "t"))
    assert len(re) == len(t) <= 300
    assert re.model_max_length >= 10**6
    assert special_token_ids(re) == special_token_ids(t) == {"bos": 0, "eos": 1, "pad": 2, "mask": 3}


def test_train_errors(tmp_path):
    with pytest.raises(DLMError, match="vocab-size"):
        train_tokenizer(_texts(10), tmp_path / "a", vocab_size=100)
    with pytest.raises(DLMError, match="no text"):
        train_tokenizer(["", ""], tmp_path / "b", vocab_size=300)


def test_load_tokenizer_adds_missing_roles(tmp_path):
    bare = _bare_bpe()
    n = len(bare)
    with pytest.raises(DLMError, match="MASK"):
        check_tokenizer(bare)
    bare.save_pretrained(str(tmp_path / "bare"))

    tok = load_tokenizer(str(tmp_path / "bare"))
    check_tokenizer(tok)
    ids = special_token_ids(tok)
    assert tok.mask_token == MASK and tok.pad_token == PAD
    assert ids["bos"] == ids["eos"] == bare.eos_token_id  # BOS reuses EOS, as in GPT-2
    assert {ids["mask"], ids["pad"]} == {n, n + 1}  # appended after the existing vocabulary
    assert tok.encode(f"x{MASK}", add_special_tokens=False)[-1] == ids["mask"]

    tok.save_pretrained(str(tmp_path / "filled"))  # the roles survive a save / load
    assert special_token_ids(AutoTokenizer.from_pretrained(str(tmp_path / "filled"))) == ids


def test_load_tokenizer_adds_eos_when_none(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    PreTrainedTokenizerFast(tokenizer_object=bpe).save_pretrained(str(tmp_path / "t"))
    tok = load_tokenizer(str(tmp_path / "t"))
    assert tok.eos_token == EOS and tok.bos_token == EOS
    assert len(set(special_token_ids(tok).values())) == 3  # bos = eos, pad, mask


def test_load_tokenizer_json_file(tok_dir):
    tok = load_tokenizer(str(tok_dir / "tokenizer.json"))
    assert tok.mask_token == MASK
    assert tok.decode(tok.encode("the cat", add_special_tokens=False)) == "the cat"


def test_check_tokenizer_mask_clash(tok):
    clash = _bare_bpe()
    clash.add_special_tokens({"mask_token": clash.eos_token, "pad_token": PAD, "bos_token": clash.eos_token})
    with pytest.raises(DLMError, match="MASK token is also"):
        check_tokenizer(clash)


@pytest.mark.parametrize("name", ["missing/dir/tok", "./nope", "tok.json"])
def test_load_tokenizer_missing_path(tmp_path, name):
    with pytest.raises(DLMError, match="dlm tokenizer train"):
        load_tokenizer(str(tmp_path / name) if name.startswith("missing") else name)


def test_load_tokenizer_hub_name_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DLMError, match="no-such-org-dlm/no-such-tokenizer"):
        load_tokenizer("no-such-org-dlm/no-such-tokenizer")


def test_load_tokenizer_empty_dir(tmp_path):
    with pytest.raises(DLMError, match="no tokenizer files"):
        load_tokenizer(str(tmp_path))


class _Len:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


@pytest.mark.parametrize("n, multiple, want", [(296, 64, 320), (320, 64, 320), (1, 64, 64), (257, 1, 257),
                                               (50259, 64, 50304), (4100, 128, 4224)])
def test_model_vocab_size(n, multiple, want):
    assert model_vocab_size(_Len(n), multiple) == want


def test_model_vocab_size_real(tok):
    v = model_vocab_size(tok)
    assert v % 64 == 0 and len(tok) <= v < len(tok) + 64


def test_load_tokenizer_corrupt_dir(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(DLMError, match="could not load tokenizer"):
        load_tokenizer(str(tmp_path))
