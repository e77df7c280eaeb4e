# Held-out probe of the demo model (see examples/demo-model/README.md): numpy-made
# beeps at four gaps, asked to count them and name their pitch. Usage: python audio.py [BINARY] [MODEL]
import random, sys
from common import WORDS, ask, write_beeps
random.seed(5)
BIN = sys.argv[1] if len(sys.argv) > 1 else "../../target/bench/release/multitoken"
MODEL = sys.argv[2] if len(sys.argv) > 2 else "../../examples/demo-model"
res = {}
for gap in [1.2, 0.8, 0.5, 0.3]:
    ok = 0; tot = 0
    for count in [1,2,3,4]:
        for pitch, f in [("low", 300), ("high", 1500), ("low", 350), ("high", 1000)]:
            rate = random.choice([16000, 22050, 44100])
            p = f"aud_{gap}_{count}_{f}.wav"; write_beeps(p, count, f, 0.25, gap, rate)
            text = ask(BIN, MODEL, "How many beeps are there?", audios=[p], max_new_tokens=20).lower()
            ok += WORDS[count] in text; tot += 1
            text2 = ask(BIN, MODEL, "Are the beeps high or low?", audios=[p], max_new_tokens=20).lower()
            res.setdefault(("pitch",gap), []).append(pitch in text2)
    print("gap", gap, "count right", ok, "/", tot, "pitch right", sum(res[("pitch",gap)]), "/", len(res[("pitch",gap)]))
