"""Reference side of `cargo xtask bench vlm` (see xtask/src/bench_vlm.rs).

SmolVLM (HuggingFaceTB/SmolVLM-256M-Instruct's real config, random weights):
--setup-smolvlm DIR   writes (when absent) a full Idefics3ForConditionalGeneration directory with
                      save_pretrained (config.json, model.safetensors f32 ~1 GB, generation_config.json
                      without an EOS id, so that `generate` runs exactly max_new_tokens), the
                      Idefics3Processor (slow PIL image processor, image_seq_len 64) with a tokenizer
                      of the real vocabulary size whose special tokens sit at SmolVLM's ids, image.png
                      (a seeded 512x512 PNG) and setup.json (the prompt: "<|im_start|>User:<image>" +
                      a 20-token question + "<end_of_utterance>\\nAssistant:"); exits
--bench-smolvlm DIR   times, from the image file, the processor + Idefics3ForConditionalGeneration.generate
                      (f32, torch.no_grad, greedy, --new-tokens new tokens, --threads threads): time to
                      first token (processor start to the first new token reaching the streamer) and
                      decode tokens/s (the later tokens), best and median of --repeat passes after a
                      warm-up; with --ours FILE (ours' JSON: input_ids, token_ids) also whether the
                      prompt ids (image slots aside) and the greedy ids agree. Prints one JSON line.

Qwen2-VL (Qwen/Qwen2-VL-2B-Instruct's vision tower, random weights):
--setup-qwen2vl DIR   writes (when absent) config.json (Qwen2-VL-2B's Qwen2VLConfig), preprocessor_config.json
                      (Qwen2VLImageProcessor: min_pixels 3136, max_pixels 12845056, CLIP mean/std),
                      model.safetensors (`visual.*` of a seeded random Qwen2VisionTransformerPretrainedModel,
                      f32, ~2.7 GB: the tower and its merger), image.png (a seeded 448x448 PNG); exits
--bench-qwen2vl DIR   times the slow image processor + Qwen2VisionTransformerPretrainedModel (tower + merger)
                      on DIR/image.png: best and median of --repeat passes after a warm-up, the split, peak
                      RSS; with --ours FILE (safetensors key "features") the max abs difference to the
                      warm-up pass's merger output. Prints one JSON line.

--tiny (with a setup) shrinks the layer counts (and SmolVLM's upscaling) for a quick check of the
plumbing; its numbers mean nothing.
"""

import argparse
import json
import os
import resource
import statistics
import time

import numpy as np
import torch

# Bump when the files written by a setup change, so that an old cache is rebuilt.
SETUP_VERSION = 2

# HuggingFaceTB/SmolVLM-256M-Instruct's config.json (Idefics3ForConditionalGeneration).
SMOL_TEXT = dict(model_type="llama", vocab_size=49280, hidden_size=576, intermediate_size=1536,
                 num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                 hidden_act="silu", max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
                 pad_token_id=2, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
SMOL_VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   image_size=512, patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
SMOL_IMAGE_TOKEN_ID = 49190
# preprocessor_config.json / processor_config.json.
SMOL_PROCESSOR = dict(do_image_splitting=True, size={"longest_edge": 2048}, max_image_size={"longest_edge": 512},
                      resample=1, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], do_pad=True)
SMOL_IMAGE_SEQ_LEN = 64
# 20 characters, one token each with the bench tokenizer.
QUESTION = "What is in the image"

# Qwen/Qwen2-VL-2B-Instruct's config.json.
QWEN_VISION = dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, hidden_size=1536, patch_size=14,
                   spatial_merge_size=2, temporal_patch_size=2, in_channels=3, hidden_act="quick_gelu")
QWEN_TEXT = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2, hidden_act="silu", max_position_embeddings=32768,
                 rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
                 rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})
QWEN_PROCESSOR = dict(min_pixels=3136, max_pixels=12845056, patch_size=14, temporal_patch_size=2, merge_size=2,
                      image_mean=[0.48145466, 0.4578275, 0.40821073],
                      image_std=[0.26862954, 0.26130258, 0.27577711])


def write_image(path, side, seed):
    from PIL import Image
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side].astype(np.float32)
    img = np.stack([127 + 100 * np.sin(x / 37.0 + y / 91.0), 127 + 100 * np.cos(y / 23.0),
                    (x + y) / (2 * side) * 255], -1)
    img += rng.normal(0, 12, img.shape)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)


def fresh(dir_, tiny):
    """True when DIR holds a complete setup of this version and size."""
    stamp = os.path.join(dir_, "setup.json")
    if not os.path.exists(stamp):
        return False
    with open(stamp) as f:
        s = json.load(f)
    return s.get("version") == SETUP_VERSION and s.get("tiny") == tiny


