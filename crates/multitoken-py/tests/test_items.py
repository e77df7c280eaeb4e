"""Items given as numpy arrays, PIL images and bytes reach the model as the same
pixels and samples as the file they came from, without temporary files."""

import wave

import numpy as np
import pytest
from PIL import Image

import multitoken
from conftest import SHAPES

PROMPT = "What colour is the shape?"


def ids(model, **items):
    return model.generate(PROMPT, max_new_tokens=12, **items).token_ids


def test_numpy_pil_and_bytes_images_equal_the_path(demo):
    path = SHAPES / "red-circle.png"
    want = ids(demo, images=[str(path)])
    image = Image.open(path)
    assert ids(demo, images=[path]) == want  # pathlib.Path
    assert ids(demo, images=[path.read_bytes()]) == want
    assert ids(demo, images=[image]) == want
    assert ids(demo, images=[np.asarray(image.convert("RGB"))]) == want
    # A view with other strides is read in row-major order.
    rgb = np.asarray(image.convert("RGB"))
    assert ids(demo, images=[np.asfortranarray(rgb)]) == want


def test_pil_modes_are_converted_as_a_file_would_be(demo):
    path = SHAPES / "blue-triangle.png"
    rgb = Image.open(path).convert("RGB")
    want = ids(demo, images=[rgb])
    # Palette and CMYK hold the same colours; their conversion gives the same pixels.
    for mode in ["P", "CMYK"]:
        converted = rgb.convert(mode, palette=Image.Palette.ADAPTIVE) if mode == "P" else rgb.convert(mode)
        back = np.asarray(converted.convert("RGB"))
        assert ids(demo, images=[converted]) == ids(demo, images=[back])
    assert ids(demo, images=[rgb.convert("RGBA")]) == ids(demo, images=[np.asarray(rgb.convert("RGBA"))])
    gray = rgb.convert("L")
    assert ids(demo, images=[gray]) == ids(demo, images=[np.asarray(gray)])
    assert ids(demo, images=[gray.convert("LA")]) == ids(demo, images=[np.asarray(gray.convert("LA").convert("RGBA"))])
    assert want == ids(demo, images=[str(path)])


def test_odd_images_are_refused_clearly(demo):
    with pytest.raises(multitoken.InputError, match=r"I;16"):
        demo.generate(PROMPT, images=[Image.new("I;16", (8, 8))])
    with pytest.raises(ValueError, match=r"shape \[8, 8, 2\]"):
        demo.generate(PROMPT, images=[np.zeros((8, 8, 2), dtype=np.uint8)])
    with pytest.raises(ValueError, match="uint8"):
        demo.generate(PROMPT, images=[np.zeros((8, 8, 3), dtype=np.float32)])
    with pytest.raises(ValueError, match=r"images\[0\]"):
        demo.generate(PROMPT, images=[np.zeros((0, 8, 3), dtype=np.uint8)])


def read_wav(path):
    with wave.open(str(path)) as w:
        assert w.getsampwidth() == 2 and w.getnchannels() == 1
        frames = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
        return frames.astype(np.float32) / 32768.0, w.getframerate()


def test_numpy_audio_equals_the_path(demo):
    path = SHAPES / "three-high-beeps.wav"
    question = "How many beeps are there?"
    want = demo.generate(question, audios=[str(path)], max_new_tokens=12).token_ids
    samples, rate = read_wav(path)
    assert demo.generate(question, audios=[(samples, rate)], max_new_tokens=12).token_ids == want
    assert demo.generate(question, audios=[(samples.astype(np.float64), rate)], max_new_tokens=12).token_ids == want
    mel_path = multitoken.log_mel(str(path))
    mel_array = multitoken.log_mel(samples, rate)
    assert mel_path.shape == (1, 80, 3000) and mel_path.dtype == np.float32
    np.testing.assert_array_equal(mel_path, mel_array)


def test_odd_audio_is_refused_clearly(demo):
    stereo = np.zeros((16000, 2), dtype=np.float32)
    with pytest.raises(ValueError, match="mono"):
        demo.generate("Listen", audios=[(stereo, 16000)])
    with pytest.raises(ValueError, match="sample rate"):
        demo.generate("Listen", audios=[np.zeros(16000, dtype=np.float32)])
    with pytest.raises(ValueError, match="NaN"):
        demo.generate("Listen", audios=[(np.full(100, np.nan, dtype=np.float32), 16000)])
