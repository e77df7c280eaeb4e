# Held-out probe of the demo model (see examples/demo-model/README.md): 96 centred
# shapes on flat dark grey (dimg/, dark_rows.json), all asked "What shape is it?".
import json, random, os
from common import COL, SHAPES, draw
random.seed(7)
rows=[]; os.makedirs("dimg", exist_ok=True)
for i in range(96):
    shape = SHAPES[i % 3]; colour = list(COL)[(i // 3) % 4]; rgb = random.choice(COL[colour])
    if colour == "blue": rgb = (60, 110, 255)
    w, h = [(224,224),(320,180),(150,300),(300,300)][(i//12) % 4]
    g = random.choice([40, 55, 70, 85])
    p = f"dimg/{i:03d}.png"; draw(shape, rgb, w, h, g, random.uniform(0.4, 0.8), (0, 0)).save(p)
    rows.append({"image": p, "q": "What shape is it?", "want": [shape], "bg": f"{w}x{h}", "size": [w, h]})
json.dump(rows, open("dark_rows.json", "w"))