def smol_tokenizer():
    """A tokenizer with SmolVLM's vocabulary size and special-token ids: SmolLM2's <|endoftext|> 0,
    <|im_start|> 1, <|im_end|> 2, then one token per character of "\\n" and ASCII 32..126 (no merges),
    fillers up to 49152, then SmolVLM's added tokens <global-img> 49152, <row_i_col_j> 49153..49188,
    <fake_token_around_image> 49189, <image> 49190, fillers, <end_of_utterance> 49279."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    for ch in ["\n"] + [chr(c) for c in range(32, 127)]:
        vocab[ch] = len(vocab)
    while len(vocab) < 49152:
        vocab[f"<filler_{len(vocab)}>"] = len(vocab)
    added = ["<global-img>"] + [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
    added += ["<fake_token_around_image>", "<image>"]
    for tok in added:
        vocab[tok] = len(vocab)
    while len(vocab) < 49279:
        vocab[f"<extra_{len(vocab)}>"] = len(vocab)
    vocab["<end_of_utterance>"] = len(vocab)
    assert vocab["<image>"] == SMOL_IMAGE_TOKEN_ID and len(vocab) == SMOL_TEXT["vocab_size"]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<|endoftext|>"))
    tok.decoder = decoders.Fuse()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + added + ["<end_of_utterance>"]
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>")


def setup_smolvlm(dir_, tiny):
    if fresh(dir_, tiny):
        return
    os.makedirs(dir_, exist_ok=True)
    from transformers import GenerationConfig, Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    text, vision, processor = dict(SMOL_TEXT), dict(SMOL_VISION), dict(SMOL_PROCESSOR)
    if tiny:
        text["num_hidden_layers"], vision["num_hidden_layers"] = 2, 2
        processor["size"] = {"longest_edge": 1024}
    config = Idefics3Config(text_config=text, vision_config=vision, scale_factor=4, image_token_id=SMOL_IMAGE_TOKEN_ID,
                            tie_word_embeddings=False, pad_token_id=2)
    start = time.perf_counter()
    torch.manual_seed(0)
    model = Idefics3ForConditionalGeneration(config).eval()
    # No EOS id: generate then runs exactly max_new_tokens, as ours with --ignore-eos.
    model.generation_config = GenerationConfig(bos_token_id=1, pad_token_id=2)
    model.save_pretrained(dir_)
    params = sum(p.numel() for p in model.parameters())
    del model
    tokenizer = smol_tokenizer()
    proc = Idefics3Processor(Idefics3ImageProcessorPil(**processor), tokenizer, image_seq_len=SMOL_IMAGE_SEQ_LEN)
    proc.save_pretrained(dir_)
    write_image(os.path.join(dir_, "image.png"), 512, 7)
    prompt = "<|im_start|>User:<image>" + QUESTION + "<end_of_utterance>\nAssistant:"
    with open(os.path.join(dir_, "setup.json"), "w") as f:
        json.dump({"version": SETUP_VERSION, "tiny": tiny, "params": params, "prompt": prompt,
                   "question_tokens": len(tokenizer(QUESTION, add_special_tokens=False)["input_ids"]),
                   "seconds": time.perf_counter() - start}, f)
    print(f"wrote {dir_}: {params / 1e6:.0f} M parameters", flush=True)


def setup_qwen2vl(dir_, tiny):
    if fresh(dir_, tiny):
        return
    os.makedirs(dir_, exist_ok=True)
    from safetensors.torch import save_file
    from transformers import Qwen2VLConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    vision = dict(QWEN_VISION)
    if tiny:
        vision["depth"] = 2
    config = Qwen2VLConfig(vision_config=vision, text_config=QWEN_TEXT, image_token_id=151655,
                           video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)
    config.save_pretrained(dir_)
    # The hub's preprocessor_config.json form (min_pixels / max_pixels at the top level).
    with open(os.path.join(dir_, "preprocessor_config.json"), "w") as f:
        json.dump(dict(QWEN_PROCESSOR, image_processor_type="Qwen2VLImageProcessor",
                       processor_class="Qwen2VLProcessor"), f, indent=2)
    write_image(os.path.join(dir_, "image.png"), 448, 11)
    start = time.perf_counter()
    torch.manual_seed(0)
    tower = Qwen2VisionTransformerPretrainedModel._from_config(config.vision_config).eval()
    # Named as Qwen2VLForConditionalGeneration.save_pretrained writes them (and the hub has them).
    tensors = {"visual." + k: v.contiguous() for k, v in tower.state_dict().items()}
    del tower
    tmp = os.path.join(dir_, "model.safetensors.tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(dir_, "model.safetensors"))
    params = sum(t.numel() for t in tensors.values())
    with open(os.path.join(dir_, "setup.json"), "w") as f:
        json.dump({"version": SETUP_VERSION, "tiny": tiny, "params": params,
                   "seconds": time.perf_counter() - start}, f)
    print(f"wrote {dir_}: {params / 1e6:.0f} M parameters", flush=True)


def status_bytes(key):
    """VmHWM / VmRSS of this process from /proc/self/status, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return None


