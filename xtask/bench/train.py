"""PyTorch side of `cargo xtask bench train` (see xtask/src/bench_train.rs).

    python xtask/bench/train.py --convert-smollm2 GGUF OUT_DIR
        SmolLM2-135M-Instruct GGUF -> an HF directory (transformers dequantizes every
        tensor to f32 and un-permutes q/k): config.json, model.safetensors, tokenizer
        files with the chat template. Our `multitoken train --stage lora|full` and this
        script both train from that directory.
    python xtask/bench/train.py --make-tower OUT_DIR
        a CLIP ViT-B/32-size CLIPVisionModel with seeded random weights and a 224 px
        CLIPImageProcessor, saved with save_pretrained.
    python xtask/bench/train.py --run --stage projectors|lora --lm DIR --tower DIR \
        --rows rows.json --batch B --steps S --threads N [--lr 1e-3] [--lora-r 64]
        trains S optimizer steps the way multi_token does (LlamaForCausalLM, frozen
        CLIPVisionModel hidden_states[-2] without CLS, mlp2x_gelu projector, peft LoRA on
        every decoder linear but lm_head, AdamW, clip_grad_norm_ 1.0) on the rows our
        preparer wrote (the same ids, labels, placeholder spans and image files) and
        prints one JSON line: per-step seconds, losses, peak RSS (VmHWM).

A step is what our trainer's step is: decode + preprocess the batch's images, run the
frozen tower, project, splice, LM forward over right-padded rows, loss, backward,
clipping, optimizer step. Tokenization happens before the loop on both sides.
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


def convert_smollm2(gguf, out):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = pathlib.Path(gguf)
    out = pathlib.Path(out)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    # A GGUF-loaded model is marked quantized and refuses save_pretrained: copy its
    # (already dequantized) weights into a plain model of the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(tmp)
    tmp.rename(out)


def make_tower(out):
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                              num_attention_heads=12, image_size=224, patch_size=32)
    out = pathlib.Path(out)
    tmp = out.with_name(out.name + ".tmp")
    CLIPVisionModel(config).save_pretrained(tmp, safe_serialization=True)
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(tmp)
    tmp.rename(out)


def run(args):
    import torch
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPVisionModel, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = json.loads(pathlib.Path(args.rows).read_text())
    need = args.batch * args.steps
    if len(rows) < need:
        raise SystemExit(f"{args.rows}: {len(rows)} rows, need {need}")

    lm = LlamaForCausalLM.from_pretrained(args.lm, dtype=torch.float32)
    lm.requires_grad_(False)
    tower = CLIPVisionModel.from_pretrained(args.tower, dtype=torch.float32).eval()
    tower.requires_grad_(False)
    processor = CLIPImageProcessor.from_pretrained(args.tower)
    width = tower.config.hidden_size
    hidden = lm.config.hidden_size
    projector = torch.nn.Sequential(torch.nn.Linear(width, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden))
    params = list(projector.parameters())
    if args.stage == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, bias="none",
                            task_type="CAUSAL_LM",
                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        lm = get_peft_model(lm, config)
        params += [p for p in lm.parameters() if p.requires_grad]
    lm.train()
    projector.train()
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    embed = lm.get_input_embeddings()

    def step(batch):
        images = [Image.open(p).convert("RGB") for r in batch for p in r["images"]]
        with torch.no_grad():
            pixels = processor(images, return_tensors="pt")["pixel_values"]
            features = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        projected = projector(features)
        max_len = max(len(r["input_ids"]) for r in batch)
        embeds, labels, k = [], [], 0
        for r in batch:
            n = len(r["input_ids"])
            e = embed(torch.tensor(r["input_ids"]))
            pieces, at = [], 0
            for start, length in r["spans"]:
                pieces += [e[at:start], projected[k, :length]]
                k += 1
                at = start + length
            pieces.append(e[at:])
            if max_len > n:
                pieces.append(torch.zeros(max_len - n, hidden))
            embeds.append(torch.cat(pieces))
            labels.append(r["labels"] + [-100] * (max_len - n))
        out = lm(inputs_embeds=torch.stack(embeds), labels=torch.tensor(labels))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.item(), max_len

    step_s, losses, lengths = [], [], []
    for s in range(args.steps):
        batch = rows[s * args.batch:(s + 1) * args.batch]
        t0 = time.perf_counter()
        loss, max_len = step(batch)
        step_s.append(time.perf_counter() - t0)
        losses.append(loss)
        lengths.append(max_len)
    print(json.dumps({"impl": "pytorch", "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "stage": args.stage, "batch": args.batch, "step_s": step_s, "loss": losses,
                      "padded_len": lengths, "trainable_params": sum(p.numel() for p in params),
                      "peak_rss_bytes": peak_rss_bytes()}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--convert-smollm2", nargs=2, metavar=("GGUF", "OUT"))
    ap.add_argument("--make-tower", metavar="OUT")
    ap.add_argument("--run", action="store_true")
    ap.add_argument("--stage", choices=["projectors", "lora"], default="projectors")
    ap.add_argument("--lm")
    ap.add_argument("--tower")
    ap.add_argument("--rows")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lora-r", type=int, default=64)
    ap.add_argument("--lora-alpha", type=float, default=16.0)
    ap.add_argument("--lora-dropout", type=float, default=0.05)
    args = ap.parse_args()
    if args.convert_smollm2:
        convert_smollm2(*args.convert_smollm2)
    elif args.make_tower:
        make_tower(args.make_tower)
    elif args.run:
        run(args)
    else:
        ap.error("one of --convert-smollm2, --make-tower, --run")


if __name__ == "__main__":
    main()
