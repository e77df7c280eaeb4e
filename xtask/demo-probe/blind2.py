# Probe of the demo model (see examples/demo-model/README.md), written on 2026-12-07
# before phase 7 was measured, and not read for tuning since: the phrasings a new user
# types first ("What color is the shape?", "Describe this image.", "How many beeps do you
# hear?"), on items in styles neither the generator nor blind.py makes: shapes rotated,
# with drop shadows, framed, watermarked, on soft-blob backgrounds, in off-palette shades,
# RGBA with a transparent background; beeps with fades, background hiss, square waves,
# stereo 44.1 kHz; new hand-written documents; two-image questions; an image, a clip and a
# document in one prompt, asked about one of them; off-topic requests beside an item.
# Judged by the words of the answer (common.right / common.honest).
# Usage: python blind2.py [BINARY] [MODEL] [--misses]
import math, os, random, re, sys, wave
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from common import SHAPES, TOPICS, WORDS, score_rows
BIN = sys.argv[1] if len(sys.argv) > 1 else "../../target/bench/release/multitoken"
MODEL = sys.argv[2] if len(sys.argv) > 2 else "../../examples/demo-model"
random.seed(707); np.random.seed(707); os.makedirs("b7", exist_ok=True)

SHADES = {"red": [(200, 40, 60), (230, 60, 50), (170, 0, 20)], "green": [(60, 170, 80), (0, 128, 0), (90, 190, 40)],
          "blue": [(65, 105, 225), (0, 90, 180), (40, 60, 200)], "yellow": [(250, 220, 60), (255, 200, 0), (240, 225, 90)]}
SHAPE_Q = ["What shape do you see?", "Identify the shape, please.", "Circle, square or triangle?",
           "What kind of shape is drawn here?", "Which shape is shown in this picture?", "tell me the shape",
           "What is the shape of the object in the image?", "What shape is that?",
           "Look at this. Which shape is it?", "Is this shape a circle, a square, or a triangle?"]
COLOUR_Q = ["What color is the shape?", "What colour is it?", "Identify the colour, please.",
            "Which color is used for the shape?", "tell me the colour", "What is the color of the object in the image?",
            "What colour is the thing in this picture?", "Red, green, blue or yellow?",
            "Look at this. What colour is that?", "What's the color of the figure?"]
DESC_Q = ["Describe this image.", "What is in this picture?", "What do you see?", "Describe the image in one sentence.",
          "What does this image show?", "Tell me what you see.", "Give a brief description of the picture.",
          "What is this?", "Explain this image.", "What's in the image?"]
COUNT_Q = ["How many beeps are in this audio?", "How many beeps do you hear?", "Count the beeps.",
           "How many sounds are there?", "How many times does it beep?", "What is the number of beeps?"]
PITCH_Q = ["Are the beeps high or low?", "Is the sound high-pitched or low-pitched?", "Is the pitch high or low?",
           "High or low?", "What pitch are the beeps?", "Are these high beeps or low beeps?"]
ADESC_Q = ["Describe this audio.", "What do you hear?", "Describe the sound.", "What is in this audio clip?",
           "What does this recording contain?", "Tell me about the audio."]
TOPIC_Q = ["What is this document about?", "What is the topic of this text?", "Summarize the document in one word.",
           "What's the subject of this document?", "Which topic does this text discuss?", "What is the text about?"]
PAIR_Q = ["Which image has the {x}?", "In which image is the {x}?", "Which of these two images shows a {x}?",
          "Is the {x} in the first or the second image?"]
MIXED_Q = {"shape": "What shape is in the image?", "colour": "What color is the shape in the picture?",
           "count": "How many beeps are in the audio?", "pitch": "Are the beeps in the recording high or low?",
           "topic": "What is the document about?"}
OFF_Q = ["What is the capital of Japan?", "Tell me a joke.", "What time is it in London?",
         "Can you recommend a good book?", "Translate 'thank you' into French.", "Who won the World Cup in 2018?",
         "/help", "What's 12 times 12?", "Write a haiku about the sea.", "What's your favourite movie?",
         "Call my mum.", "Turn off the lights."]

def blobs(w, h):
    im = Image.new("RGB", (w, h), (240, 238, 232)); d = ImageDraw.Draw(im)
    for _ in range(14):
        c = tuple(random.randint(200, 245) for _ in range(3)); r = random.uniform(0.1, 0.35) * min(w, h)
        x, y = random.uniform(0, w), random.uniform(0, h); d.ellipse([x - r, y - r, x + r, y + r], fill=c)
    return im

