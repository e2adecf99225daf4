"""engine.reproduce end to end on the tiny model with small local benchmark files: both methods trained with the
same seed and budget, every saved checkpoint evaluated, a Table-1-shaped table and a plot; an interrupted
reproduction resumes the unfinished run and keeps the finished one."""

import json

import pytest
from engine_tiny import write_dataset

from atesd.engine import reproduce


def _bench(path, n, offset):
    path.write_text("".join(json.dumps({"problem": f"({a}+1)*2?", "answer": str((a + 1) * 2)}) + "\n"
                            for a in range(offset, offset + n)))
    return str(path)


def test_reproduce_table_plot_and_resume(tiny_model_dir, tmp_path, capsys):
    data = write_dataset(tmp_path / "train.jsonl", n=12)
    benches = f"{_bench(tmp_path / 'b1.jsonl', 3, 0)},{_bench(tmp_path / 'b2.jsonl', 3, 5)}"
    out = tmp_path / "repro"
    args = ["--model", tiny_model_dir, "--output-dir", str(out), "--data", data, "--steps", "2",
            "--save-every", "1", "--batch-size", "2", "--max-new-tokens", "6", "--eval-benchmarks", benches,
            "--eval-max-new-tokens", "6", "--probe-every", "0", "--no-progress", "--lora-r", "4",
            "--lora-alpha", "8"]  # fmt: skip
    partial = reproduce.main([*args, "--stop-after", "1"])  # interrupted: neither run finished
    assert partial["unfinished"] == ["opsd", "atesd"] and "**Partial**" in (out / "table.md").read_text()
    assert sorted(p.name for p in (out / "opsd" / "checkpoints").iterdir()) == ["step-000001"]
    capsys.readouterr()
    table = reproduce.main(args)
    said = capsys.readouterr().out
    assert "opsd: resuming" in said and "atesd: resuming" in said
    for method, exposure in (("opsd", "full"), ("atesd", "adaptive")):
        cfg = (out / method / "config.yaml").read_text()
        assert f"exposure: {exposure}" in cfg and "eval_every: 1" in cfg and "seed: 0" in cfg
        assert sorted(p.name for p in (out / method / "checkpoints").iterdir()) == ["step-000001", "step-000002"]
    for name in ("b1", "b2"):
        row = table["benchmarks"][name]
        assert row["base"] is not None
        for m in ("opsd", "atesd"):
            assert [s for s, _ in row["methods"][m]["history"]] == [0, 1, 2]  # every saved checkpoint evaluated
            assert row["methods"][m]["best"]["step"] in (1, 2)  # never the base model
    text = (out / "table.md").read_text()
    assert table["unfinished"] == [] and "Partial" not in text
    assert "| Base |" in text and "| OPSD (full exposure) |" in text and "| ATESD (adaptive exposure) |" in text
    assert text.count("\n|") >= 4 and "| b1 | b2 | Avg |" in text
    assert (out / "accuracy_vs_steps.png").stat().st_size > 1000
    assert json.loads((out / "reproduce.json").read_text())["benchmarks"].keys() == {"b1", "b2"}
    reproduce.main(args)  # both finished: kept, nothing retrained
    assert "opsd: finished before, kept" in capsys.readouterr().out


def test_reproduce_refuses_what_it_owns(capsys):
    for bad in (["--exposure", "full"], ["--methods", "grpo"]):
        with pytest.raises(SystemExit) as e:
            reproduce.main(bad)
        assert e.value.code == 2
    assert "--exposure" in capsys.readouterr().err
