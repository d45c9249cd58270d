"""Batched greedy generation from chat-templated prompts, for any HF causal LM.

Prompts are rendered with the tokenizer's own chat template (the paper evaluates each model
family with its official template), sorted by length so batches carry little padding,
left-padded so every row's last prompt token sits at the same position, and decoded greedily
until each row emits EOS or reaches `max_new_tokens`. The token prefix all prompts share (the
template's system turn) runs once, its KV cache copied into every batch. Outputs come back in
input order.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria

Message = dict[str, str]
Conversation = str | Sequence[Message]


@dataclass
class GenerationConfig:
    """Greedy decoding settings; `system_prompt` is prepended to plain-string prompts."""

    max_new_tokens: int = 64
    batch_size: int = 16
    system_prompt: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[Conversation],
    config: GenerationConfig | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    decided: Callable[[str], bool] | None = None,
) -> list[str]:
    """Greedy completions (special tokens stripped) for `prompts`, in input order.

    A prompt is a user message string or a full message list ({"role", "content"} dicts, e.g.
    a guard model's user + assistant turns). `eos_token_id` defaults to the model's generation
    config, then the tokenizer's EOS. With `decided`, a row stops as soon as `decided(text so
    far)` is true and its output is that text (a batch stops when all its rows have): for a
    judge that reads only a response's opening, the verdicts are those of full responses at a
    fraction of the decoding steps.
    """
    config = config or GenerationConfig()
    _check_padding_safe(model)
    texts = chat_texts(tokenizer, prompts, config.system_prompt)
    encoded = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    pad_id = pad_token_id(tokenizer)
    eos = eos_token_id if eos_token_id is not None else _default_eos(model, tokenizer)
    outputs: list[str] = [""] * len(encoded)
    batches = [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]
    with eval_mode(model):
        shared = SharedPrefix.build(model, encoded)
        for batch in tqdm(batches, desc="generate", disable=not config.progress, leave=False):
            input_ids, attention_mask, cache = shared.batch([encoded[i] for i in batch], pad_id)
            stop = _StopWhenDecided(tokenizer, input_ids.shape[1], eos, decided) if decided else None
            generated = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                past_key_values=cache,
                do_sample=False,
                max_new_tokens=config.max_new_tokens,
                eos_token_id=eos,
                pad_token_id=pad_id,
                stopping_criteria=[stop] if stop else None,
            )
            new_tokens = generated[:, input_ids.shape[1] :].tolist()
            for row, (index, tokens) in enumerate(zip(batch, new_tokens)):
                tokens = _until_eos(tokens, eos)
                if stop is not None and stop.lengths and stop.lengths[row] is not None:
                    tokens = tokens[: stop.lengths[row]]
                outputs[index] = tokenizer.decode(tokens, skip_special_tokens=True)
    return outputs


@dataclass
class SharedPrefix:
    """The token prefix every prompt shares (a chat template's default system turn: half of a
    short prompt's tokens for SmolLM2 or Qwen2.5), run once; each batch starts from a copy of its
    KV cache. A batch is laid out as the prefix, then the rows' own tokens left-padded: the
    attention mask hides the padding between the two and the position ids (from the mask) are
    those of the unpadded prompt, so every row computes what it would alone."""

    ids: list[int]
    cache: Any  # DynamicCache of the prefix, batch 1; None: nothing shared
    device: torch.device

    MIN_TOKENS: ClassVar[int] = 8  # below this, copying the cache costs about what it saves

    @classmethod
    @torch.no_grad()
    def build(cls, model: torch.nn.Module, encoded: Sequence[Sequence[int]]) -> SharedPrefix:
        from transformers import DynamicCache

        device = _device(model)
        # every row keeps at least one token of its own, which generation starts from
        length = min(_common_prefix_length(encoded), min(len(e) for e in encoded) - 1)
        if length < cls.MIN_TOKENS:
            return cls([], None, device)
        ids = list(encoded[0][:length])
        cache = model.get_decoder()(input_ids=torch.tensor([ids], device=device), use_cache=True).past_key_values
        if type(cache) is not DynamicCache:  # sliding-window and hybrid caches: not shared
            return cls([], None, device)
        return cls(ids, cache, device)

    def batch(self, rows: Sequence[Sequence[int]], pad_id: int, *,
              side: str = "left") -> tuple[torch.Tensor, torch.Tensor, Any]:
        """(input_ids, attention_mask, cache or None) of ``rows`` (whole prompts): the prefix,
        then each row's own tokens padded on ``side``; the cache holds the prefix's keys and values."""
        if self.cache is None:
            return (*pad_batch(rows, pad_id, self.device, side=side), None)
        own, mask = pad_batch([row[len(self.ids) :] for row in rows], pad_id, self.device, side=side)
        prefix = torch.tensor([self.ids], device=self.device).expand(len(rows), -1)
        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(len(rows))
        return torch.cat([prefix, own], dim=1), torch.cat([torch.ones_like(prefix), mask], dim=1), cache


def _common_prefix_length(encoded: Sequence[Sequence[int]]) -> int:
    first, length = encoded[0], min(len(e) for e in encoded)
    for e in encoded[1:]:
        length = next((i for i in range(length) if e[i] != first[i]), length)
    return length


class _StopWhenDecided(StoppingCriteria):
    """A per-row stopping criterion for ``model.generate``: a row is done once ``decided`` holds
    for its decoded text; ``lengths[row]`` keeps how many new tokens it had then."""

    def __init__(self, tokenizer, prompt_width: int, eos: int | Sequence[int], decided: Callable[[str], bool]) -> None:
        self.tokenizer, self.width, self.eos, self.decided = tokenizer, prompt_width, eos, decided
        self.lengths: list[int | None] = []

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        rows = input_ids[:, self.width :].tolist()
        if not self.lengths:
            self.lengths = [None] * len(rows)
        for row, tokens in enumerate(rows):
            if self.lengths[row] is None:
                text = self.tokenizer.decode(_until_eos(tokens, self.eos), skip_special_tokens=True)
                if self.decided(text):
                    self.lengths[row] = len(tokens)
        return torch.tensor([length is not None for length in self.lengths], device=input_ids.device)


def chat_texts(tokenizer, prompts: Sequence[Conversation], system_prompt: str | None = None) -> list[str]:
    """Render prompts with the tokenizer's chat template, ending where the assistant begins."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} has no chat template; set tokenizer.chat_template "
            f"(a Jinja string) before evaluating"
        )
    texts = []
    for prompt in prompts:
        if isinstance(prompt, str):
            messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
            messages.append({"role": "user", "content": prompt})
            generation_prompt = True
        else:
            messages = list(prompt)
            generation_prompt = messages[-1]["role"] != "assistant"
        texts.append(tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False))
    return texts


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device, *,
              side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """Stack token lists into (input_ids, attention_mask), padded on ``side``.

    Left padding puts every row's last token at the same position, which generation needs;
    right padding keeps every real token at its unpadded position, which scoring a prompt's
    last token against its unbatched forward needs.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, tokens in enumerate(sequences):
        if tokens:
            span = slice(width - len(tokens), width) if side == "left" else slice(0, len(tokens))
            input_ids[row, span] = torch.tensor(tokens)
            attention_mask[row, span] = 1
    return input_ids.to(device), attention_mask.to(device)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Run the block with ``model`` in eval mode, then give it back its train/eval state
    (callers such as the refusal tracker evaluate in the middle of training)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, falling back to EOS (padding is always masked out)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token")
    return pad


def _check_padding_safe(model: torch.nn.Module) -> None:
    # HF's eager attention takes its softmax in float32: in a float64 model the float64
    # mask minimum overflows to -inf there, and left-padded rows come out NaN.
    attention = getattr(model.config, "_attn_implementation", None)
    if attention == "eager" and next(model.parameters()).dtype == torch.float64:
        raise ValueError("batched generation with a float64 model needs attn_implementation='sdpa' "
                         "(eager attention turns left-padded rows to NaN in float64)")


def _default_eos(model, tokenizer) -> int | list[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = eos if eos is not None else tokenizer.eos_token_id
    if eos is None:
        raise ValueError("neither the model's generation config nor the tokenizer defines an EOS token")
    return eos


def _until_eos(tokens: list[int], eos: int | Sequence[int]) -> list[int]:
    stops = {eos} if isinstance(eos, int) else set(eos)
    for position, token in enumerate(tokens):
        if token in stops:
            return tokens[:position]
    return tokens


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device
