# Held-out probe of the demo model (see examples/demo-model/README.md): Pillow-drawn
# shapes and hand-written questions, judged by the words of the answer. This script
# writes the 120-image set (img/, rows.json); common.py holds the drawing.
import json, random, os
from common import COL, SHAPES, draw
random.seed(4242)
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
