"""`multitoken.train` runs `multitoken train` from a dict and reports each logged step."""

import json
import os
import signal

import pytest

import multitoken
from conftest import DEMO, SHAPES


def two_image_rows(tmp_path):
    """A two-row image dataset (the demo's colour question) written as JSONL."""
    rows = [
        {"images": [str(SHAPES / name)], "messages": [
            {"role": "user", "content": "<image>\nWhat colour is the shape?"},
            {"role": "assistant", "content": answer}]}
        for name, answer in [("red-circle.png", "Red."), ("blue-triangle.png", "Blue.")]
    ]
    dataset = tmp_path / "train.jsonl"
    dataset.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return dataset


def test_train_two_steps_reports_each_row(tmp_path):
    dataset = two_image_rows(tmp_path)
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


def test_ctrl_c_stops_training_at_a_checkpoint_that_resumes(tmp_path):
    dataset = two_image_rows(tmp_path)
    out = tmp_path / "run"
    options = {"model": DEMO, "dataset": dataset, "output_dir": out, "max_steps": 300,
               "per_device_train_batch_size": 1, "save_steps": 0}

    def press_ctrl_c(row):
        # As a user at the terminal: SIGINT while training runs.
        if row["step"] == 1:
            os.kill(os.getpid(), signal.SIGINT)

    # Python's own SIGINT handler, as at a terminal: a process started in the
    # background by a non-interactive shell (`.ci/run ... &`) inherits SIGINT
    # ignored, and Python then installs no handler, so the signal would vanish.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt) as caught:
            multitoken.train(options, progress=press_ctrl_c)
    finally:
        signal.signal(signal.SIGINT, previous)
    why = str(caught.value.__cause__)
    assert "training interrupted after step" in why and "resume" in why, why
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert len(checkpoints) == 1, checkpoints
    stopped_at = int(checkpoints[0].name.split("-")[1])
    # The trainer runs at most 8 logged rows ahead of the callback (plus the rows
    # read in the same batch and the step in flight), never to the end.
    assert 1 <= stopped_at <= 40, stopped_at
    assert f"checkpoint-{stopped_at}" in why
    # The same run continues from there to its end.
    seen = []
    summary = multitoken.train({**options, "resume": "latest"}, progress=seen.append)
    assert summary["steps"] == 300
    assert seen[0]["step"] == stopped_at + 1
