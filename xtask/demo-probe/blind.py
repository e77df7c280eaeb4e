# Probe of the demo model (see examples/demo-model/README.md), written on 2026-12-07
# before any of unlike v5's misses were read: Pillow-drawn shapes in styles the
# generator never draws (outlined, JPEG-compressed, noisy, blurred, photo-sized),
# numpy beeps at rates, lengths and gaps of its own (gaps 0.25-0.7 s: the generator's
# are 1.0-1.6 s), hand-written prose documents, two-image questions and off-topic
# requests, all phrased by hand. Judged by the words of the answer, as asks.py does.
# Not blind since phase 4: phase 3's misses on it were read, and the generator then got
# templates of the same kinds (exact copies of these questions were kept out).
# Usage: python blind.py [BINARY] [MODEL] [--misses]
import io, os, random, sys
import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from common import COL, SHAPES, TOPICS, WORDS, background, score_rows, write_beeps
BIN = sys.argv[1] if len(sys.argv) > 1 else "../../target/bench/release/multitoken"
MODEL = sys.argv[2] if len(sys.argv) > 2 else "../../examples/demo-model"
random.seed(606); np.random.seed(606); os.makedirs("b6", exist_ok=True)

SHAPE_Q = ["Which of circle, square or triangle is this?", "What's the shape here?",
           "Could you say what shape has been drawn?", "shape?", "What geometric form is on the canvas?",
           "Tell me what shape the coloured object is.", "Does this show a circle, a square or a triangle?",
           "Quick check: which shape is it?", "What shape did I draw?", "What's the figure's shape?"]
COLOUR_Q = ["Which colour is the object painted in?", "colour?", "What is the colour of the drawn thing?",
            "Tell me its colour.", "What colour did I use?", "Name the hue of the object.",
            "Which colour stands out here?", "What's the fill colour?", "Is it red, green, blue or yellow?",
            "Say the colour of the figure."]
DESC_Q = ["What have we got here?", "Caption this picture.", "Describe what's on the canvas.",
          "What is shown, in a few words?", "Tell me what this image contains.", "What's this a picture of?",
          "Give me a one-line description.", "Describe it briefly.", "What do you make of this image?",
          "Can you describe the drawing?"]
COUNT_Q = ["How many times did it beep?", "Count them.", "How many beeps did you hear?",
           "Number of beeps?", "How many tones play in this recording?", "Tell me the beep count."]
PITCH_Q = ["Is the tone high or low?", "High tones or low tones?", "Are these beeps high-pitched or deep?",
           "How would you describe the pitch, high or low?", "Is this a low sound or a high one?",
           "pitch: high or low?"]
ADESC_Q = ["What's in this audio?", "Describe the recording.", "What can be heard here?",
           "Tell me about this sound file."]
TOPIC_Q = ["What's this document on?", "What is the text about?", "Name the topic.",
           "What subject does this cover?", "Which topic is this writing about?", "In a word, what is it about?"]
OFF_Q = ["What's the tallest building in the world?", "Plan a trip to Rome.", "Can you sing?",
         "How many legs does a spider have?", "Write me a poem about autumn.", "What day is it?",
         "Who are your creators?", "Order a taxi for me.", "Is coffee bad for you?", "Help!",
         "What is the speed of light?", "Remind me to call Sam."]
PAIR_Q = ["Which picture has the {x}, first or second?", "The {x}: is it in image 1 or image 2?",
          "Which of the two shows the {x}?", "Where's the {x}, first image or second?"]

def shape_image(path, shape, colour, style):
    w, h = random.choice([(224, 224), (333, 250), (180, 360), (500, 200), (96, 96), (640, 480)])
    bg = random.choice(["white", "cream", "lightgrey", "paper", "vgrad", "skyblue", 235, 170])
    im = background(w, h, bg); d = ImageDraw.Draw(im)
    rgb = random.choice(COL[colour]); s = min(w, h) * random.uniform(0.22, 0.42)
    cx = random.uniform(s, w - s); cy = random.uniform(s, h - s)
    edge = tuple(max(0, c - 90) for c in rgb) if style == "outlined" else None
    width = max(2, int(s / 8))
    if shape == "circle": d.ellipse([cx - s, cy - s, cx + s, cy + s], fill=rgb, outline=edge, width=width)
    elif shape == "square": d.rectangle([cx - s * .85, cy - s * .85, cx + s * .85, cy + s * .85], fill=rgb, outline=edge, width=width)
    else: d.polygon([(cx, cy - s), (cx - s, cy + s * .8), (cx + s, cy + s * .8)], fill=rgb, outline=edge, width=width)
    if style == "noisy":
        a = np.asarray(im).astype(np.int16) + np.random.randint(-25, 26, (h, w, 3))
        im = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    if style == "blurred": im = im.filter(ImageFilter.GaussianBlur(2))
    if style == "jpeg":
        buf = io.BytesIO(); im.save(buf, "JPEG", quality=30); im = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    im.save(path)

