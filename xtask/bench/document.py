"""sentence-transformers side of `cargo xtask bench document`.

Reads the sentences from --sentences (a JSON list), encodes them with the model in
--model on CPU with --threads torch threads (batch 32, as sentence-transformers
defaults), best of --repeat after a warm-up, and prints one JSON line.
"""
import argparse
import json
import time

t0 = time.perf_counter()
import torch
from sentence_transformers import SentenceTransformer
import_s = time.perf_counter() - t0

parser = argparse.ArgumentParser()
parser.add_argument("--model", required=True)
parser.add_argument("--sentences", required=True)
parser.add_argument("--threads", type=int, required=True)
parser.add_argument("--repeat", type=int, default=3)
args = parser.parse_args()

torch.set_num_threads(args.threads)
sentences = json.load(open(args.sentences))
start = time.perf_counter()
model = SentenceTransformer(args.model, device="cpu")
load_s = time.perf_counter() - start
model.encode(sentences[:64], batch_size=32)
best = float("inf")
for _ in range(args.repeat):
    start = time.perf_counter()
    model.encode(sentences, batch_size=32)
    best = min(best, time.perf_counter() - start)
print(json.dumps({
    "impl": "sentence-transformers",
    "threads": torch.get_num_threads(),
    "sentences": len(sentences),
    "seconds": best,
    "sentences_per_s": len(sentences) / best,
    "load_s": load_s,
    "import_s": import_s,
}))
