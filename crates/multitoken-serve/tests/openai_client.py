"""Talks to a multitoken server with the official `openai` client (run by openai_client.rs).

Usage: python openai_client.py BASE_URL IMAGE_PATH
Prints one JSON line with what the client saw.
"""
import base64
import json
import sys

import openai

base_url, image_path = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base_url, api_key="unused")
models = [m.id for m in client.models.list()]

with open(image_path, "rb") as f:
    image = "data:image/png;base64," + base64.b64encode(f.read()).decode()
messages = [{"role": "user", "content": [
    {"type": "image_url", "image_url": {"url": image}},
    {"type": "text", "text": "What is in the picture?"},
]}]
plain = client.chat.completions.create(model=models[0], messages=messages, max_tokens=8, seed=1)
stream = client.chat.completions.create(
    model=models[0], messages=messages, max_tokens=8, seed=1, stream=True,
    stream_options={"include_usage": True},
)
pieces, finish, usage = [], None, None
for chunk in stream:
    if chunk.choices:
        if chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        finish = chunk.choices[0].finish_reason or finish
    if chunk.usage:
        usage = chunk.usage.total_tokens
try:
    client.chat.completions.create(model=models[0], messages=[{"role": "user", "content": 5}])
    error = None
except openai.BadRequestError as e:
    error = e.status_code, str(e)
print(json.dumps({
    "models": models,
    "plain": plain.choices[0].message.content,
    "plain_usage": plain.usage.total_tokens,
    "plain_finish": plain.choices[0].finish_reason,
    "streamed": "".join(pieces),
    "stream_finish": finish,
    "stream_usage": usage,
    "error": error,
}))