def beeps(path, count, freq):
    rate = random.choice([8000, 16000, 24000, 48000]); beep = random.uniform(0.15, 0.35); gap = random.uniform(0.25, 0.7)
    lead = random.uniform(0.1, 0.6); amp = random.uniform(0.2, 0.8)
    write_beeps(path, count, freq, beep, gap, rate, amp, lead, tail=0.4)

DOCS = {"cooking": "Start by warming the oil in a heavy pan, then soften the onions before the garlic goes in. Season the sauce, let it simmer, and taste it before you serve dinner.",
        "football": "The striker scored twice before half time, and the goalkeeper saved a late penalty. The fans sang all through the match as the team climbed the league table.",
        "weather": "Expect heavy rain in the morning with strong winds from the west. By the afternoon the clouds clear, temperatures rise and the forecast for the weekend is sunny.",
        "space": "The telescope captured light from a distant galaxy. Astronauts on the station watched the rocket launch while the planet turned slowly beneath their orbit.",
        "music": "The orchestra tuned up before the concert. The violin carried the melody, the drums kept the rhythm, and the singer closed the album's final song with a long note.",
        "gardening": "Dig the soil over in spring and plant the seeds in rows. Water the seedlings often, pull the weeds, and the tomatoes and roses will flower by summer."}
assert set(DOCS) == set(TOPICS)

rows = []
styles = ["plain", "outlined", "noisy", "blurred", "jpeg"]
for i in range(60):
    shape = random.choice(SHAPES); colour = random.choice(list(COL)); style = styles[i % 5]
    p = f"b6/img{i:02d}.png"; shape_image(p, shape, colour, style)
    k = i % 3; q = [SHAPE_Q, COLOUR_Q, DESC_Q][k][(i // 3) % 10]
    rows.append(("image", q, {"images": [p]}, [{"shape": [shape]}, {"colour": [colour]}, {"shape": [shape], "colour": [colour]}][k]))
for i in range(24):
    count = 1 + i % 4; pitch, f = random.choice([("low", random.uniform(250, 450)), ("high", random.uniform(1100, 1800))])
    p = f"b6/aud{i:02d}.wav"; beeps(p, count, f)
    k = (i // 4) % 3; qs = [COUNT_Q, PITCH_Q, ADESC_Q][k]; q = qs[i % len(qs)]
    rows.append(("audio", q, {"audios": [p]}, [{"count": [WORDS[count]]}, {"pitch": [pitch]}, {"count": [WORDS[count]], "pitch": [pitch]}][k]))
for i, (topic, text) in enumerate(DOCS.items()):
    p = f"b6/{topic}.txt"; open(p, "w").write(text + "\n")
    for j in range(2):
        rows.append(("document", TOPIC_Q[(2 * i + j) % len(TOPIC_Q)], {"documents": [p]}, {"topic": [topic]}))
for i in range(8):
    a, b = random.sample(SHAPES, 2); ca, cb = random.sample(list(COL), 2)
    pa, pb = f"b6/pair{i}a.png", f"b6/pair{i}b.png"; shape_image(pa, a, ca, "plain"); shape_image(pb, b, cb, "plain")
    second = i % 2 == 1; x = b if second else a
    rows.append(("pair", PAIR_Q[i % 4].format(x=x), {"images": [pa, pb]}, {"order": ["second" if second else "first"]}))
items = [r[2] for r in rows if r[0] in ("image", "audio", "document")]
for i, q in enumerate(OFF_Q):
    rows.append(("off-topic", q, items[(i * 7) % len(items)], None))

score_rows(BIN, MODEL, rows, "--misses" in sys.argv)
