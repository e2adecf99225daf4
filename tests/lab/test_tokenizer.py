import string

import pytest

from atesd.engine.lab import TINY_MODEL_DIR, generate_problems
from atesd.engine.lab.prompts import expose_reference, student_messages, teacher_messages
from atesd.engine.lab.task import CONTAINERS
from atesd.engine.lab.tokenizer import SPECIAL_TOKENS, build_tokenizer


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    texts = []
    for p in generate_problems(300, 0):
        texts += [p["problem"] + "\n" + p["solution"], teacher_messages(p["problem"], p["solution"])[0]["content"]]
    return texts


@pytest.fixture(scope="module")
def shipped():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY_MODEL_DIR)


def _check(tok, vocab_size: int) -> None:
    assert len(tok) <= vocab_size
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    # digits and arithmetic symbols are single tokens, so arithmetic stays digit by digit
    for ch in string.digits + "+-*={}\\\n":
        assert len(tok(ch, add_special_tokens=False)["input_ids"]) == 1, repr(ch)
    for p in generate_problems(40, 9):
        for text in (p["problem"], p["solution"], expose_reference(p["solution"], 0.5, "chars")):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert tok.decode(ids) == text
            assert len(ids) < len(text)  # BPE merges the words
        for digits in (p["answer"], *(str(a * b) for a, b in p["groups"])):
            assert len(tok(digits, add_special_tokens=False)["input_ids"]) == len(digits)
    text = tok.apply_chat_template(student_messages("Ann has 3 tins."), tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nAnn has 3 tins.<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_build_tokenizer(corpus):
    tok = build_tokenizer(corpus, vocab_size=300)
    _check(tok, 300)
    # never splits a number's digits into a merged piece, even for a corpus full of one number
    tok2 = build_tokenizer(["12+12=24 " * 50] * 20, vocab_size=200)
    assert tok2.tokenize("1212") == ["1", "2", "1", "2"]


def test_shipped_tokenizer(shipped):
    _check(shipped, 512)
    # the container a group names (the fact only a reference states) is told apart at its first token
    first = [shipped.tokenize(f" {word}")[0] for word in CONTAINERS]
    assert len(set(first)) == len(CONTAINERS), first


def test_vocab_size_must_cover_the_alphabet(corpus):
    with pytest.raises(ValueError, match="vocab_size"):
        build_tokenizer(corpus, vocab_size=50)
