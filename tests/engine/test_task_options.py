"""Tasks own their options (issue 29): the lab declares its size and levels (``Task.options``); a run sets them with
``--task-option KEY=VALUE`` or a ``task_options:`` YAML mapping, typed and checked by the declaration, one line per
bad one; the core Config names no task; a run written before (``lab_size`` / ``lab_levels`` in its config.yaml)
still resumes."""

import dataclasses
import json
import os

import pytest
import yaml

from atesd.engine.config import Config
from atesd.engine.data import load_rows
from atesd.engine.errors import UsageError
from atesd.engine.invocation import parse, read_run_config
from atesd.engine.lab import lab_dataset
from atesd.engine.task import PLUGINS
from atesd.engine.train import train
from atesd.engine.trainer import TIMING_METRICS

TIMING = TIMING_METRICS


RUN = {"--data": "lab", "--exposure": "fixed:0.5", "--steps": "2", "--batch-size": "2", "--max-new-tokens": "6",
       "--save-every": "1", "--probe-every": "0", "--eval-problems": "0"}


def _args(model_dir, out, *extra):
    return ["--model", model_dir, "--output-dir", str(out), *(x for kv in RUN.items() for x in kv), "--no-progress",
            *extra]


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in fh]


def test_flags_and_yaml_set_the_tasks_options(tmp_path):
    assert parse([])[0].task_options == {"size": 2000, "levels": "1,2"}  # the lab's declared defaults
    cfg, _ = parse(["--task-option", "size=40", "--task_option", "levels=1,3"])
    assert cfg.task_options == {"size": 40, "levels": "1,3"} and isinstance(cfg.task_options["size"], int)
    path = tmp_path / "run.yaml"
    path.write_text("task_options: {size: 1e2, levels: [2, 4]}\n")
    assert parse(["--config", str(path)])[0].task_options == {"size": 100, "levels": "2,4"}
    cfg, _ = parse(["--config", str(path), "--task-option", "levels=3"])  # flags override the file, key by key
    assert cfg.task_options == {"size": 100, "levels": "3"}
    # a run whose tasks declare no option carries none
    assert parse(["--model", "qwen3-1.7b", "--data", "org/rows"])[0].task_options == {}


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--task-option", "size=0"], "--task-option size: must be >= 1, got 0"),
        (["--task-option", "size=many"], "--task-option size: expected an integer, got 'many'"),
        (["--task-option", "levels=1,5"], "--task-option levels: must name levels among 1,2,3,4, got '1,5'"),
        (["--task-option", "bogus=1"], "--task-option bogus: no task of this run (lab) declares it (their options: "
                                       "lab: size, levels)"),
        (["--task-option", "size"], "--task-option 'size': expected KEY=VALUE"),
        (["--model", "qwen3-1.7b", "--data", "org/rows", "--task-option", "size=5"],
         "--task-option size: no task of this run (math) declares it (they declare no options)"),
        (["--lab-size", "20"], "--lab-size: now an option of the task that declares it: --task-option size=VALUE"),
    ],
)
def test_a_bad_task_option_is_one_line_naming_it(argv, message):
    with pytest.raises(UsageError) as err:
        parse(argv)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_yaml_task_option_errors_name_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("task_options: {levels: 9}\n")
    with pytest.raises(UsageError, match=r"run.yaml: task_options levels: must name levels among 1,2,3,4, got '9'"):
        parse(["--config", str(path)])
    path.write_text("task_options: [size]\n")
    with pytest.raises(UsageError, match="run.yaml: task_options: expected a mapping"):
        parse(["--config", str(path)])


def test_the_options_reach_the_tasks_problems():
    rows = load_rows("lab", task_options={"size": 7, "levels": "3"}, seed=2)
    assert [r["problem"] for r in rows] == [r["problem"] for r in lab_dataset("train", 7, 2, levels=(3,))]
    assert len(load_rows("lab", size=3, task_options={"size": 7})) == 3  # an explicit size wins (engine.prompts)


def test_the_core_config_names_no_task():
    """Help texts and field names of the core Config name no plug-in task; the tasks' own options and protocols
    are listed from the tasks themselves (engine.train --help's 'tasks' section)."""
    plugins = set(PLUGINS)
    for f in dataclasses.fields(Config):
        words = set(f.name.split("_")) | {w.strip("'(),.;:") for w in f.metadata["help"].split()}
        assert not words & plugins, (f.name, words & plugins)


def test_a_run_written_before_task_options_resumes(tiny_model_dir, tmp_path):
    """An old run's config.yaml holds lab_size / lab_levels: --resume reads them as the lab's options and the run
    continues exactly; a changed option on --resume is refused by name; an old run of a task without options
    drops them."""
    whole = train(*parse(_args(tiny_model_dir, tmp_path / "whole", "--task-option", "size=20")))
    run = train(*parse(_args(tiny_model_dir, tmp_path / "old", "--task-option", "size=20", "--stop-after", "1")))
    path = os.path.join(run, "config.yaml")
    with open(path) as fh:
        old = yaml.safe_load(fh)
    options = old.pop("task_options")
    old.update(lab_size=options["size"], lab_levels=options["levels"])  # as engine.train wrote it before
    with open(path, "w") as fh:
        yaml.safe_dump(old, fh, sort_keys=False)
    assert read_run_config(run).task_options == {"size": 20, "levels": "1,2"}
    with pytest.raises(UsageError, match=r"--task-option size=30 \(the run has 20\)"):
        parse(["--resume", run, "--task-option", "size=30"])
    train(*parse(["--resume", run, "--task-option", "size=20"]))
    assert _metrics(run) == _metrics(whole)

    math_run = tmp_path / "math"
    math_run.mkdir()
    cfg = dict(old, model="qwen3-1.7b", data="org/rows", task="math", eval_benchmarks="")
    (math_run / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert read_run_config(str(math_run)).task_options == {}
