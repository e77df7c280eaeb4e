# Shared by the demo-model probe scripts (see examples/demo-model/README.md): the
# shapes and colours, Pillow drawing, and one greedy answer from `multitoken generate`.
import json, random, re, subprocess, wave
import numpy as np
from PIL import Image, ImageDraw

COL = {"red": [(220,20,30),(255,0,0),(180,30,40)], "green": [(0,160,0),(40,200,60),(20,120,40)],
       "blue": [(0,0,255),(30,80,200),(20,40,160)], "yellow": [(255,215,0),(240,230,40),(230,200,20)]}
SHAPES = ["circle", "square", "triangle"]
def background(w, h, kind):
    if kind == "white": return Image.new("RGB", (w, h), (255,255,255))
    if kind == "cream": return Image.new("RGB", (w, h), (245,240,225))
    if kind == "lightgrey": return Image.new("RGB", (w, h), (200,200,200))
    if kind == "darkgrey": return Image.new("RGB", (w, h), (60,60,60))
    if kind == "black": return Image.new("RGB", (w, h), (10,10,10))
    if isinstance(kind, int): return Image.new("RGB", (w, h), (kind, kind, kind))
    if kind == "skyblue": return Image.new("RGB", (w, h), (190,220,250))
    if kind == "paper":
        im = Image.new("RGB", (w, h)); px = im.load()
        for y in range(h):
            for x in range(w):
                v = 230 + random.randint(-15, 15); px[x, y] = (v, v, v - 5)
        return im
    if kind == "vgrad":
        im = Image.new("RGB", (w, h)); d = ImageDraw.Draw(im)
        for y in range(h):
            t = y / max(1, h - 1); v = int(250 - 120 * t); d.line([(0, y), (w, y)], fill=(v, v, int(v * 0.95)))
        return im
    if kind == "grid":
        im = Image.new("RGB", (w, h), (250,250,250)); d = ImageDraw.Draw(im)
        for x in range(0, w, 20): d.line([(x,0),(x,h)], fill=(200,200,220))
        for y in range(0, h, 20): d.line([(0,y),(w,y)], fill=(200,200,220))
        return im
    raise ValueError(kind)
def draw(shape, rgb, w, h, bg, scale, off):
    im = background(w, h, bg); d = ImageDraw.Draw(im)
    s = min(w, h) * scale / 2
    cx = w / 2 + off[0] * (w / 2 - s); cy = h / 2 + off[1] * (h / 2 - s)
    if shape == "circle": d.ellipse([cx - s, cy - s, cx + s, cy + s], fill=rgb)
    elif shape == "square": d.rectangle([cx - s * 0.85, cy - s * 0.85, cx + s * 0.85, cy + s * 0.85], fill=rgb)
    else: d.polygon([(cx, cy - s), (cx - s * 0.95, cy + s * 0.8), (cx + s * 0.95, cy + s * 0.8)], fill=rgb)
    return im
def ask(binary, model, prompt, images=(), audios=(), documents=(), max_new_tokens=40):
    """The text of one greedy answer, or "ERR ..." with the end of stderr."""
    cmd = [binary, "generate", "--model", model, "--prompt", prompt, "--json", "--max-new-tokens", str(max_new_tokens)]
    for p in images: cmd += ["--image", p]
    for p in audios: cmd += ["--audio", p]
    for p in documents: cmd += ["--document", p]
    out = subprocess.run(cmd, capture_output=True, text=True)
    try: return json.loads(out.stdout.strip().splitlines()[-1])["text"]
    except Exception: return "ERR " + out.stderr[-300:]
def claim(text):
    """The answer without a yes/no chain's echo ("A triangle. A circle? No." -> "A
    triangle."): the echo restates what was asked before the verdict, it names no fact."""
    return re.sub(r"[^.?!]*\?\s*(yes|no)[.!]?\s*$", "", text, flags=re.I).strip() or text
def write_beeps(path, count, freq, beep, gap, rate=16000, amp=0.5, lead=0.3, tail=0.3):
    """A mono 16-bit WAV of `count` sine beeps of `beep` seconds, `gap` seconds apart."""
    n = int((lead + count * beep + (count - 1) * gap + tail) * rate); x = np.zeros(n)
    for k in range(count):
        s = int((lead + k * (beep + gap)) * rate); t = np.arange(int(beep * rate)) / rate
        x[s:s + len(t)] = amp * np.sin(2 * np.pi * freq * t)
    with wave.open(path, "wb") as f:
        f.setnchannels(1); f.setsampwidth(2); f.setframerate(rate); f.writeframes((x * 32767).astype(np.int16).tobytes())

TOPICS = ["cooking", "football", "weather", "space", "music", "gardening"]
WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}  # a beep count as the answers say it
GROUPS = {"shape": set(SHAPES), "colour": set(COL), "count": set(WORDS.values()),
          "pitch": {"high", "low"}, "topic": set(TOPICS)}
def right(text, facts):
    """Whether `text` names every fact in `facts` ({"shape": ["circle"], ...}) and no other
    value of the same group (after dropping a yes/no echo)."""
    words = set(re.findall(r"[a-z]+", claim(text).lower().replace("color", "colour")))
    return all(set(v) <= words and not (GROUPS[g] - set(v)) & words for g, v in facts.items())
def honest(text):
    """Whether `text` is the honest reply and names no fact."""
    lower = text.lower(); words = set(re.findall(r"[a-z]+", lower))
    return ("can't tell" in lower or "cannot tell" in lower) and not words & set().union(*GROUPS.values())
def score_rows(binary, model, rows, show_misses):
    """Ask each row (kind, question, items, facts) and print totals per kind: facts None
    wants the honest reply, {"order": [...]} the image a two-image answer ends on (the
    demo model reasons aloud, "First image: ... So the second image shows ...", so the
    last ordinal it names is its answer), anything else `right`."""
    score = {}; bad = []
    for kind, q, its, facts in rows:
        text = ask(binary, model, q, **its)
        if facts is None: ok = honest(text)
        elif "order" in facts:
            said = re.findall(r"\b(first|second)\b", text.lower()); ok = bool(said) and said[-1] == facts["order"][0]
        else: ok = right(text, facts)
        s = score.setdefault(kind, [0, 0]); s[0] += ok; s[1] += 1
        if not ok: bad.append((kind, list(its.values())[0], q, facts, text))
    for k, (ok, n) in score.items(): print(f"{k}: {ok}/{n}")
    print("total", sum(v[0] for v in score.values()), "/", sum(v[1] for v in score.values()))
    if show_misses:
        for b in bad: print("  wrong:", *b)