def reset_peak_rss():
    """Resets VmHWM to the current RSS (Linux 4.0+), so that the passes' own peak can be read."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_fields(load_peak, rss_after_load, reset):
    pass_peak = status_bytes("VmHWM:")
    return {
        "rss_after_load_bytes": rss_after_load,
        "peak_rss_bytes": max(load_peak, pass_peak or 0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024),
        "pass_peak_rss_bytes": pass_peak if reset else None,
    }


def timing_hooks(modules):
    """Forward hooks recording the start and end of each (name, module)."""
    marks = {}

    def mark(key):
        return lambda *_: marks.__setitem__(key, time.perf_counter())

    for name, module in modules:
        module.register_forward_pre_hook(mark(name + "_start"))
        module.register_forward_hook(mark(name + "_end"))
    return marks


class Stamps:
    """A generate streamer that only records when each put arrives (the prompt first, then every new token)."""

    def __init__(self):
        self.times, self.tokens = [], []

    def put(self, value):
        self.times.append(time.perf_counter())
        self.tokens.append(value.reshape(-1).tolist())

    def end(self):
        pass


def bench_smolvlm(args):
    from PIL import Image
    from transformers import AutoProcessor, Idefics3ForConditionalGeneration

    torch.set_num_threads(args.threads)
    with open(os.path.join(args.bench_smolvlm, "setup.json")) as f:
        setup = json.load(f)
    start = time.perf_counter()
    proc = AutoProcessor.from_pretrained(args.bench_smolvlm, backend="pil")
    model = Idefics3ForConditionalGeneration.from_pretrained(args.bench_smolvlm, dtype=torch.float32).eval()
    load_s = time.perf_counter() - start
    load_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rss_after_load = status_bytes("VmRSS:")
    reset = reset_peak_rss()
    inner = model.model
    marks = timing_hooks([("vision", inner.vision_model), ("connector", inner.connector)])
    image_path = os.path.join(args.bench_smolvlm, "image.png")
    n = args.new_tokens

    def one_pass():
        stamps = Stamps()
        t0 = time.perf_counter()
        inputs = proc(text=[setup["prompt"]], images=[[Image.open(image_path)]], return_tensors="pt")
        t1 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=stamps)
        t2 = time.perf_counter()
        new = out[0, inputs["input_ids"].shape[1]:].tolist()
        if len(new) != n or len(stamps.times) != n + 1:
            raise SystemExit(f"generate gave {len(new)} new tokens ({len(stamps.times)} streamer puts), not {n}")
        first, last = stamps.times[1], stamps.times[-1]
        # to_embeds: the processor, the vision tower and the connector; prefill: the rest up to the first token.
        split = {"pre_s": t1 - t0, "vision_s": marks["vision_end"] - marks["vision_start"],
                 "connector_s": marks["connector_end"] - marks["connector_start"],
                 "to_embeds_s": marks["connector_end"] - t0, "prefill_s": first - marks["connector_end"],
                 "ttft_s": first - t0,
                 "decode_tok_s": (n - 1) / (last - first) if n > 1 else float("nan"), "total_s": t2 - t0}
        return inputs, new, split

    inputs, new, warm = one_pass()
    passes = [one_pass()[2] for _ in range(args.repeat)]
    ttft = [p["ttft_s"] for p in passes]
    decode = [p["decode_tok_s"] for p in passes]
    out = {
        "impl": "transformers",
        "threads": torch.get_num_threads(),
        "attn_implementation": model.config._attn_implementation,
        "processor_class": type(proc.image_processor).__name__,
        "pixel_values_shape": list(inputs["pixel_values"].shape),
        "prompt_tokens": inputs["input_ids"].shape[1],
        "new_tokens": n,
        "token_ids": new,
        "load_s": load_s,
        "warmup_ttft_s": warm["ttft_s"],
        "ttft_passes_s": ttft,
        "best_ttft_s": min(ttft),
        "median_ttft_s": statistics.median(ttft),
        "decode_passes_tok_s": decode,
        "best_decode_tok_s": max(decode),
        "median_decode_tok_s": statistics.median(decode),
    }
    for key in ("pre_s", "vision_s", "connector_s", "to_embeds_s", "prefill_s"):
        out["best_" + key] = min(p[key] for p in passes)
    out.update(rss_fields(load_peak, rss_after_load, reset))
    if args.ours:
        with open(args.ours) as f:
            ours = json.load(f)
        ids = inputs["input_ids"][0].tolist()
        ours_ids = ours.get("input_ids", [])
        # Ours keeps a placeholder id (the pad id) at image slots, whose embeddings are replaced anyway.
        image_id = model.config.image_token_id
        out["input_ids_equal"] = len(ours_ids) == len(ids) and all(
            a == b or b == image_id for a, b in zip(ours_ids, ids))
        ours_new = ours.get("token_ids", [])
        out["first_token_equal"] = bool(ours_new) and ours_new[0] == new[0]
        agree = 0
        for a, b in zip(ours_new, new):
            if a != b:
                break
            agree += 1
        out["greedy_ids_agree"] = agree
    print(json.dumps(out))


def bench_qwen2vl(args):
    from PIL import Image
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoImageProcessor
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    proc = AutoImageProcessor.from_pretrained(args.bench_qwen2vl, backend="pil")
    config = AutoConfig.from_pretrained(args.bench_qwen2vl)
    with torch.device("meta"):
        tower = Qwen2VisionTransformerPretrainedModel._from_config(config.vision_config, dtype=torch.float32)
    prefix = "visual."
    weights = {k[len(prefix):]: v for k, v in load_file(os.path.join(args.bench_qwen2vl, "model.safetensors")).items()
               if k.startswith(prefix)}
    tower.load_state_dict(weights, strict=True, assign=True)
    del weights
    # rotary inv_freq is a non-persistent buffer: rebuild it off the meta device.
    tower.rotary_pos_emb = type(tower.rotary_pos_emb)(config.vision_config)
    tower.eval()
    load_s = time.perf_counter() - start
    load_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rss_after_load = status_bytes("VmRSS:")
    reset = reset_peak_rss()
    marks = timing_hooks([("merger", tower.merger)])
    image_path = os.path.join(args.bench_qwen2vl, "image.png")

    def one_pass():
        t0 = time.perf_counter()
        inputs = proc(images=[Image.open(image_path)], return_tensors="pt")
        t1 = time.perf_counter()
        with torch.no_grad():
            features = tower(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output
        t2 = time.perf_counter()
        split = {"pre_s": t1 - t0, "tower_s": marks["merger_start"] - t1,
                 "merger_s": marks["merger_end"] - marks["merger_start"], "total_s": t2 - t0}
        return inputs, features, split

    inputs, features, warm = one_pass()
    passes = [one_pass()[2] for _ in range(args.repeat)]
    total = [p["total_s"] for p in passes]
    out = {
        "impl": "transformers",
        "threads": torch.get_num_threads(),
        "attn_implementation": tower.config._attn_implementation,
        "processor_class": type(proc).__name__,
        "pixel_values_shape": list(inputs["pixel_values"].shape),
        "grid_thw": inputs["image_grid_thw"].tolist(),
        "features_shape": list(features.shape),
        "load_s": load_s,
        "warmup_s": warm["total_s"],
        "passes_s": total,
        "best_s": min(total),
        "median_s": statistics.median(total),
    }
    for key in ("pre_s", "tower_s", "merger_s"):
        out["best_" + key] = min(p[key] for p in passes)
    out.update(rss_fields(load_peak, rss_after_load, reset))
    if args.ours:
        ours = load_file(args.ours)["features"]
        if ours.shape != features.shape:
            out["diff_error"] = f"ours {list(ours.shape)} vs transformers {list(features.shape)}"
        else:
            diff = (ours - features).abs()
            out["max_abs_diff"] = diff.max().item()
            out["mean_abs_diff"] = diff.mean().item()
            out["max_abs_value"] = features.abs().max().item()
            out["max_rel_diff"] = out["max_abs_diff"] / out["max_abs_value"]
    print(json.dumps(out))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--setup-smolvlm")
    ap.add_argument("--setup-qwen2vl")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--bench-smolvlm")
    ap.add_argument("--bench-qwen2vl")
    ap.add_argument("--ours")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    if args.setup_smolvlm:
        setup_smolvlm(args.setup_smolvlm, args.tiny)
    elif args.setup_qwen2vl:
        setup_qwen2vl(args.setup_qwen2vl, args.tiny)
    elif args.bench_smolvlm:
        bench_smolvlm(args)
    elif args.bench_qwen2vl:
        bench_qwen2vl(args)
    else:
        ap.error("give --setup-smolvlm, --setup-qwen2vl, --bench-smolvlm or --bench-qwen2vl DIR")


if __name__ == "__main__":
    main()
