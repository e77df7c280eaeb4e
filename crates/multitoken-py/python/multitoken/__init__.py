"""multitoken: multimodal language models (images, audio, documents spliced into a
decoder LM's token stream) on the multitoken Rust engine.

    import multitoken
    model = multitoken.Model.load("examples/demo-model")   # or a hub id "org/name[@rev]"
    out = model.generate("What colour is the shape?", images=["examples/shapes/red-circle.png"])
    print(out.text)

Every model call releases the GIL; errors are `multitoken.Error` (with
`InputError` also a `ValueError`, `NotFoundError` also a `FileNotFoundError`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

from . import _multitoken
from ._errors import Error, InputError, NotFoundError
from ._items import collect as _collect

__all__ = [
    "Error",
    "Generation",
    "InputError",
    "Model",
    "NotFoundError",
    "TextStream",
    "embed",
    "log_mel",
    "transcribe",
    "train",
]
__version__: str = _multitoken.__version__

PathLike = Union[str, "os.PathLike[str]"]
Message = Dict[str, str]

# The CLI's defaults (`multitoken generate --help`), so that a call with none
# given samples exactly as the command line does.
_DEFAULT_SEED = 299_792_458


@dataclass(frozen=True)
class Generation:
    """One completion: the new text, its token ids (an ending EOS included), the
    prompt's length in positions, why it ended (`stop` or `length`) and speeds."""

    text: str
    token_ids: List[int]
    prompt_tokens: int
    finish_reason: str
    timings: Dict[str, float]

    @staticmethod
    def _from(result: Dict[str, Any]) -> "Generation":
        return Generation(
            text=result["text"],
            token_ids=list(result["token_ids"]),
            prompt_tokens=int(result["prompt_tokens"]),
            finish_reason=result["finish_reason"],
            timings=dict(result["timings"]),
        )


class TextStream:
    """An iterator of text pieces as they are generated; `result` is the whole
    `Generation` once the iterator is exhausted. `close()` (or dropping it) stops
    the generation at its next token."""

    def __init__(self, native: Any) -> None:
        self._native = native

    def __iter__(self) -> "TextStream":
        return self

    def __next__(self) -> str:
        return self._native.__next__()

    def close(self) -> None:
        self._native.close()

    @property
    def result(self) -> Optional[Generation]:
        result = self._native.result
        return None if result is None else Generation._from(result)


def _sampling(
    max_new_tokens: int,
    temperature: float,
    top_p: Optional[float],
    top_k: Optional[int],
    repetition_penalty: Optional[float],
    seed: int,
    stop: Optional[Sequence[str]],
    ignore_eos: bool,
) -> Dict[str, Any]:
    if isinstance(stop, str):
        stop = [stop]
    return {
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "repetition_penalty": repetition_penalty,
        "seed": seed,
        "stop": list(stop or []),
        "ignore_eos": ignore_eos,
    }


