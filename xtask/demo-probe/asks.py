# Held-out probe of the demo model (see examples/demo-model/README.md): questions
# written by hand (none from the generator's lists or parts) about the six items in
# examples/shapes, and off-topic requests beside them, which want the honest reply.
# Judged by the words of the answer. Usage: python asks.py [BINARY] [MODEL]
import re, sys
from common import ask, claim
BIN = sys.argv[1] if len(sys.argv) > 1 else "../../target/bench/release/multitoken"
MODEL = sys.argv[2] if len(sys.argv) > 2 else "../../examples/demo-model"
S = "../../examples/shapes/"
IMAGES = {S + "red-circle.png": {"shape": ["circle"], "colour": ["red"]},
          S + "blue-triangle.png": {"shape": ["triangle"], "colour": ["blue"]}}
AUDIOS = {S + "three-high-beeps.wav": {"count": ["three"], "pitch": ["high"]},
          S + "two-low-beeps.wav": {"count": ["two"], "pitch": ["low"]}}
DOCS = {S + "cooking.txt": {"topic": ["cooking"]}, S + "space.txt": {"topic": ["space"]}}
IMAGE_QS = [("What's drawn here, and in which colour?", ["colour", "shape"]),
            ("Which geometric shape can I see?", ["shape"]),
            ("Tell me the colour, nothing else.", ["colour"]),
            ("Is that a circle or something else?", ["shape"])]
AUDIO_QS = [("How many beeps did you count?", ["count"]),
            ("Are the tones high-pitched?", ["pitch"]),
            ("What do these beeps sound like, high or low?", ["pitch"]),
            ("Count the sounds for me.", ["count"]),
            ("What's on this recording?", ["count", "pitch"])]
DOC_QS = [("What's this text mostly about?", ["topic"]),
          ("Give me the topic in one word.", ["topic"]),
          ("What field is this writing from?", ["topic"])]
OFF_TOPIC = ["What's the best way to learn guitar?", "Is it going to rain tomorrow?",
             "Who is the richest person alive?", "Convert 10 miles to kilometres.",
             "Organise my week.", "What's 17 times 23?", "Show me the way to the library.",
             "Why is the sky dark at night?", "Do you dream?", "Turn off the lights.",
             "Tell me about the Roman empire.", "What's the password for the wifi?"]
GROUPS = {"shape": {"circle", "square", "triangle"}, "colour": {"red", "green", "blue", "yellow"},
          "count": {"one", "two", "three", "four"}, "pitch": {"high", "low"},
          "topic": {"cooking", "football", "weather", "space", "music", "gardening"}}
def right(text, facts, asked):
    words = set(re.findall(r"[a-z]+", claim(text).lower().replace("color", "colour")))
    return all(set(facts[g]) <= words and not (GROUPS[g] - set(facts[g])) & words for g in asked)
score = {"image": [0, 0], "audio": [0, 0], "document": [0, 0], "off-topic": [0, 0]}; bad = []
for kind, items, qs, flag in [("image", IMAGES, IMAGE_QS, "images"), ("audio", AUDIOS, AUDIO_QS, "audios"),
                              ("document", DOCS, DOC_QS, "documents")]:
    for path, facts in items.items():
        for q, asked in qs:
            text = ask(BIN, MODEL, q, **{flag: [path]})
            ok = right(text, facts, asked); score[kind][0] += ok; score[kind][1] += 1
            if not ok: bad.append((path, q, text))
every = [("images", p) for p in IMAGES] + [("audios", p) for p in AUDIOS] + [("documents", p) for p in DOCS]
for i, q in enumerate(OFF_TOPIC):
    flag, path = every[i % len(every)]
    text = ask(BIN, MODEL, q, **{flag: [path]})
    ok = "can't tell" in text.lower() or "cannot tell" in text.lower()
    score["off-topic"][0] += ok; score["off-topic"][1] += 1
    if not ok: bad.append((path, q, text))
for k, (ok, n) in score.items(): print(f"{k}: {ok}/{n}")
print("total", sum(v[0] for v in score.values()), "/", sum(v[1] for v in score.values()))
for b in bad: print("  wrong:", *b)
