"""Reference side of `cargo xtask bench audio`: WhisperFeatureExtractor log-mel of N x 30 s
clips, librosa.load(sr=16000) of a 60 s 44.1 kHz stereo wav, and transformers' Whisper
encoder forward in float32. Prints one JSON line of best-of-repeat seconds."""

import argparse
import json
import time

import numpy as np

p = argparse.ArgumentParser()
p.add_argument("--wav", required=True)
p.add_argument("--model", required=True)
p.add_argument("--clips", type=int, default=32)
p.add_argument("--threads", type=int, default=1)
p.add_argument("--repeat", type=int, default=3)
a = p.parse_args()

import torch  # noqa: E402

torch.set_num_threads(a.threads)
import librosa  # noqa: E402
from transformers import WhisperFeatureExtractor, WhisperModel  # noqa: E402


def best(fn):
    fn()
    times = []
    for _ in range(a.repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


n = 30 * 16000
t = np.arange(n, dtype=np.float64) / 16000.0
clips = [(0.3 * np.sin(2 * np.pi * (200 + 25 * k) * t) * np.sin(2 * np.pi * 0.5 * t)).astype(np.float32)
         for k in range(a.clips)]
fe = WhisperFeatureExtractor(feature_size=80)
mel_s = best(lambda: fe(clips, sampling_rate=16000, return_tensors="np"))
decode_s = best(lambda: librosa.load(a.wav, sr=16000, mono=True))
model = WhisperModel.from_pretrained(a.model, torch_dtype=torch.float32).eval()
features = fe(clips[:1], sampling_rate=16000, return_tensors="pt").input_features
with torch.inference_mode():
    encoder_s = best(lambda: model.encoder(features))
print(json.dumps({"mel_s": mel_s, "decode_s": decode_s, "encoder_s": encoder_s,
                  "torch": torch.__version__, "librosa": librosa.__version__}))
