# Held-out probe of the demo model (see examples/demo-model/README.md): pairs of
# make.py's images, "which of the two shows ...", judged by the verdict's first/second.
import json, random, sys
from common import ask
random.seed(99)
BIN="../../target/bench/release/multitoken"; MODEL=sys.argv[1] if len(sys.argv)>1 else "../../examples/demo-model"
rows=json.load(open("rows.json"))
meta={}
for r in rows:
    if len(r["want"])==2: meta[r["image"]]=(r["want"][0], r["want"][1])
imgs=list(meta)
ok=0; n=0; bad=[]
Q=["Which image shows a {s}?", "Which of the two pictures has the {s}?", "In which picture is there a {s}?", "Is the {s} in the first or the second image?"]
for i in range(32):
    a,b=random.sample(imgs,2)
    if meta[a][0]==meta[b][0]: continue
    target=random.choice([0,1]); s=meta[[a,b][target]][0]
    q=Q[i%4].format(s=s)
    text=ask(BIN, MODEL, f"<image>\n<image>\n{q}", images=[a, b], max_new_tokens=80)
    last=text.lower().split("so ")[-1]
    good=(["first","second"][target] in last) and (["second","first"][target] not in last)
    n+=1; ok+=good
    if not good: bad.append((a,b,q,meta[a],meta[b],text))
print(ok,"/",n)
for x in bad: print(x)
