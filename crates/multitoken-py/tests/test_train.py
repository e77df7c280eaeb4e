"""`multitoken.train` runs `multitoken train` from a dict and reports each logged step."""

import json

import pytest

import multitoken
from conftest import DEMO, SHAPES


def test_train_two_steps_reports_each_row(tmp_path):
    rows = [
        {"images": [str(SHAPES / name)], "messages": [
            {"role": "user", "content": "<image>\nWhat colour is the shape?"},
            {"role": "assistant", "content": answer}]}
        for name, answer in [("red-circle.png", "Red."), ("blue-triangle.png", "Blue.")]
    ]
    dataset = tmp_path / "train.jsonl"
    dataset.write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen = []
    out = tmp_path / "run"
    summary = multitoken.train(
        {"model": DEMO, "dataset": dataset, "output_dir": out, "max_steps": 2, "per_device_train_batch_size": 1},
        progress=seen.append,
    )
    assert summary["steps"] == 2
    assert [row["step"] for row in seen] == [1, 2]
    assert summary["final_loss"] == pytest.approx(seen[-1]["loss"])
    assert (out / "multitoken.json").is_file()


def test_train_refuses_unknown_options():
    with pytest.raises(ValueError, match="unknown field"):
        multitoken.train({"model": DEMO, "epochs_please": 3})
