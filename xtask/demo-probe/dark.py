# Held-out probe of the demo model (see examples/demo-model/README.md): Pillow-drawn
# shapes and hand-written questions, judged by the words of the answer.
import json, random, os, sys
sys.argv=[sys.argv[0]]
exec(open("make.py").read().split("rows = []")[0])
random.seed(7)
rows=[]; os.makedirs("dimg", exist_ok=True)
for i in range(96):
    shape = SHAPES[i % 3]; colour = list(COL)[(i // 3) % 4]; rgb = random.choice(COL[colour])
    if colour == "blue": rgb = (60, 110, 255)
    w, h = [(224,224),(320,180),(150,300),(300,300)][(i//12) % 4]
    g = random.choice([40, 55, 70, 85])
    im = Image.new("RGB", (w, h), (g, g, g)); d = ImageDraw.Draw(im)
    s = min(w, h) * random.uniform(0.4, 0.8) / 2; cx, cy = w/2, h/2
    if shape == "circle": d.ellipse([cx - s, cy - s, cx + s, cy + s], fill=rgb)
    elif shape == "square": d.rectangle([cx - s * 0.85, cy - s * 0.85, cx + s * 0.85, cy + s * 0.85], fill=rgb)
    else: d.polygon([(cx, cy - s), (cx - s * 0.95, cy + s * 0.8), (cx + s * 0.95, cy + s * 0.8)], fill=rgb)
    p = f"dimg/{i:03d}.png"; im.save(p)
    rows.append({"image": p, "q": "What shape is it?", "want": [shape], "bg": f"{w}x{h}", "size": [w, h]})
json.dump(rows, open("dark_rows.json", "w"))
