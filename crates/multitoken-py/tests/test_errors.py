"""Errors are Python exceptions with the CLI's messages."""

import os

import pytest

import multitoken
from conftest import DEMO, FIXTURES, SHAPES


def test_missing_files_are_file_not_found(demo):
    with pytest.raises(FileNotFoundError, match="no-such.png"):
        demo.generate("Hi", images=["no-such.png"])
    with pytest.raises(multitoken.NotFoundError):
        multitoken.Model.load("no/such/dir/at/all")


def test_item_count_mismatch_names_both_counts(demo):
    image = str(SHAPES / "red-circle.png")
    with pytest.raises(ValueError, match=r"2.*1|1.*2") as caught:
        demo.generate("Compare <image> and <image>", images=[image])
    assert isinstance(caught.value, multitoken.Error)


def test_bad_options_are_value_errors(demo):
    with pytest.raises(ValueError, match="temperature"):
        demo.generate("Hi", temperature=-1.0)
    with pytest.raises(ValueError, match="device"):
        multitoken.Model.load(DEMO, device="cuda")
    with pytest.raises(multitoken.Error, match="dtype"):
        multitoken.Model.load(DEMO, dtype="f64")
    with pytest.raises(ValueError, match="last message"):
        demo.generate([{"role": "system", "content": "x"}])
    with pytest.raises(ValueError, match="list"):
        demo.generate("Hi", images=str(SHAPES / "red-circle.png"))


def test_unknown_hub_id_offline_is_not_found(monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(FIXTURES / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache") as caught:
        multitoken.Model.load("nobody/nothing")
    assert "hf download nobody/nothing" in str(caught.value)


def test_hub_id_from_the_cache_huggingface_hub_wrote(monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(FIXTURES / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import json

    expected = json.loads((FIXTURES / "lm" / "llama" / "parity" / "expected.json").read_text())
    model = multitoken.Model.load("multitoken-fixtures/tiny-llama@v1")
    out = model.generate(expected["prompt"], raw=True, max_new_tokens=len(expected["greedy_ids"]))
    assert out.token_ids == expected["greedy_ids"]
    assert os.environ["HF_HUB_OFFLINE"] == "1"
