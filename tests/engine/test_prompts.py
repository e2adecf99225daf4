"""Prompts byte for byte: OPSD's templates (docs/fidelity.md) through a Qwen3-style chat template built offline,
exposure inside the markers with the answer always kept, user templates from YAML, the lab's own formats."""

import string

import pytest
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from atesd.engine.exposure import make_example
from atesd.engine.invocation import parse
from atesd.engine.task import (
    MATH,
    OPSD_INSTRUCTION,
    PromptTemplates,
    fill,
    get_task,
    load_templates,
    resolve_templates,
)

# Qwen3's chat template, the parts a single-turn user prompt touches (system, user turns, the generation
# prompt and its enable_thinking switch), written the way Qwen3's tokenizer_config.json writes them.
QWEN3_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

PROBLEM = "Let $f(x) = x^2$. Find $f(3) + {1}$."
SOLUTION = "We have f(3) = 9.\nAdding 1 gives 10.\nSo the answer is \\boxed{10}."
STUDENT_TEXT = (
    "<|im_start|>user\nProblem: Let $f(x) = x^2$. Find $f(3) + {1}$.\n\n"
    "Please reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
    "<|im_start|>assistant\n<think>\n\n</think>\n\n"
)
INSTRUCTION = (
    "After reading the reference solution above, make sure you truly understand the reasoning behind each "
    "step \u2014 do not copy or paraphrase it. Now, using your own words and independent reasoning, derive the "
    "same final answer to the problem above. Think step by step, explore different approaches, and don't be "
    "afraid to backtrack or reconsider if something doesn't work out:"
)


def teacher_text(reference: str) -> str:
    return (
        "<|im_start|>user\nProblem: Let $f(x) = x^2$. Find $f(3) + {1}$.\n\n"
        "Here is a reference solution to this problem:\n=== Reference Solution Begin ===\n"
        f"{reference}\n=== Reference Solution End ===\n\n\n{INSTRUCTION}\n\n"
        "Please reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
        "<|im_start|>assistant\n"  # teacher thinking on: no empty think block
    )


@pytest.fixture(scope="module")
def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character (printable ASCII and the em dash), Qwen3's special tokens and chat template."""
    chars = sorted(set(string.printable) - set("\x0b\x0c\r")) + ["\u2014"]
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<|endoftext|>"))
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=SPECIALS[1:])
    fast.chat_template = QWEN3_TEMPLATE
    return fast


def test_opsd_student_and_teacher_byte_exact(char_tokenizer):
    tok = char_tokenizer
    ex = make_example(tok, PROBLEM, SOLUTION, templates=MATH.templates)
    assert OPSD_INSTRUCTION == INSTRUCTION
    assert tok.decode(ex.student_prompt) == STUDENT_TEXT
    # full exposure is OPSD's teacher; alpha = 0 keeps the answer line only, always inside the markers
    assert tok.decode(ex.teacher_prompt(ex.cut(1.0))) == teacher_text(SOLUTION)
    assert tok.decode(ex.teacher_prompt(ex.cut(0.0))) == teacher_text("So the answer is \\boxed{10}.")
    half = ex.cut(0.5, mode="lines")
    assert tok.decode(ex.teacher_prompt(half)) == teacher_text("We have f(3) = 9.\nSo the answer is \\boxed{10}.")
    # token mode: a prefix of the reasoning cut inside a line, closed with a newline, then the answer line
    cut = ex.cut(0.3)
    assert 0 < cut and SOLUTION[cut - 1] != "\n"
    assert tok.decode(ex.teacher_prompt(cut)) == teacher_text(SOLUTION[:cut] + "\nSo the answer is \\boxed{10}.")
    assert ex.teacher_text(cut) == teacher_text(SOLUTION[:cut] + "\nSo the answer is \\boxed{10}.")
    # the same text the chat template gives for the documented message
    msgs = MATH.templates.teacher_messages(PROBLEM, SOLUTION)
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True,
                                   enable_thinking=True) == teacher_text(SOLUTION)


def test_fill_is_one_pass_and_keeps_braces():
    out = fill("A {problem} B \\boxed{} {reference}", problem="{reference} x{y}", reference="R")
    assert out == "A {reference} x{y} B \\boxed{} R"
    with pytest.raises(ValueError, match="reference"):
        PromptTemplates("{problem}", "{problem} no slot")
    with pytest.raises(ValueError, match="problem"):
        PromptTemplates("no slot", "{problem} {reference}")


def test_user_templates_from_yaml_file_and_config(char_tokenizer, tmp_path):
    tok = char_tokenizer
    f = tmp_path / "prompts.yaml"
    f.write_text('student: "Q: {problem}"\nteacher: "Q: {problem}\\n<ref>\\n{reference}\\n</ref>\\n{instruction}"\n'
                 'instruction: "Solve it."\nteacher_thinking: false\n')
    t = resolve_templates(get_task("math"), str(f))
    ex = make_example(tok, "1+1?", "1+1=2\n\\boxed{2}", templates=t)
    think_off = "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert tok.decode(ex.student_prompt) == "<|im_start|>user\nQ: 1+1?<|im_end|>\n" + think_off
    assert tok.decode(ex.teacher_prompt(ex.cut(0.0))) == (
        "<|im_start|>user\nQ: 1+1?\n<ref>\n\\boxed{2}\n</ref>\nSolve it.<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    # a mapping in the --config YAML, a file by flag, the instruction flag on top; bad keys fail by name
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("prompts:\n  instruction: Mine.\nteacher_thinking: false\n")
    cfg, _ = parse(["--model", "qwen3-1.7b", "--config", str(cfg_file)])
    assert resolve_templates(get_task(cfg.task), cfg.prompts).instruction == "Mine."
    cfg, _ = parse(["--model", "qwen3-1.7b", "--prompts", str(f), "--instruction", "Flag."])
    assert resolve_templates(get_task(cfg.task), cfg.prompts, instruction=cfg.instruction).instruction == "Flag."
    with pytest.raises(ValueError, match="studnet"):
        load_templates({"studnet": "{problem}"})


def test_recipes_choose_templates():
    assert parse(["--model", "qwen3-8b"])[0].task == "math"  # OPSD's prompts for real models
    assert parse([])[0].task == "lab"  # the embedded default keeps the lab's formats
    assert MATH.templates.teacher_thinking and not MATH.templates.student_thinking
    lab = get_task("lab").templates
    assert lab.student == "{problem}" and "Reference solution:" in lab.teacher and not lab.teacher_thinking