class Model:
    """A loaded model: an HF directory, a `.gguf` file, a multitoken multimodal
    directory (`multitoken.json`), or a hub id `org/name[@revision][:QUANT]` (QUANT picks a GGUF repository's file)."""

    def __init__(self, native: Any) -> None:
        self._native = native

    @staticmethod
    def load(
        path_or_hub_id: PathLike,
        dtype: str = "f32",
        device: str = "cpu",
        quantize: Optional[str] = None,
        chat_template: Optional[str] = None,
        quantize_towers: Optional[str] = None,
    ) -> "Model":
        """Loads a model as `multitoken generate --model` does. A hub id comes from
        the Hugging Face cache (HF_HUB_CACHE / HF_HOME), else is downloaded from
        HF_ENDPOINT with HF_TOKEN unless HF_HUB_OFFLINE=1. `dtype`: f32, f16 or bf16;
        `quantize`: q8_0, q4_1 or q4_k for an HF directory's linears; `chat_template`:
        a built-in name or a jinja file; `quantize_towers`: q8_0 or q4_1 for the
        modality towers' linears (vision, audio, document encoders)."""
        return Model(
            _multitoken.Model.load(
                os.fspath(path_or_hub_id), dtype, device, quantize, chat_template, quantize_towers
            )
        )

    @property
    def name(self) -> str:
        """The model's name."""
        return self._native.name

    @property
    def modality_tokens(self) -> List[str]:
        """The modality tokens the model reads (`<image>`, `<speech>`, ...)."""
        return list(self._native.modality_tokens)

    def __repr__(self) -> str:
        return repr(self._native)

    def generate(
        self,
        prompt: Union[str, Sequence[Message]],
        images: Optional[Sequence[Any]] = None,
        audios: Optional[Sequence[Any]] = None,
        documents: Optional[Sequence[Any]] = None,
        *,
        items: Optional[Dict[str, Sequence[Any]]] = None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: Optional[float] = None,
        top_k: Optional[int] = None,
        repetition_penalty: Optional[float] = None,
        seed: int = _DEFAULT_SEED,
        stop: Optional[Sequence[str]] = None,
        ignore_eos: bool = False,
        raw: bool = False,
        stream: bool = False,
    ) -> Any:
        """One completion of `prompt` (the user's message, or a list of
        `{"role", "content"}` messages ending with the user's). Items are paths,
        bytes, PIL images or numpy arrays (HxWxC uint8 images; `(float32 mono array,
        sample_rate)` audio); the k-th item fills the k-th modality token, and
        items whose token the prompt lacks go before the text, as in the CLI.
        `raw=True` tokenizes a str prompt as it is (no chat template). Returns a
        `Generation`, or with `stream=True` a `TextStream` of text pieces."""
        given = _collect(images, audios, documents, items)
        sampling = _sampling(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, stop, ignore_eos)
        messages: Any = prompt if isinstance(prompt, str) else [dict(m) for m in prompt]
        if stream:
            return TextStream(self._native.generate_stream(messages, given, sampling, raw))
        return Generation._from(self._native.generate(messages, given, sampling, raw))

    def chat(
        self,
        message: str,
        images: Optional[Sequence[Any]] = None,
        audios: Optional[Sequence[Any]] = None,
        documents: Optional[Sequence[Any]] = None,
        *,
        items: Optional[Dict[str, Sequence[Any]]] = None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: Optional[float] = None,
        top_k: Optional[int] = None,
        repetition_penalty: Optional[float] = None,
        seed: int = _DEFAULT_SEED,
        stop: Optional[Sequence[str]] = None,
        ignore_eos: bool = False,
        stream: bool = False,
    ) -> Any:
        """One turn of a conversation the model keeps (`history`, `reset_chat`), as
        `multitoken chat` holds it: the message and its items join the history, then
        the answer does; a turn that fails leaves the history as it was. Special
        tokens typed in `message` stay text."""
        given = _collect(images, audios, documents, items)
        sampling = _sampling(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, stop, ignore_eos)
        if stream:
            return TextStream(self._native.chat_stream(message, given, sampling))
        return Generation._from(self._native.chat(message, given, sampling))

    def reset_chat(self, system: Optional[str] = None) -> None:
        """Forgets the conversation; `system` opens the next one."""
        self._native.reset_chat(system)

    @property
    def history(self) -> List[Message]:
        """The conversation so far as `{"role", "content"}` dicts."""
        return list(self._native.history)


def embed(inputs: Sequence[Union[str, "os.PathLike[str]", bytes]], model: Optional[PathLike] = None) -> Any:
    """Sentence embeddings, a float32 numpy array `[n, dim]`: a `str` is text, a
    `pathlib.Path` (or other os.PathLike) or `bytes` is a document (pdf, txt, md).
    `model`: a sentence-transformers directory or hub id [default: all-MiniLM-L6-v2
    from `cargo xtask weights`]."""
    if isinstance(inputs, (str, bytes)):
        inputs = [inputs]
    return _multitoken.embed(list(inputs), None if model is None else os.fspath(model))


def log_mel(audio: Any, sample_rate: Optional[int] = None, n_mels: int = 80) -> Any:
    """Whisper's log-mel windows, a float32 array `[windows, n_mels, 3000]`, of an
    audio file (path or bytes) or a float mono array at `sample_rate` Hz."""
    if sample_rate is not None:
        audio = (audio, sample_rate)
    return _multitoken.log_mel(audio, n_mels)


def transcribe(audio: Any, sample_rate: Optional[int] = None, model: Optional[PathLike] = None) -> str:
    """The transcript of an audio file (path or bytes) or a float mono array at
    `sample_rate` Hz, by Whisper as `multitoken transcribe` does it. `model`: an HF
    Whisper directory or hub id [default: whisper-base from `cargo xtask weights`]."""
    if sample_rate is not None:
        audio = (audio, sample_rate)
    return _multitoken.transcribe(audio, None if model is None else os.fspath(model))


def train(config: Union[Dict[str, Any], PathLike], progress: Optional[Callable[[Dict[str, Any]], None]] = None) -> Dict[str, Any]:
    """Trains as `multitoken train` does: `config` is a dict of its options (the TOML
    file's snake_case keys: model, dataset, output_dir, stage, max_steps, ...) or a
    TOML file. `progress` is called with each `metrics.jsonl` row (step, loss,
    learning rate, ...) as training writes it. Returns `{"steps", "output_dir",
    "final_loss"}`. The GIL is released while training runs. Ctrl-C (or an exception
    raised by `progress`) stops training after the step it is in and writes that
    step's checkpoint; the exception is raised with the trainer's word on where it
    stopped as its `__cause__`, and `resume="latest"` continues the run exactly."""
    if isinstance(config, dict):
        return _multitoken.train(json.dumps(config, default=os.fspath), None, progress)
    return _multitoken.train(None, os.fspath(config), progress)
