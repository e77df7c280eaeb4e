"""Reference side of `cargo xtask bench vision --family idefics2` (see xtask/src/bench_vision.rs).

--setup DIR      writes (when absent) the shared inputs both sides load, at HuggingFaceM4/idefics2-8b's
                 vision + connector sizes: config.json (idefics2-8b's Idefics2Config), preprocessor_config.json
                 (Idefics2ImageProcessorPil, image splitting, longest_edge 980, shortest_edge 378),
                 model.safetensors (`model.vision_model.*` and `model.connector.*` of a seeded random
                 Idefics2ForConditionalGeneration, f32, ~4.7 GB) and image.png (a seeded 980x980 PNG); exits
--bench DIR      times the image processor + Idefics2ForConditionalGeneration.get_image_features on
                 DIR/image.png (f32, torch.no_grad, --threads threads): best and median of --repeat passes
                 after a warm-up, the split into preprocessing / vision tower / connector, the peak RSS
                 (getrusage) and the passes' own peak (VmHWM reset after loading); with --ours FILE (ours'
                 features, safetensors key "features" [320, 4096]) also the difference to the warm-up
                 pass's features. Prints one JSON line.

The text model is left out of the bench model (no layers, a vocabulary of 8): get_image_features never
touches it, and at full size it would be 7 B parameters.
"""

import argparse
import json
import os
import resource
import statistics
import time

import numpy as np
import torch

# Bump when the files written by --setup change, so that an old cache is rebuilt.
SETUP_VERSION = 1
IMAGE_SIDE = 980

# HuggingFaceM4/idefics2-8b's config.json (vision + perceiver + the text sizes the connector uses).
VISION = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
              image_size=980, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
PERCEIVER = dict(hidden_act="silu", hidden_size=4096, rms_norm_eps=1e-5, resampler_n_latents=64,
                 resampler_depth=3, resampler_n_heads=16, resampler_head_dim=96, num_key_value_heads=4)
TEXT = dict(model_type="mistral", vocab_size=32003, hidden_size=4096, intermediate_size=14336,
            num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, hidden_act="silu",
            max_position_embeddings=32768, sliding_window=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
            pad_token_id=0)
PROCESSOR = dict(do_image_splitting=True, size={"shortest_edge": 378, "longest_edge": 980},
                 image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], resample=2, do_pad=True)


def full_config():
    from transformers import Idefics2Config
    return Idefics2Config(vision_config=VISION, perceiver_config=PERCEIVER, text_config=TEXT,
                          image_token_id=32001, tie_word_embeddings=False)


def bench_config():
    """idefics2-8b's config with the text model emptied (get_image_features never runs it)."""
    from transformers import Idefics2Config
    text = dict(TEXT, num_hidden_layers=0, vocab_size=8)
    return Idefics2Config(vision_config=VISION, perceiver_config=PERCEIVER, text_config=text,
                          image_token_id=32001, tie_word_embeddings=False)


def write_image(path):
    rng = np.random.default_rng(7)
    y, x = np.mgrid[0:IMAGE_SIDE, 0:IMAGE_SIDE].astype(np.float32)
    img = np.stack([127 + 100 * np.sin(x / 37.0 + y / 91.0), 127 + 100 * np.cos(y / 23.0),
                    (x + y) / (2 * IMAGE_SIDE) * 255], -1)
    img += rng.normal(0, 12, img.shape)
    from PIL import Image
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)


def setup(dir_):
    stamp = os.path.join(dir_, "setup.json")
    if os.path.exists(stamp):
        with open(stamp) as f:
            if json.load(f).get("version") == SETUP_VERSION:
                return
    os.makedirs(dir_, exist_ok=True)
    from safetensors.torch import save_file
    from transformers import Idefics2ForConditionalGeneration
    from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil

    full_config().save_pretrained(dir_)
    Idefics2ImageProcessorPil(**PROCESSOR).save_pretrained(dir_)
    write_image(os.path.join(dir_, "image.png"))
    torch.manual_seed(0)
    start = time.perf_counter()
    model = Idefics2ForConditionalGeneration(bench_config()).eval()
    keep = ("model.vision_model.", "model.connector.")
    tensors = {k: v.contiguous() for k, v in model.state_dict().items() if k.startswith(keep)}
    del model
    tmp = os.path.join(dir_, "model.safetensors.tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(dir_, "model.safetensors"))
    params = sum(t.numel() for t in tensors.values())
    with open(stamp, "w") as f:
        json.dump({"version": SETUP_VERSION, "params": params, "seconds": time.perf_counter() - start}, f)
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


def bench(args):
    from PIL import Image
    from transformers import AutoImageProcessor, Idefics2ForConditionalGeneration

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    proc = AutoImageProcessor.from_pretrained(args.bench)
    model = Idefics2ForConditionalGeneration.from_pretrained(args.bench, config=bench_config(),
                                                             dtype=torch.float32).eval()
    load_s = time.perf_counter() - start
    load_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rss_after_load = status_bytes("VmRSS:")
    reset = reset_peak_rss()
    inner = model.model
    marks = {}

    def mark(name):
        return lambda *_: marks.__setitem__(name, time.perf_counter())

    inner.vision_model.register_forward_pre_hook(mark("tower_start"))
    inner.vision_model.register_forward_hook(mark("tower_end"))
    inner.connector.register_forward_pre_hook(mark("connector_start"))
    inner.connector.register_forward_hook(mark("connector_end"))
    image_path = os.path.join(args.bench, "image.png")

    def one_pass():
        t0 = time.perf_counter()
        inputs = proc(images=[[Image.open(image_path)]], return_tensors="pt")
        t1 = time.perf_counter()
        with torch.no_grad():
            out = inner.get_image_features(pixel_values=inputs["pixel_values"],
                                           pixel_attention_mask=inputs["pixel_attention_mask"])
        features = out.pooler_output[0]
        t2 = time.perf_counter()
        split = {"pre_s": t1 - t0, "tower_s": marks["tower_end"] - marks["tower_start"],
                 "connector_s": marks["connector_end"] - marks["connector_start"], "total_s": t2 - t0}
        return features, split, tuple(inputs["pixel_values"].shape)

    features, warm, pixel_shape = one_pass()
    passes = [one_pass()[1] for _ in range(args.repeat)]
    pass_peak = status_bytes("VmHWM:")
    out = {
        "impl": "transformers",
        "threads": torch.get_num_threads(),
        "attn_implementation": model.config._attn_implementation,
        "processor_class": type(proc).__name__,
        "pixel_values_shape": list(pixel_shape),
        "features_shape": list(features.shape),
        "load_s": load_s,
        "warmup_s": warm["total_s"],
        "passes_s": [p["total_s"] for p in passes],
        "best_s": min(p["total_s"] for p in passes),
        "median_s": statistics.median(p["total_s"] for p in passes),
        "rss_after_load_bytes": rss_after_load,
        "peak_rss_bytes": max(load_peak, pass_peak or 0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024),
        "pass_peak_rss_bytes": pass_peak if reset else None,
    }
    for key in ("pre_s", "tower_s", "connector_s"):
        out["best_" + key] = min(p[key] for p in passes)
    if args.ours:
        from safetensors.torch import load_file
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
    ap.add_argument("--setup")
    ap.add_argument("--bench")
    ap.add_argument("--ours")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if args.setup:
        setup(args.setup)
    elif args.bench:
        bench(args)
    else:
        ap.error("give --setup DIR or --bench DIR")


if __name__ == "__main__":
    main()
