# Held-out probe of the demo model (see examples/demo-model/README.md): Pillow-drawn
# shapes and hand-written questions, judged by the words of the answer.
import json, sys, re
from collections import Counter
from common import ask, claim
BIN = sys.argv[1] if len(sys.argv) > 1 else "../../target/bench/release/multitoken"
MODEL = sys.argv[2] if len(sys.argv) > 2 else "../../examples/demo-model"
rows = json.load(open(sys.argv[3] if len(sys.argv) > 3 else "rows.json"))  # dark.py writes dark_rows.json
ok = 0; bybg = Counter(); totbg = Counter(); bad = []
for r in rows:
    text = ask(BIN, MODEL, r["q"], images=[r["image"]])
    words = set(re.findall(r"[a-z]+", claim(text).lower().replace("color", "colour")))
    want = [w.replace("color", "colour") for w in r["want"]]
    others = {"circle","square","triangle","red","green","blue","yellow"} - set(want)
    good = all(w in words for w in want) and not (others & words & ({"circle","square","triangle"} if len(want)==1 and want[0] in {"circle","square","triangle"} else {"red","green","blue","yellow"} if len(want)==1 else set()))
    totbg[r["bg"]] += 1
    if good: ok += 1; bybg[r["bg"]] += 1
    else: bad.append((r["image"], r["bg"], r["size"], r["q"], r["want"], text))
print(f"{ok}/{len(rows)}")
for b in totbg: print(b, bybg[b], "/", totbg[b])
for b in bad: print(b)
