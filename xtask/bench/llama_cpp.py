"""llama.cpp's side of `cargo xtask bench lm --llama-cpp`: the same GGUF file, the same
prompt ids, the same thread count, through llama-cpp-python (PyPI `llama-cpp-python`,
which builds llama.cpp from source for this CPU when pip installs it).

    python xtask/bench/llama_cpp.py --gguf PATH --prompt-ids FILE.json --decode 128 --threads N

Prefill is one `eval` of the whole prompt (`n_batch` = the prompt length, so llama.cpp
takes it in one batch as `llama-bench -p` does); decode is one `eval` per new token through
the KV cache with greedy argmax over the last logits, EOS ignored. The best of `--repeat`
runs is reported, after one warm-up, with the KV cache cleared between runs. Prints one
JSON object on the last stdout line.
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

    try:
        import llama_cpp
    except ImportError:
        raise SystemExit("llama-cpp-python is not installed: `.venv/bin/pip install llama-cpp-python` (builds llama.cpp, a few minutes)")
    import numpy as np

    ids = json.loads(pathlib.Path(args.prompt_ids).read_text())
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=args.gguf,
        n_ctx=len(ids) + args.decode + 8,
        n_batch=max(len(ids), 1),
        n_ubatch=max(len(ids), 1),
        n_threads=args.threads,
        n_threads_batch=args.threads,
        logits_all=False,
        verbose=False,
    )
    load_s = time.perf_counter() - t0

    def run(prompt, decode):
        llm.reset()
        llm._ctx.kv_cache_clear() if hasattr(llm._ctx, "kv_cache_clear") else None
        t0 = time.perf_counter()
        llm.eval(prompt)
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        prefill_s = time.perf_counter() - t0
        out = [nxt]
        t0 = time.perf_counter()
        for _ in range(decode):
            llm.eval([nxt])
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            out.append(nxt)
        decode_s = time.perf_counter() - t0
        return prefill_s, decode_s, out

    run(ids[:16], 4)
    prefill, decode = 0.0, 0.0
    first = None
    for _ in range(args.repeat):
        p, d, out = run(ids, args.decode)
        first = first or out
        prefill = max(prefill, len(ids) / p)
        decode = max(decode, args.decode / d)
    print(json.dumps({
        "impl": "llama.cpp " + pathlib.Path(args.gguf).name.rsplit(".", 2)[-2].lower(),
        "version": getattr(llama_cpp, "__version__", "?"),
        "threads": args.threads,
        "load_s": load_s,
        "prompt_tokens": len(ids),
        "decode_tokens": args.decode,
        "prefill_tok_s": prefill,
        "decode_tok_s": decode,
        "first_ids": first[:16],
        "peak_rss_bytes": peak_rss_bytes(),
    }))


if __name__ == "__main__":
    main()
