"""Reference side of `cargo xtask bench vision` (see xtask/src/bench_vision.rs).

--write DIR      writes 64 seeded 640x480 JPEGs into DIR (when absent) and exits
--images DIR     times CLIPImageProcessor (PIL) and the torchvision-backed fast processor
                 (decode + preprocess to 336 px) over DIR's JPEGs, and a CLIP ViT-B/32-size
                 CLIPVisionModel forward (random weights, batch 8); prints one JSON line.
"""

import argparse
import glob
import json
import os
import time

import numpy as np
import torch
from PIL import Image


def write(dir_):
    os.makedirs(dir_, exist_ok=True)
    rng = np.random.default_rng(3)
    for i in range(64):
        path = os.path.join(dir_, f"img_{i:02}.jpg")
        if os.path.exists(path):
            continue
        y, x = np.mgrid[0:480, 0:640].astype(np.float32)
        img = np.stack([127 + 100 * np.sin(x / (20 + i)), 127 + 100 * np.cos(y / (15 + i)), (x + y) / 4.4], -1)
        img += rng.normal(0, 12, img.shape)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)


def best(fn, repeat):
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--write")
    ap.add_argument("--images")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if args.write:
        write(args.write)
        return
    torch.set_num_threads(args.threads)
    files = sorted(glob.glob(os.path.join(args.images, "*.jpg")))
    kwargs = dict(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    out = {"images": len(files), "threads": args.threads}
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    pil = CLIPImageProcessorPil(**kwargs)
    t = best(lambda: pil([Image.open(f).convert("RGB") for f in files], return_tensors="pt"), args.repeat)
    out["pil_images_per_s"] = len(files) / t
    try:
        from transformers import CLIPImageProcessor
        fast = CLIPImageProcessor(**kwargs)
        out["fast_class"] = type(fast).__name__
        t = best(lambda: fast([Image.open(f).convert("RGB") for f in files], return_tensors="pt"), args.repeat)
        out["fast_images_per_s"] = len(files) / t
    except Exception as e:  # torchvision missing
        out["fast_error"] = str(e)
    from transformers import CLIPVisionConfig, CLIPVisionModel
    torch.manual_seed(0)
    model = CLIPVisionModel(CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                             num_attention_heads=12, image_size=224, patch_size=32)).eval()
    pixels = torch.randn(8, 3, 224, 224)
    with torch.inference_mode():
        t = best(lambda: model(pixel_values=pixels, output_hidden_states=True), args.repeat)
    out["tower_batch8_s"] = t
    print(json.dumps(out))


if __name__ == "__main__":
    main()
