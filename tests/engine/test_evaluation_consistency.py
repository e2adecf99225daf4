"""Evaluation agrees with training (issue 27): one chat template for both, decided before the weights load (a
tokenizer without one gets the engine's plain template, logged; ``--chat-template FILE`` in both commands); a
run's checkpoint is evaluated with the run's settings, to the figure training reported; a generation cap beyond the
model's context is capped (logged once); a failed evaluation leaves no directory; progress bars with an estimate;
``engine.evaluate --help`` explains every flag."""

import json
import logging
import os
import shutil

import pytest
from engine_tiny import build_model, build_tokenizer, write_dataset

import atesd.engine.evaluate as evaluate_mod
import atesd.engine.evaluation as evaluation_mod
from atesd.engine import checkpoint, models
from atesd.engine.exposure import PLAIN_CHAT_TEMPLATE, chat_template_problem, make_example, render, use_chat_template
from atesd.engine.invocation import parse
from atesd.engine.task import OPSD_TEMPLATES
from atesd.engine.train import train

TEMPLATE = "{% for m in messages %}<<{{ m['role'] }}>>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}" \
           "<<assistant>>{% endif %}"


def _cli(main, argv, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code, capsys.readouterr().err


@pytest.fixture(scope="module")
def bare_model_dir(tmp_path_factory):
    """A tiny Qwen3 whose tokenizer has no chat template (a base model's)."""
    path = tmp_path_factory.mktemp("bare-model")
    tok = build_tokenizer()
    tok.chat_template = None
    build_model(len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture
def files(tmp_path):
    train_rows = write_dataset(tmp_path / "train.jsonl", n=8, extra_bad=False)
    bench = tmp_path / "bench.jsonl"
    bench.write_text("".join(json.dumps({"problem": f"({i}+1)*2?", "answer": str(2 * i + 2)}) + "\n" for i in range(3)))
    template = tmp_path / "chat.jinja"
    template.write_text(TEMPLATE)
    return {"train": train_rows, "bench": str(bench), "template": str(template)}


def _spy_prompts(monkeypatch):
    """Every prompt the evaluation generates from, in call order."""
    seen, real = [], evaluation_mod.generate_completions

    def spy(model, tokenizer, prompts, **kw):
        seen.append(list(prompts))
        return real(model, tokenizer, prompts, **kw)

    monkeypatch.setattr(evaluation_mod, "generate_completions", spy)
    return seen


def _train_args(model_dir, files, out, *extra):
    return ["--model", model_dir, "--data", files["train"], "--steps", "1", "--batch-size", "2", "--micro-batch", "2",
            "--max-new-tokens", "4", "--probe-every", "0", "--lora-r", "4", "--lora-alpha", "8", "--no-progress",
            "--eval-benchmarks", files["bench"], "--eval-samples", "1", "--eval-max-new-tokens", "4",
            "--output-dir", str(out), *extra]  # fmt: skip


# ---------------------------------------------------------------------------------------- the chat template
def test_one_render_for_every_prompt_and_the_plain_template(caplog):
    tok = build_tokenizer()
    tok.chat_template = None
    msgs = [{"role": "system", "content": "be {{ brief }}"}, {"role": "user", "content": "a\nb "}]
    with caplog.at_level(logging.INFO, logger="engine"):
        text = render(tok, msgs, thinking=True)
        render(tok, msgs, thinking=False)
    # the plain template writes what the engine wrote before templates were chosen up front
    assert text == "system: be {{ brief }}\nuser: a\nb \nassistant: " and tok.chat_template == PLAIN_CHAT_TEMPLATE
    assert caplog.text.count("has no chat template") == 1 and "--chat-template FILE" in caplog.text
    # training's prompts (exposure.make_example) and evaluation's (evaluate_problems) are the same render
    ex = make_example(tok, "2+2?", "so \\boxed{4}", templates=OPSD_TEMPLATES)
    assert ex.student_text == render(tok, OPSD_TEMPLATES.student_messages("2+2?"), thinking=False)
    assert "apply_chat_template" not in open(evaluation_mod.__file__).read()  # no second path in evaluation


def test_chat_template_file_is_checked_and_used(tmp_path, files):
    assert chat_template_problem(files["template"]) is None
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}")
    assert "not a usable Jinja chat template (line 1): TemplateSyntaxError" in chat_template_problem(str(bad))
    (tmp_path / "empty.jinja").write_text("\n")
    assert chat_template_problem(str(tmp_path / "empty.jinja")) == "is empty"
    (tmp_path / "static.jinja").write_text("hello")
    assert "never writes the messages' content" in chat_template_problem(str(tmp_path / "static.jinja"))
    assert chat_template_problem(str(tmp_path / "none.jinja")).startswith("no such file")
    tok = build_tokenizer()  # it has a template of its own: the file replaces it
    assert "replacing" in use_chat_template(tok, files["template"])
    assert render(tok, [{"role": "user", "content": "x"}]) == "<<user>>x\n<<assistant>>"


def test_bad_chat_template_flags_are_one_line(tmp_path, files, capsys, tiny_model_dir):
    from atesd.engine.train import main as train_main

    bad = tmp_path / "bad.jinja"
    bad.write_text("{{ 1 + }}")
    code, err = _cli(train_main, ["--model", tiny_model_dir, "--chat-template", str(bad), "--output-dir",
                                  str(tmp_path / "r")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("error: --chat-template: is not a usable Jinja chat template")
    assert not (tmp_path / "r").exists()
    code, err = _cli(evaluate_mod.main, ["--model", tiny_model_dir, "--data", files["bench"], "--chat-template",
                                         str(tmp_path / "missing.jinja")], capsys)
    missing = tmp_path / "missing.jinja"
    assert code == 2 and err.strip() == f"error: --chat-template '{missing}': no such file (a Jinja chat template)"


def test_a_model_without_a_chat_template_trains_and_evaluates_alike(bare_model_dir, files, tmp_path, monkeypatch,
                                                                    capsys):
    """The issue's path: training with a template-less tokenizer, then evaluating its checkpoint, renders the same
    prompts (the plain template, said once in run.log), and the checkpoint carries the template."""
    seen = _spy_prompts(monkeypatch)
    run = train(*parse(_train_args(bare_model_dir, files, tmp_path / "run")))
    log_text = open(os.path.join(run, "run.log")).read()
    assert log_text.count("has no chat template: training and evaluation prompts use the engine's plain one") == 1
    ckpt = os.path.join(run, "checkpoints", "step-000001")
    with open(os.path.join(ckpt, "chat_template.jinja")) as fh:
        assert fh.read() == PLAIN_CHAT_TEMPLATE
    trained = seen[-1]
    assert trained[0].startswith("user: (0+1)*2?") and trained[0].endswith("assistant: ")
    seen.clear()
    summary = evaluate_mod.main(["--adapter", ckpt, "--data", files["bench"], "--n", "1", "--max-new-tokens", "4",
                                 "--workers", "1", "--no-progress"])
    assert seen[0] == trained and summary["benchmarks"]["data"]["n"] == 3
    assert "the engine's plain one ('role: text' lines), which the tokenizer of checkpoint" in capsys.readouterr().err

    # a checkpoint written before templates were chosen up front holds a tokenizer without one
    old = tmp_path / "old" / "step-000001"
    shutil.copytree(ckpt, old)
    os.remove(old / "chat_template.jinja")
    checkpoint.write_manifest(str(old), 1, bare_model_dir)
    common = ["--adapter", str(old), "--data", files["bench"], "--n", "1", "--max-new-tokens", "2", "--workers", "1",
              "--no-progress", "--out", str(tmp_path / "e")]
    seen.clear()
    evaluate_mod.main(common)  # the same plain template, logged as the fallback
    assert seen[0] == trained and "has no chat template" in capsys.readouterr().err
    # --model with a template supplies the tokenizer (logged); --tokenizer adapter keeps the checkpoint's
    with_template = tmp_path / "with-template"
    shutil.copytree(bare_model_dir, with_template)
    (with_template / "chat_template.jinja").write_text(TEMPLATE)
    seen.clear()
    evaluate_mod.main(common + ["--model", str(with_template)])
    assert seen[0][0].startswith("<<user>>(0+1)*2?")
    err = capsys.readouterr().err
    assert "the checkpoint's tokenizer has no chat template of its own: using that of --model" in err
    seen.clear()
    evaluate_mod.main(common + ["--model", str(with_template), "--tokenizer", "adapter"])
    assert seen[0] == trained
    seen.clear()
    evaluate_mod.main(common + ["--chat-template", files["template"]])  # the file, whatever the tokenizer has
    assert seen[0][0].startswith("<<user>>(0+1)*2?")


def test_chat_template_flag_in_training_and_its_checkpoint(bare_model_dir, files, tmp_path, monkeypatch):
    seen = _spy_prompts(monkeypatch)
    cfg, resume = parse(_train_args(bare_model_dir, files, tmp_path / "run", "--chat-template", files["template"]))
    assert cfg.chat_template == files["template"]
    run = train(cfg, resume)
    assert "--chat-template), replacing that of the tokenizer of model" in open(os.path.join(run, "run.log")).read()
    assert all(p.startswith("<<user>>") for p in seen[0])  # the evaluation prompts too
    ckpt = os.path.join(run, "checkpoints", "step-000001")
    assert open(os.path.join(ckpt, "chat_template.jinja")).read() == TEMPLATE
    seen.clear()
    evaluate_mod.main(["--adapter", ckpt, "--n", "1", "--max-new-tokens", "2", "--workers", "1", "--no-progress"])
    assert seen[0][0].startswith("<<user>>")  # the run's benchmarks, with the template training used


def test_a_failed_evaluation_leaves_no_directory(bare_model_dir, files, tmp_path, monkeypatch, capsys):
    run = train(*parse(_train_args(bare_model_dir, files, tmp_path / "run", "--eval-benchmarks", "")))
    ckpt = os.path.join(run, "checkpoints", "step-000001")

    def broken(*a, **kw):
        raise RuntimeError("generation failed")

    monkeypatch.setattr(evaluate_mod, "evaluate_task", broken)
    code, err = _cli(evaluate_mod.main, ["--adapter", ckpt, "--data", files["bench"]], capsys)
    assert code == 1 and "generation failed" in err.strip().splitlines()[-1]
    assert not os.path.exists(os.path.join(run, "eval"))


# ---------------------------------------------------------------------------- the run's settings, its figure
def test_evaluate_reproduces_the_figure_training_reported(tmp_path, capsys):
    """A lab run on levels 1 and 3, 12 held-out problems, seed 3: engine.evaluate on its checkpoint gives the
    accuracy, n and per-level figures of eval_summary.json for that step, from the run's settings alone."""
    run = train(*parse(["--model", "tiny", "--data", "lab", "--task-option", "size=32", "--task-option", "levels=1,3",
                        "--steps", "2", "--batch-size", "4", "--eval-problems", "12", "--max-new-tokens", "16",
                        "--probe-every", "0", "--seed", "3", "--no-progress", "--output-dir", str(tmp_path / "run")]))
    with open(os.path.join(run, "eval_summary.json")) as fh:
        reported = {e["step"]: e for e in json.load(fh)["benchmarks"]["lab"]["history"]}[2]
    capsys.readouterr()
    ckpt = os.path.join(run, "checkpoints", "step-000002")
    res = evaluate_mod.main(["--adapter", ckpt, "--benchmarks", "lab", "--workers", "1"])["benchmarks"]["lab"]
    assert (res["accuracy"], res["n"], res["n_samples"]) == (reported["accuracy"], 12, 1)
    assert {str(k): v for k, v in res["per_level"].items()} == reported["per_level"] and set(res["per_level"]) == {1, 3}
    out, err = capsys.readouterr()
    assert f"Average@1 {reported['accuracy']:.4f}" in out
    assert "settings of run" in err and "--task-option levels=1,3" in err and "--lab-n 12 (the run's --eval-problems)" \
        in err and "--seed 3" in err
    assert os.path.exists(os.path.join(run, "eval", "step-000002", "lab.jsonl"))
    # flags override the run's settings
    res = evaluate_mod.main(["--adapter", ckpt, "--workers", "1", "--task-option", "levels=1", "--lab-n", "4", "--out",
                             str(tmp_path / "o")])["benchmarks"]["lab"]
    assert res["n"] == 4 and set(res["per_level"]) == {1}
    # the run directory itself: one line pointing at its checkpoints
    code, err = _cli(evaluate_mod.main, ["--adapter", run, "--benchmarks", "lab"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"--adapter '{run}' is a run directory, not a checkpoint" in err
    assert "it has step-000002; the newest: --adapter " + ckpt in err


# ----------------------------------------------------------------------------------------- context length
def test_context_length_and_the_generation_cap(tiny_tokenizer, caplog):
    model = build_model(len(tiny_tokenizer))  # max_position_embeddings 1024
    assert models.context_length(model, tiny_tokenizer) == 1024  # the tokenizer's 1e30 is no limit
    tiny_tokenizer.model_max_length, saved = 300, tiny_tokenizer.model_max_length
    try:
        assert models.context_length(model, tiny_tokenizer) == 300
    finally:
        tiny_tokenizer.model_max_length = saved
    prompts = ["x" * 20, "y" * 100]  # one token per character
    with caplog.at_level(logging.WARNING, logger="engine"):
        assert evaluation_mod.fit_generation(model, tiny_tokenizer, prompts, 38912, 512) == 412
        assert evaluation_mod.fit_generation(model, tiny_tokenizer, prompts, 38912, 512) == 412
        assert evaluation_mod.fit_generation(model, tiny_tokenizer, prompts, 64, 512) == 64
    assert caplog.text.count("the generation cap of 38912 new tokens does not fit the model's context of 512 "
                             "positions after the longest prompt (100 tokens): capped to 412 new tokens") == 1
    with pytest.raises(ValueError, match="has 100 tokens, which fills the model's context of 100 positions"):
        evaluation_mod.fit_generation(model, tiny_tokenizer, prompts, 8, 100)


def test_the_math_protocol_on_the_tiny_model_is_capped_not_silent(tmp_path, capsys, monkeypatch):
    """A local file with the default math protocol (38912 new tokens) on the 512-position tiny model."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    data = tmp_path / "local.jsonl"
    data.write_text("".join(json.dumps({"problem": f"Ann has {i} pens.", "answer": str(i)}) + "\n" for i in (2, 3)))
    summary = evaluate_mod.main(["--model", "tiny", "--data", str(data), "--n", "2", "--workers", "1",
                                 "--out", str(tmp_path / "o")])
    p = summary["benchmarks"]["data"]["protocol"]
    assert p["max_new_tokens_asked"] == 38912 and 400 < p["max_new_tokens"] < 512
    out, err = capsys.readouterr()
    assert f"capped to {p['max_new_tokens']} new tokens" in err and "context of 512 positions" in err
    assert "CPU threads: 1 (OMP_NUM_THREADS); OpenMP wait policy" in err  # the command line's thread choice
    assert f"{p['max_new_tokens']} tokens (capped from 38912)" in out


# ---------------------------------------------------------------------------------------- progress, --help
def test_progress_bars_in_evaluate_and_in_training(tmp_path, files, tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setattr(evaluation_mod, "PROGRESS_DELAY_S", 0.0)  # shown at once (else after a few seconds)
    args = ["--model", tiny_model_dir, "--data", files["bench"], "--n", "2", "--max-new-tokens", "3", "--workers", "1",
            "--batch-size", "2", "--out", str(tmp_path / "o")]
    evaluate_mod.main(args)
    err = capsys.readouterr().err
    assert "data:   0%|" in err and "0/6 [00:00<?, ?completion/s]" in err  # done/total [elapsed<remaining, rate]
    evaluate_mod.main(args + ["--no-progress"])
    assert "completion/s" not in capsys.readouterr().err
    # training's periodic evaluation: a bar per set, on stderr, only with --progress
    from atesd.engine.evaluator import Evaluator

    model, tok = models.load_model(tiny_model_dir)
    for flag, shown in (("--progress", True), ("--no-progress", False)):
        cfg, _ = parse(["--model", tiny_model_dir, "--eval-benchmarks", files["bench"], "--eval-samples", "1",
                        "--eval-max-new-tokens", "2", flag])
        Evaluator(cfg, str(tmp_path)).run(model, tok, 0)
        assert ("eval bench: " in capsys.readouterr().err) == shown


def test_every_evaluate_flag_has_help(capsys):
    parser = evaluate_mod.build_parser()
    missing = [a.option_strings[0] for a in parser._actions if a.option_strings and not (a.help or "").strip()]
    assert not missing
    with pytest.raises(SystemExit):
        evaluate_mod.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--batch-size", "--seed", "--device", "--dtype", "--workers", "--threads", "--progress", "--tokenizer",
                 "--chat-template", "--task-option", "--lab-n"):
        assert flag in text
    assert "completions generated together" in text and "seed of a task's held-out problems and of sampling" in text


def test_engine_prompts_shows_the_chosen_chat_template(bare_model_dir, files, capsys):
    from atesd.engine import prompts

    assert prompts.main(["--model", bare_model_dir, "--data", files["train"], "--limit", "1", "--chat-template",
                         files["template"]]) == 1
    assert json.loads(capsys.readouterr().out)["student_text"].startswith("<<user>>Problem: ")
    prompts.main(["--model", bare_model_dir, "--data", files["train"], "--limit", "1"])  # the plain template
    assert json.loads(capsys.readouterr().out)["student_text"].startswith("user: Problem: ")


@pytest.mark.parametrize("flags,message", [
    (["--task-option", "levels=9"], "--task-option levels: must name levels among 1,2,3,4, got '9'"),
    (["--task-option", "lvls=1"], "--task-option lvls: no evaluated task (math, lab) declares it"),
    (["--task-option", "levels"], "--task-option 'levels': expected KEY=VALUE"),
    (["--tokenizer", "adapter"], "--tokenizer adapter needs --adapter"),
    (["--threads", "0"], "--threads: must be >= 1, got 0"),
    (["--prompts", "{prompts}"], "--prompts applies to the sets of --task math"),
])
def test_bad_evaluate_flags_are_one_line_before_any_load(tmp_path, capsys, flags, message):
    prompts = tmp_path / "p.yaml"
    prompts.write_text("evaluation: '{problem} ?'\n")
    argv = ["--model", "tiny", "--benchmarks", "lab", *[f.replace("{prompts}", str(prompts)) for f in flags]]
    code, err = _cli(evaluate_mod.main, argv, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: " + message), err


def test_a_task_module_named_by_the_runs_config_is_not_imported(bare_model_dir, files, tmp_path, monkeypatch, capsys):
    run = train(*parse(_train_args(bare_model_dir, files, tmp_path / "run", "--eval-benchmarks", "")))
    name = f"atesd_hostile_eval_task_{os.getpid()}"
    imported = tmp_path / "module-imported"
    (tmp_path / f"{name}.py").write_text(f"open({str(imported)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = os.path.join(run, "config.yaml")
    text = open(config).read()
    assert "task: math\n" in text
    open(config, "w").write(text.replace("task: math\n", f"task: {name}:TASK\n"))
    ckpt = os.path.join(run, "checkpoints", "step-000001")
    code, err = _cli(evaluate_mod.main, ["--adapter", ckpt, "--data", files["bench"]], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and f"if you trust it, give --task {name}:TASK" in err
    assert not imported.exists() and not os.path.exists(os.path.join(run, "eval"))


def test_periodic_evaluation_is_capped_to_the_context_and_says_so_once(bare_model_dir, files, tmp_path):
    run = train(*parse(_train_args(bare_model_dir, files, tmp_path / "run", "--eval-max-new-tokens", "5000")))
    log_text = open(os.path.join(run, "run.log")).read()  # evaluated twice (steps 0 and 1), said once
    said = "the generation cap of 5000 new tokens does not fit the model's context of 1024 positions"
    assert log_text.count(said) == 1


def test_an_offline_base_model_is_one_line_saying_what_to_do(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    code, err = _cli(evaluate_mod.main, ["--model", "qwen3-8b", "--benchmarks", "lab"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "model 'qwen3-8b' (hub id Qwen/Qwen3-8B) is not in the local Hugging Face cache" in err
    assert "give --model DIR" in err
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / checkpoint.ADAPTER_CONFIG).write_text(json.dumps({"base_model_name_or_path": "Qwen/Qwen3-8B"}))
    code, err = _cli(evaluate_mod.main, ["--adapter", str(adapter), "--benchmarks", "lab"], capsys)
    assert code == 2 and f"--adapter '{adapter}': its base model 'Qwen/Qwen3-8B' is not in the local" in err
