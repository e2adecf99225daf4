"""The lab plugs in as the task 'lab': its prompts stay the formats the shipped tiny model was trained on."""

from transformers import AutoTokenizer

from atesd.engine.data import load_rows
from atesd.engine.exposure import make_example
from atesd.engine.invocation import parse
from atesd.engine.lab import TINY_MODEL_DIR, lab_dataset
from atesd.engine.lab.prompts import DEFAULT_INSTRUCTION, expose_reference, student_messages, teacher_messages
from atesd.engine.models import resolve_model_path
from atesd.engine.task import get_task, resolve_templates


def test_lab_task_is_reached_by_name_only():
    task = get_task("lab")
    assert task.name == "lab" and task.verify("so \\boxed{7}", "7") and not task.verify("\\boxed{8}", "7")
    assert task.models == {"tiny": TINY_MODEL_DIR} and resolve_model_path("tiny") == TINY_MODEL_DIR
    assert task.dataset("test", 6, 0, levels=(1, 2)) == lab_dataset("test", 6, 0, levels=(1, 2))
    rows = load_rows("lab", task_options={"size": 5, "levels": "2"}, seed=3)
    assert [r["problem"] for r in rows] == [r["problem"] for r in lab_dataset("train", 5, 3, levels=(2,))]


def test_embedded_default_prompts_are_the_pretraining_formats():
    cfg, _ = parse([])
    tok = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    templates = resolve_templates(get_task(cfg.task), cfg.prompts, instruction=cfg.instruction,
                                  teacher_thinking=cfg.teacher_thinking)
    row = lab_dataset("train", 1, 0, levels=(2,))[0]
    ex = make_example(tok, row["problem"], row["solution"], row["answer"], templates=templates)
    chat = lambda msgs: tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    # exactly what engine/lab/pretrain.py renders (it uses these same message functions)
    assert tok.decode(ex.student_prompt) == chat(student_messages(row["problem"]))
    for alpha in (0.0, 0.5, 1.0):
        k = ex.cut(alpha, "lines")
        assert tok.decode(ex.teacher_prompt(k)) == chat(teacher_messages(row["problem"],
                                                                          expose_reference(row["solution"], alpha)))
    assert chat(teacher_messages("P?", "\\boxed{1}")) == (
        f"<|im_start|>user\nP?\n\nReference solution:\n\\boxed{{1}}\n\n{DEFAULT_INSTRUCTION}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
