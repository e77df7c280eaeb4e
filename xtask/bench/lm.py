"""transformers' side of `cargo xtask bench lm`: SmolLM2-135M from the same GGUF, f32.

    python xtask/bench/lm.py --gguf PATH --prompt-ids FILE.json --decode 128 --threads N

transformers' GGUF loader dequantizes every tensor to f32 (this is its load time). The
prompt ids come from the bench so both sides run the same tokens. Prefill is one forward
over the prompt; decode is one forward per new token through the KV cache with greedy
argmax, EOS ignored. The best of `--repeat` runs is reported, after one warm-up. Prints
one JSON object on the last stdout line.
"""

import argparse
import json
import os
import pathlib
import time


def peak_rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--prompt-ids", required=True)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()

    t0 = time.perf_counter()
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    import_s = time.perf_counter() - t0

    path = pathlib.Path(args.gguf)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    model.eval()
    load_s = time.perf_counter() - t0

    ids = json.loads(pathlib.Path(args.prompt_ids).read_text())
    prompt = torch.tensor([ids])

    def run(prompt, decode):
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = model(prompt, use_cache=True)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            prefill_s = time.perf_counter() - t0
            past = out.past_key_values
            t0 = time.perf_counter()
            for _ in range(decode):
                out = model(nxt, past_key_values=past, use_cache=True)
                past = out.past_key_values
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            decode_s = time.perf_counter() - t0
        return prefill_s, decode_s

    run(prompt[:, :16], 4)  # warm-up
    best_prefill, best_decode = float("inf"), float("inf")
    for _ in range(args.repeat):
        p, d = run(prompt, args.decode)
        best_prefill, best_decode = min(best_prefill, p), min(best_decode, d)
    print(
        json.dumps(
            {
                "impl": "transformers",
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "import_s": import_s,
                "load_s": load_s,
                "prompt_tokens": len(ids),
                "decode_tokens": args.decode,
                "prefill_tok_s": len(ids) / best_prefill,
                "decode_tok_s": args.decode / best_decode,
                "peak_rss_bytes": peak_rss_bytes(),
            }
        )
    )


if __name__ == "__main__":
    main()
