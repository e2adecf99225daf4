"""Data: bad rows are skipped and counted, answers come from the last boxed, the stream resumes exactly."""

import json

import pytest
from engine_tiny import write_dataset

from atesd.engine.data import DataStream, clean_rows, load_rows
from atesd.engine.errors import DataError


def test_bad_rows_skipped_and_counted(tmp_path):
    path = write_dataset(tmp_path / "d.jsonl", n=5)
    rows, skipped = clean_rows(load_rows(path))
    assert len(rows) == 5 and dict(skipped) == {"no_boxed_answer": 1, "missing_field": 1}
    assert all(r["answer"] == r["solution"].rsplit("{", 1)[1].rstrip("}") for r in rows)


def test_given_answer_kept_and_custom_columns(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"q": "p", "s": "x \\boxed{2}", "a": "two"}, {"q": "p2", "s": "\\boxed{3}"}]))
    rows, skipped = clean_rows(
        load_rows(str(path), problem_column="q", solution_column="s", answer_column="a")
    )
    assert [r["answer"] for r in rows] == ["two", "3"] and not skipped


def test_bad_source_named(tmp_path):
    bad = tmp_path / "d.csv"
    bad.write_text("a,b\n")
    with pytest.raises(ValueError, match="d.csv"):
        load_rows(str(bad))


def test_stream_resume_exact():
    a = DataStream(7, seed=3)
    seen = [a.next() for _ in range(10)]
    b = DataStream(7, seed=3)
    b.load_state_dict(DataStream(7, 3).state_dict())
    for _ in range(4):
        b.next()
    c = DataStream(7, seed=3)
    c.load_state_dict(b.state_dict())
    assert [c.next() for _ in range(6)] == seen[4:]
    assert sorted(seen[:7]) == list(range(7))  # one epoch is a permutation


def test_unreachable_hub_dataset_fails_fast_by_name(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="nobody/no-such-dataset"):
        load_rows("nobody/no-such-dataset")
