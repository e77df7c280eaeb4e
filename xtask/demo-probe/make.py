# Held-out probe of the demo model (see examples/demo-model/README.md): Pillow-drawn
# shapes and hand-written questions, judged by the words of the answer.
# An independent held-out probe for the demo model: Pillow-drawn shapes on
# backgrounds and phrasings written here, not by the generator.
import json, random, os, math
from PIL import Image, ImageDraw, ImageFilter
random.seed(4242)
COL = {"red": [(220,20,30),(255,0,0),(180,30,40)], "green": [(0,160,0),(40,200,60),(20,120,40)],
       "blue": [(0,0,255),(30,80,200),(20,40,160)], "yellow": [(255,215,0),(240,230,40),(230,200,20)]}
SHAPES = ["circle", "square", "triangle"]
def background(w, h, kind):
    if kind == "white": return Image.new("RGB", (w, h), (255,255,255))
    if kind == "cream": return Image.new("RGB", (w, h), (245,240,225))
    if kind == "lightgrey": return Image.new("RGB", (w, h), (200,200,200))
    if kind == "darkgrey": return Image.new("RGB", (w, h), (60,60,60))
    if kind == "black": return Image.new("RGB", (w, h), (10,10,10))
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
SHAPE_Q = ["What shape do you see?", "Which shape is drawn here?", "Name the shape in this picture.",
           "what kind of shape is that", "Is it a circle, a square or a triangle?", "Tell me the shape.",
           "What geometric figure does the image contain?", "Identify the shape, please."]
COLOUR_Q = ["What colour is the shape?", "What color is it?", "Which color is the figure?",
            "Tell me the colour of the object.", "what colour is the thing in the image",
            "Name the color you see.", "What is the shape's color?", "Which colour does the drawing use?"]
DESC_Q = ["Describe the image.", "What's in this picture?", "What do you see?", "Can you describe this for me?",
          "Explain what is shown.", "What is this?", "Give me a short description of the image.", "Look at this and tell me what it is."]
rows = []
os.makedirs("img", exist_ok=True)
sizes = [(224,224),(320,180),(150,300),(400,300),(256,512),(640,160),(300,300),(200,260)]
bgs = ["white","cream","lightgrey","darkgrey","black","skyblue","paper","vgrad","grid"]
n = 0
for i in range(120):
    shape = random.choice(SHAPES); colour = random.choice(list(COL))
    rgb = random.choice(COL[colour]); w, h = sizes[i % len(sizes)]; bg = bgs[(i * 7 + i // 9) % len(bgs)]
    if bg in ("darkgrey","black") and colour == "blue": rgb = (60, 110, 255)
    scale = random.uniform(0.35, 0.8); off = (random.uniform(-0.8, 0.8), random.uniform(-0.8, 0.8))
    p = f"img/{i:03d}.png"; draw(shape, rgb, w, h, bg, scale, off).save(p)
    kind = i % 3
    q = [SHAPE_Q, COLOUR_Q, DESC_Q][kind][(i // 3) % 8]
    want = [[shape], [colour], [shape, colour]][kind]
    rows.append({"image": p, "q": q, "want": want, "bg": bg, "size": [w, h]})
json.dump(rows, open("rows.json", "w"), indent=0)
print(len(rows))