def outline(shape, cx, cy, s, angle):
    if shape == "square": pts = [(-.85, -.85), (.85, -.85), (.85, .85), (-.85, .85)]
    elif shape == "triangle": pts = [(0, -1), (-.95, .8), (.95, .8)]
    else: return None
    a = math.radians(angle)
    return [(cx + s * (x * math.cos(a) - y * math.sin(a)), cy + s * (x * math.sin(a) + y * math.cos(a))) for x, y in pts]

def shape_image(path, shape, colour, style):
    w, h = random.choice([(256, 256), (300, 200), (200, 300), (800, 600), (120, 480), (480, 120), (64, 64)])
    rgb = random.choice(SHADES[colour]); s = min(w, h) * random.uniform(0.2, 0.4)
    if style == "framed": s *= 0.8
    cx = random.uniform(s * 1.2, w - s * 1.2) if w > 2.4 * s else w / 2; cy = random.uniform(s * 1.2, h - s * 1.2) if h > 2.4 * s else h / 2
    angle = random.uniform(-25, 25) if style == "rotated" else 0
    if style == "alpha": im = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    elif style == "blobs": im = blobs(w, h)
    else: im = Image.new("RGB", (w, h), random.choice([(255, 255, 255), (246, 244, 238), (228, 236, 244)]))
    d = ImageDraw.Draw(im)
    def fig(ox, oy, fill):
        pts = outline(shape, cx + ox, cy + oy, s, angle)
        if pts is None: d.ellipse([cx + ox - s, cy + oy - s, cx + ox + s, cy + oy + s], fill=fill)
        else: d.polygon(pts, fill=fill)
    if style == "shadow": fig(s * 0.15, s * 0.15, (150, 150, 150))
    fig(0, 0, rgb + ((255,) if style == "alpha" else ()))
    if style == "framed":
        t = max(3, min(w, h) // 14); d.rectangle([0, 0, w - 1, h - 1], outline=random.choice([(40, 40, 40), (120, 80, 40), (150, 150, 150)]), width=t)
    if style == "watermark":
        d.text((4, h - 14), random.choice(["sample", "draft", "(c) 2026"]), fill=(150, 150, 150), font=ImageFont.load_default())
    im.save(path)

def beeps(path, count, freq, style):
    rate = 44100 if style == "stereo" else random.choice([16000, 22050, 32000])
    beep = random.uniform(0.1, 0.5); gap = random.uniform(0.2, 1.5); lead = random.uniform(0.2, 1.0)
    n = int((lead + count * beep + (count - 1) * gap + 0.5) * rate); x = np.zeros(n)
    for k in range(count):
        st = int((lead + k * (beep + gap)) * rate); t = np.arange(int(beep * rate)) / rate
        tone = np.sin(2 * np.pi * freq * t)
        if style == "square": tone = np.sign(tone) * 0.6
        if style == "fade": tone *= np.minimum(1, np.minimum(t, t[-1] - t) / (beep / 4))
        x[st:st + len(t)] = 0.5 * tone
    if style == "hiss": x += np.random.normal(0, 0.03, n)
    data = (np.clip(x, -1, 1) * 32767).astype(np.int16)
    channels = 2 if style == "stereo" else 1
    if channels == 2: data = np.stack([data, data], axis=1).reshape(-1)
    with wave.open(path, "wb") as f:
        f.setnchannels(channels); f.setsampwidth(2); f.setframerate(rate); f.writeframes(data.tobytes())

DOCS = {"cooking": ["Recipe: lemon pasta. Boil the pasta in salted water. Meanwhile melt butter in a pan, add lemon zest and a splash of cream, then toss the drained pasta through the sauce and finish with pepper and parmesan.",
                    "My grandmother always said the secret to a good stew is patience. Brown the meat, add the vegetables and stock, cover the pot and let it cook slowly in the oven for three hours."],
        "football": ["Match report. United pressed high from the kick-off and their captain headed in a corner after ten minutes. The referee showed two yellow cards before the break, and a late goal sealed the win.",
                     "Our youth team trains twice a week. The coach works on passing, shooting and defending set pieces, and on Saturday the players travel to the away game at the county stadium."],
        "weather": ["Tomorrow's outlook: fog early, then a cold front brings showers and gusty wind. Temperatures fall to near freezing overnight, with frost likely in rural areas.",
                    "It has been the hottest summer on record. The heatwave dried the rivers, and forecasters say thunderstorms and cooler air will finally arrive next week."],
        "space": ["The probe entered orbit around Jupiter after a five-year journey. Its cameras will map the moons, and scientists hope to learn how the giant planet formed.",
                  "On a clear night you can see the Milky Way, a band of stars across the sky. Through a small telescope the rings of Saturn and the craters of the Moon stand out."],
        "music": ["Setlist notes: open with the acoustic guitar ballad, then bring in the bass and drums for the upbeat chorus. The band closes with the piano solo from the new record.",
                   "She practised scales on the cello every morning. By spring she could play the whole concerto, and the conductor invited her to perform with the symphony."],
        "gardening": ["This weekend: prune the apple tree, mulch the flower beds and sow carrots and lettuce in the vegetable patch. Remember to compost the grass cuttings.",
                      "Our allotment is thriving. The beans climb their canes, the pumpkins are swelling, and the bees visit the lavender along the path every afternoon."]}
assert set(DOCS) == set(TOPICS)

rows = []
styles = ["rotated", "shadow", "framed", "watermark", "blobs", "alpha"]
images = []
for i in range(60):
    shape = random.choice(SHAPES); colour = random.choice(list(SHADES)); style = styles[i % len(styles)]
    p = f"b7/img{i:02d}.png"; shape_image(p, shape, colour, style); images.append((p, shape, colour))
    k = i % 3; q = [SHAPE_Q, COLOUR_Q, DESC_Q][k][(i // 3) % 10]
    rows.append((f"image ({style})", q, {"images": [p]}, [{"shape": [shape]}, {"colour": [colour]}, {"shape": [shape], "colour": [colour]}][k]))
clips = []
astyles = ["fade", "hiss", "square", "stereo"]
for i in range(24):
    count = 1 + i % 4; pitch, f = random.choice([("low", random.uniform(200, 450)), ("high", random.uniform(1000, 2000))])
    p = f"b7/aud{i:02d}.wav"; beeps(p, count, f, astyles[(i // 4) % 4]); clips.append((p, count, pitch))
    k = (i // 2) % 3; qs = [COUNT_Q, PITCH_Q, ADESC_Q][k]; q = qs[i % len(qs)]
    rows.append((f"audio ({astyles[(i // 4) % 4]})", q, {"audios": [p]}, [{"count": [WORDS[count]]}, {"pitch": [pitch]}, {"count": [WORDS[count]], "pitch": [pitch]}][k]))
docs = []
for i, (topic, texts) in enumerate(DOCS.items()):
    for j, text in enumerate(texts):
        p = f"b7/{topic}{j}.txt"; open(p, "w").write(text + "\n"); docs.append((p, topic))
        rows.append(("document", TOPIC_Q[(2 * i + j) % len(TOPIC_Q)], {"documents": [p]}, {"topic": [topic]}))
for i in range(8):
    a, b = random.sample(SHAPES, 2); ca, cb = random.sample(list(SHADES), 2)
    pa, pb = f"b7/pair{i}a.png", f"b7/pair{i}b.png"; shape_image(pa, a, ca, styles[i % 5]); shape_image(pb, b, cb, styles[(i + 2) % 5])
    second = i % 2 == 1; x = b if second else a
    rows.append(("pair", PAIR_Q[i % 4].format(x=x), {"images": [pa, pb]}, {"order": ["second" if second else "first"]}))
for i, asked in enumerate(["shape", "colour", "count", "pitch", "topic"] * 2):
    (pi, shape, colour), (pa, count, pitch), (pd, topic) = images[(i * 5) % 60], clips[(i * 3) % 24], docs[(i * 5) % 12]
    fact = {"shape": [shape], "colour": [colour], "count": [WORDS[count]], "pitch": [pitch], "topic": [topic]}[asked]
    rows.append(("mixed", MIXED_Q[asked], {"images": [pi], "audios": [pa], "documents": [pd]}, {asked: fact}))
items = [r[2] for r in rows if r[0].startswith(("image", "audio"))]
for i, q in enumerate(OFF_Q):
    rows.append(("off-topic", q, items[(i * 7) % len(items)], None))

score_rows(BIN, MODEL, rows, "--misses" in sys.argv)
