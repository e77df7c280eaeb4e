"""The module-level functions: embed and log_mel (transcribe needs real Whisper
weights and is checked where `cargo xtask weights` has run)."""

import json
import pathlib
import subprocess

import numpy as np
import pytest

import multitoken
from conftest import DEMO, SHAPES

# The demo model's own sentence encoder (a sentence-transformers directory).
ENCODER = DEMO / "document"


def test_embed_equals_the_cli(cli):
    doc = SHAPES / "space.txt"
    got = multitoken.embed(["a red circle", doc], model=ENCODER)
    assert got.dtype == np.float32 and got.shape[0] == 2
    done = subprocess.run([cli, "embed", str(doc), "--text", "a red circle", "--model", str(ENCODER), "--json"],
                          capture_output=True, text=True, check=True)
    want = json.loads(done.stdout.strip().splitlines()[-1])
    by_input = {row["input"]: row["embedding"] for row in want["inputs"]}
    np.testing.assert_allclose(got[0], by_input["a red circle"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(got[1], by_input[str(doc)], rtol=0, atol=1e-6)
    assert got.shape[1] == want["dim"]


def test_embed_takes_bytes_and_refuses_nothing():
    doc = SHAPES / "cooking.txt"
    from_path = multitoken.embed([doc], model=ENCODER)
    from_bytes = multitoken.embed([doc.read_bytes()], model=ENCODER)
    np.testing.assert_array_equal(from_path, from_bytes)
    with pytest.raises(ValueError, match="nothing to embed"):
        multitoken.embed([], model=ENCODER)


def test_transcribe_needs_whisper_weights_or_says_where():
    import os

    cache = pathlib.Path(os.environ.get("MULTITOKEN_WEIGHTS") or pathlib.Path.home() / ".cache" / "multitoken")
    weights = cache / "whisper-base" / "hf" / "model.safetensors"
    path = SHAPES / "three-high-beeps.wav"
    if weights.is_file():
        assert isinstance(multitoken.transcribe(str(path)), str)
    else:
        with pytest.raises(multitoken.Error, match="cargo xtask weights"):
            multitoken.transcribe(str(path))
