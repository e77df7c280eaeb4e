"""Generation from Python equals the CLI's and transformers' (greedy ids), streams
to the same text, keeps a chat's history, and releases the GIL."""

import json
import subprocess
import sys
import threading
import time

import multitoken
from conftest import DEMO, FIXTURES, SHAPES

PROMPT = "What colour is the shape?"


def test_raw_greedy_ids_equal_transformers():
    expected = json.loads((FIXTURES / "lm" / "llama" / "parity" / "expected.json").read_text())
    model = multitoken.Model.load(FIXTURES / "lm" / "llama")
    want = expected["greedy_ids"]
    out = model.generate(expected["prompt"], raw=True, max_new_tokens=len(want))
    assert out.token_ids == want
    assert out.prompt_tokens == len(expected["prompt_ids"])


def test_greedy_ids_equal_the_cli(cli, demo):
    image = str(SHAPES / "red-circle.png")
    args = [cli, "generate", "--model", str(DEMO), "--image", image, "--prompt", PROMPT, "--max-new-tokens", "24", "--json"]
    done = subprocess.run(args, capture_output=True, text=True, check=True)
    want = json.loads(done.stdout.strip().splitlines()[-1])
    out = demo.generate(PROMPT, images=[image], max_new_tokens=24)
    assert out.token_ids == want["token_ids"]
    assert out.text == want["text"]
    assert out.prompt_tokens == want["prompt_tokens"]
    assert "red" in out.text.lower()


def test_chat_messages_with_system_equal_the_cli(cli, demo):
    doc = str(SHAPES / "space.txt")
    args = [cli, "generate", "--model", str(DEMO), "--document", doc, "--system", "Answer briefly.",
            "--prompt", "What is the document about?", "--max-new-tokens", "16", "--json"]
    done = subprocess.run(args, capture_output=True, text=True, check=True)
    want = json.loads(done.stdout.strip().splitlines()[-1])
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is the document about?"}]
    out = demo.generate(messages, documents=[doc], max_new_tokens=16)
    assert out.token_ids == want["token_ids"]


def test_stream_joins_to_the_same_text(demo):
    image = str(SHAPES / "blue-triangle.png")
    whole = demo.generate(PROMPT, images=[image], max_new_tokens=20)
    stream = demo.generate(PROMPT, images=[image], max_new_tokens=20, stream=True)
    assert stream.result is None
    pieces = list(stream)
    assert len(pieces) > 1
    assert "".join(pieces) == whole.text
    assert stream.result is not None and stream.result.token_ids == whole.token_ids


def test_chat_keeps_history_and_items():
    model = multitoken.Model.load(DEMO)
    first = model.chat(PROMPT, images=[str(SHAPES / "red-circle.png")], max_new_tokens=16)
    assert [m["role"] for m in model.history] == ["user", "assistant"]
    assert model.history[0]["content"].startswith("<image>")
    assert model.history[1]["content"] == first.text.strip()
    # The second turn still sees the first turn's image: its prompt is longer than
    # the first one by at least the first answer.
    second = model.chat("And what shape is it?", max_new_tokens=16)
    assert second.prompt_tokens > first.prompt_tokens + len(first.token_ids) - 1
    assert len(model.history) == 4
    streamed = "".join(model.chat("Thanks!", max_new_tokens=8, stream=True))
    assert model.history[-1]["content"] == streamed.strip()
    model.reset_chat()
    assert model.history == []


def test_a_second_thread_runs_while_generate_runs(demo):
    # With a switch interval this long the interpreter never takes the GIL from a
    # thread that holds it: the counter can only move during `generate` if the
    # call released the GIL (the worker yields it on every iteration by sleeping).
    # Without the release the count is exactly 0, so one step proves it; the call
    # runs 128 tokens (EOS ignored) so that a released GIL leaves the worker ample
    # time even on a loaded machine (the demo answers in ~3 tokens otherwise).
    counter = [0]
    stop = threading.Event()

    def count():
        while not stop.is_set():
            counter[0] += 1
            time.sleep(0.0005)

    old = sys.getswitchinterval()
    worker = threading.Thread(target=count)
    worker.start()
    try:
        sys.setswitchinterval(1000.0)
        before = counter[0]
        out = demo.generate(PROMPT, images=[str(SHAPES / "red-circle.png")], max_new_tokens=128, ignore_eos=True)
        during = counter[0] - before
    finally:
        sys.setswitchinterval(old)
        stop.set()
        worker.join()
    assert len(out.token_ids) == 128
    assert during >= 1, f"the other thread advanced {during} times during generate"


def test_quantized_towers_answer_as_the_cli_does(cli):
    """`quantize_towers` is the CLI's `--quantize-towers`: the same ids, and a
    format the towers can't take is an error naming the choices."""
    image = str(SHAPES / "blue-triangle.png")
    args = [cli, "generate", "--model", str(DEMO), "--image", image, "--prompt", PROMPT,
            "--quantize-towers", "q4_1", "--max-new-tokens", "8", "--json"]
    done = subprocess.run(args, capture_output=True, text=True, check=True)
    want = json.loads(done.stdout.strip().splitlines()[-1])
    model = multitoken.Model.load(DEMO, quantize_towers="q4_1")
    out = model.generate(PROMPT, images=[image], max_new_tokens=8)
    assert out.token_ids == want["token_ids"]
    assert "blue" in out.text.lower()
    try:
        multitoken.Model.load(DEMO, quantize_towers="q4_k")
    except multitoken.Error as e:
        assert "q8_0 or q4_1" in str(e)
    else:
        raise AssertionError("quantize_towers='q4_k' was accepted")
