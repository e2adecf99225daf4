import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from atesd.engine.benchmarks import load_jsonl
from atesd.engine.evaluate import main
from atesd.engine.evaluation import evaluate_problems
from atesd.engine.lab import TINY_MODEL_DIR, lab_dataset
from atesd.engine.lab.prompts import student_messages, teacher_messages
from atesd.engine.lab.report import evaluate_lab


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR)
    tok = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    return model, tok


def test_shipped_model_and_tokenizer(tiny):
    model, tok = tiny
    assert model.config.model_type == "qwen3"
    assert not model.config.tie_word_embeddings
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    text = tok.apply_chat_template(
        student_messages("Ann has 3 pens."), tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nAnn has 3 pens.<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert len(tok) <= 512


def test_tiny_model_easy_better_than_hard(tiny):
    model, tok = tiny
    easy = lab_dataset("test", 24, levels=(1,))
    hard = lab_dataset("test", 24, levels=(4,))
    r = evaluate_lab(model, tok, easy + hard, temperature=0.0, batch_size=48)
    assert r["n"] == 48 and r["n_samples"] == 1
    # the shipped checkpoint: ~0.44 greedy on level 1, ~0 on level 4 (pretrain_info.json)
    assert r["per_level"][1] >= 0.3
    assert r["per_level"][1] > r["per_level"][4] + 0.2
    assert r["accuracy"] == pytest.approx((r["per_level"][1] + r["per_level"][4]) / 2)


def test_teacher_with_full_reference_beats_student(tiny):
    model, tok = tiny
    hard = lab_dataset("test", 16, levels=(1,))  # the tiny teacher copies well on levels 1-2 only
    r_t = evaluate_lab(model, tok, hard, messages_fn=lambda p: teacher_messages(p["problem"], p["solution"]))
    r_s = evaluate_lab(model, tok, hard)
    assert r_t["accuracy"] > r_s["accuracy"]


def test_sampling_is_seeded_and_keeps_global_rng(tiny):
    model, tok = tiny
    probs = lab_dataset("test", 8, levels=(2,))
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = evaluate_lab(model, tok, probs, temperature=1.0, n_samples=2, seed=5, keep_results=True)
    after = torch.rand(1)
    b = evaluate_lab(model, tok, probs, temperature=1.0, n_samples=2, seed=5, keep_results=True)
    assert torch.equal(before, after)
    assert [r["completions"] for r in a["results"]] == [r["completions"] for r in b["results"]]
    assert set(a["pass@k"]) == {1, 2}
    assert a["pass@k"][1] == pytest.approx(a["accuracy"])


def test_static_decoder_gives_the_same_greedy_completions(tiny, caplog):
    from atesd.engine.decode import StaticRollout
    from atesd.engine.evaluation import evaluate_task

    model, tok = tiny
    probs = lab_dataset("test", 24, levels=(1, 2))
    decoder = StaticRollout(model)
    hf = evaluate_task(model, tok, probs, "lab", keep_results=True, batch_size=16)
    static = evaluate_task(model, tok, probs, "lab", keep_results=True, batch_size=16, decoder=decoder)
    assert [r["completions"] for r in static["results"]] == [r["completions"] for r in hf["results"]]
    # sampled: each completion draws from its own stream, whatever the batch it lands in
    kw = dict(keep_results=True, decoder=decoder, temperature=1.0, n_samples=2, seed=3)
    a = evaluate_task(model, tok, probs[:8], "lab", batch_size=5, **kw)
    b = evaluate_task(model, tok, probs[:8], "lab", batch_size=16, **kw)
    assert [r["completions"] for r in a["results"]] == [r["completions"] for r in b["results"]]
    # a cache that would not fit: HF generate, said in the log
    decoder.fits = lambda rows, columns: False
    with caplog.at_level("INFO", logger="engine.evaluate"):
        again = evaluate_task(model, tok, probs, "lab", keep_results=True, batch_size=16, decoder=decoder)
    assert again["results"] == hf["results"] and "would not fit in memory" in caplog.text


def test_evaluate_problems_bookkeeping(tiny):
    model, tok = tiny
    probs = [{"problem": "Bob has 4 eggs. He gets 3. How many now?", "answer": "7"}] * 3
    calls = []

    def grader(completion, answer):
        calls.append(answer)
        return len(calls) % 2 == 1  # True, False, True, False, ...

    r = evaluate_problems(model, tok, probs, grader, n_samples=2, temperature=0.7, max_new_tokens=8)
    assert len(calls) == 6
    assert [x["correct"] for x in r["results"]] == [[True, False]] * 3
    assert r["accuracy"] == pytest.approx(0.5) and r["pass@k"][2] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="answer"):
        evaluate_problems(model, tok, [{"problem": "x"}], grader)


def test_cli_on_local_jsonl(tiny, tmp_path):
    rows = lab_dataset("test", 6, levels=(1,))
    data = tmp_path / "local.jsonl"
    data.write_text(
        "".join(json.dumps({"problem": r["problem"], "answer": r["answer"]}) + "\n" for r in rows)
    )
    out = tmp_path / "out"
    summary = main(
        [
            "--model",
            TINY_MODEL_DIR,
            "--data",
            str(data),
            "--n",
            "2",
            "--temperature",
            "0.6",
            "--max-new-tokens",
            "48",
            "--workers",
            "1",
            "--out",
            str(out),
        ]
    )
    res = summary["benchmarks"]["data"]
    lines = [json.loads(x) for x in (out / "data.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and all(len(x["completions"]) == 2 for x in lines)
    assert res["accuracy"] == pytest.approx(sum(x["frac_correct"] for x in lines) / 6)
    assert json.loads((out / "summary.json").read_text())["benchmarks"]["data"]["n"] == 6
    assert len(load_jsonl(str(data))) == 6
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "x"}\n')
    with pytest.raises(ValueError, match="problem"):
        load_jsonl(str(bad))


def test_missing_benchmark_fails_fast_naming_dataset(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "tiny", "--benchmarks", "aime24", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "HuggingFaceH4/aime_2024" in err and len(err.strip().splitlines()) == 1
