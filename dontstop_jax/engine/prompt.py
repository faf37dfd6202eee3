"""Prompt-based (cloze) fine-tuning: the task as a fill-in-the-blank, the labels as words (PET: Schick and
Schuetze 2021; LM-BFF: Gao et al. 2021).

A text becomes the template's sequence, e.g. "{text} It was <mask> ." (LM-BFF's sentiment pattern), and each
label a word or a list of words (the verbalizer, e.g. {"positive": "great", "negative": "terrible"}). The class
logits are the pretrained MLM head's logits at the mask position, read at the verbalizer's tokens: no head is
learned from scratch, so the model starts from exactly what (DAPT/TAPT) pretraining trained. A word of several
tokens scores the mean of its tokens' logits (one mask, PET's simplest treatment); a label of several words the
mean of its words' scores. Logits rather than log-probabilities: both give the same class softmax, since the
log-partition is the same for every label at one position.

Whitespace before a slot belongs to the slot, as a byte-level BPE attaches it to the next word ("Ġgreat"): in
" It was <mask>" the label words are encoded with a leading space. The text is truncated, never the template.

Optional demonstrations (LM-BFF): after the query, one train example per class, each the template filled with
its text and its label's (first) word; drawn per example from the train split (never the example itself),
from rng([seed, index]), so a run and its resume see the same sequences.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict
from transformers import PreTrainedTokenizerFast

from dontstop_jax.data.tasks import tokenize_split
from dontstop_jax.data.tokenizer import encode_plain, special_ids
from dontstop_jax.errors import UserError
from dontstop_jax.fields import FINETUNE, build, check_template, registry
from dontstop_jax.fields import HEADS as HEAD_NAMES
from dontstop_jax.fields import PROMPT_MASK as MASK
from dontstop_jax.fields import PROMPT_TEXT as TEXT
from dontstop_jax.model import ModelConfig, RobertaForSequenceClassification, RobertaModel
from dontstop_jax.model.roberta import LMHead


def default_prompt_config() -> ConfigDict:
    """LM-BFF's template for single sentences; the verbalizer ({label: word or [words]}) is the task's to give;
    demonstrations off (LM-BFF's "prompt-based FT" without them is its main row)."""
    return build(FINETUNE["prompt"])


@dataclasses.dataclass(frozen=True)
class Head:
    """What fine-tuning needs of its head: the model (params -> class logits), how texts become token ids, the
    head name checkpoints record (export writes that Hugging Face head) and anything else to record."""

    model: nn.Module
    encode: Callable[[Sequence[str]], list[np.ndarray]]
    kind: str
    provenance: dict[str, Any]


def build_head(
    cfg: ConfigDict,
    config: ModelConfig,
    params: Any,
    tokenizer: PreTrainedTokenizerFast,
    label_names: list[str],
    max_len: int,
    train: tuple[list[str], np.ndarray],
) -> Head:
    """The fine-tuning phase's head (`cfg.head`, one of `HEADS`) for `config` with the weights `params`, its
    texts truncated to `max_len` tokens (`train`: the train split, for a prompt's demonstrations)."""
    return HEADS[cfg.head].build(cfg, config, params, tokenizer, label_names, max_len, train)


def _classifier(
    cfg: ConfigDict,
    config: ModelConfig,
    params: Any,
    tokenizer: PreTrainedTokenizerFast,
    label_names: list[str],
    max_len: int,
    train: tuple[list[str], np.ndarray],
) -> Head:
    """A new classifier on `<s>`."""
    return Head(
        RobertaForSequenceClassification(config, len(label_names)),
        lambda texts: tokenize_split(texts, tokenizer, max_len),
        "classification",
        {},
    )


def _prompt(
    cfg: ConfigDict,
    config: ModelConfig,
    params: Any,
    tokenizer: PreTrainedTokenizerFast,
    label_names: list[str],
    max_len: int,
    train: tuple[list[str], np.ndarray],
) -> Head:
    """The prompt over the (pretrained) MLM head of `params`."""
    if params is None or "lm_head" not in params:
        raise UserError(
            f"head=prompt reads the pretrained MLM head, and init={cfg.init!r} has none; start from a "
            "masked LM (a pretraining phase or a Hugging Face RobertaForMaskedLM directory)"
        )
    prompt = Prompt.from_config(cfg.prompt, tokenizer, label_names)
    demos = train if cfg.prompt.demonstrations else None
    return Head(
        prompt.model(config),
        lambda texts: prompt.encode(texts, max_len, demos, cfg.seed),
        "mlm",
        {
            "prompt": {
                "template": cfg.prompt.template,
                "verbalizer": prompt.words,
                "demonstrations": cfg.prompt.demonstrations,
            }
        },
    )


@dataclasses.dataclass(frozen=True)
class HeadKind:
    """A fine-tuning head (`finetune.head`): `build` makes its `Head` (build_head's arguments); `classifier`: it
    is a new classification head, beside which multi-task fine-tuning keeps the MLM head."""

    build: Callable[..., Head]
    classifier: bool


HEADS: dict[str, HeadKind] = registry(
    HEAD_NAMES, {"classifier": HeadKind(_classifier, classifier=True), "prompt": HeadKind(_prompt, classifier=False)}
)


def _segments(template: str) -> list[tuple[str, bool]]:
    """The template as (piece, spaced) segments: literal text, TEXT or MASK; `spaced` when a space precedes a slot
    (taken off the literal before it and given to the slot's first word)."""
    parts = [p for p in re.split(r"(\{text\}|<mask>)", template) if p]
    out: list[tuple[str, bool]] = []
    for part in parts:
        spaced = part in (TEXT, MASK) and bool(out) and out[-1][0] not in (TEXT, MASK) and out[-1][0].endswith(" ")
        if spaced:
            literal = out.pop()[0][:-1]
            out += [(literal, False)] if literal else []
        out.append((part, spaced))
    return out


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A template and verbalizer resolved against a tokenizer."""

    segments: tuple[tuple[str, bool], ...]
    literals: dict[str, list[int]]  # literal piece -> its token ids
    words: dict[str, list[str]]  # label -> its words, in label order
    label_ids: np.ndarray  # [labels, width] token ids of each label's words' tokens (0 where padding)
    label_weights: np.ndarray  # [labels, width]: each row's weights sum to 1 (the mean over words of token means)
    first_word_ids: list[list[int]]  # [label]: its first word's tokens (what a demonstration fills the mask with)
    ids: dict[str, int]  # special ids
    tokenizer: PreTrainedTokenizerFast

    @classmethod
    def from_config(cls, prompt: ConfigDict, tokenizer: PreTrainedTokenizerFast, label_names: list[str]) -> Prompt:
        if not check_template(prompt.template):
            raise UserError(
                f"prompt.template={prompt.template!r} needs exactly one {TEXT} and one {MASK}, e.g. "
                "'{text} It was <mask> .'"
            )
        verbalizer = dict(prompt.verbalizer)
        if missing := [n for n in label_names if n not in verbalizer]:
            raise UserError(
                f"prompt.verbalizer has no word for label(s) {missing}; give every label of the task "
                f"({label_names}) a word or a list of words, e.g. {{{label_names[0]!r}: 'great'}}"
            )
        if unknown := sorted(set(verbalizer) - set(label_names)):
            raise UserError(
                f"prompt.verbalizer names {unknown}, which are not labels of the task; its labels: {label_names}"
            )
        words = {n: [verbalizer[n]] if isinstance(verbalizer[n], str) else list(verbalizer[n]) for n in label_names}
        if bad := [n for n, ws in words.items() if not ws or not all(isinstance(w, str) and w.strip() for w in ws)]:
            raise UserError(f"prompt.verbalizer's entry for {bad[0]!r} must be a word or a non-empty list of words")
        segments = _segments(prompt.template)
        spaced_mask = next(spaced for piece, spaced in segments if piece == MASK)
        encoded = {
            n: [encode_plain(tokenizer, [(" " if spaced_mask else "") + w.strip()])[0] for w in ws]
            for n, ws in words.items()
        }
        width = max(sum(len(t) for t in tokens) for tokens in encoded.values())
        label_ids, label_weights = np.zeros((len(words), width), np.int32), np.zeros((len(words), width), np.float32)
        for row, tokens in enumerate(encoded.values()):
            flat = [(t, 1.0 / (len(tokens) * len(word))) for word in tokens for t in word]
            label_ids[row, : len(flat)] = [t for t, _ in flat]
            label_weights[row, : len(flat)] = [w for _, w in flat]
        literals = {p: encode_plain(tokenizer, [p])[0] for p, _ in segments if p not in (TEXT, MASK)}
        return cls(
            tuple(segments),
            literals,
            words,
            label_ids,
            label_weights,
            [tokens[0] for tokens in encoded.values()],
            special_ids(tokenizer),
            tokenizer,
        )

    def model(self, config: ModelConfig) -> PromptClassifier:
        return PromptClassifier(
            config,
            self.ids["mask"],
            tuple(map(tuple, self.label_ids.tolist())),
            tuple(map(tuple, self.label_weights.tolist())),
        )

    def _fill(self, text: list[int], mask: list[int]) -> list[int]:
        """The template's tokens with `text`'s at the text slot and `mask` at the mask slot."""
        out: list[int] = []
        for piece, _ in self.segments:
            out += text if piece == TEXT else mask if piece == MASK else self.literals[piece]
        return out

    def _text_tokens(self, texts: Sequence[str]) -> list[list[int]]:
        spaced = next(spaced for piece, spaced in self.segments if piece == TEXT)
        tokens = encode_plain(self.tokenizer, [(" " if spaced else "") + t for t in texts])
        if any(self.ids["mask"] in t for t in tokens):
            raise UserError(
                f"a task text contains the mask token {MASK}, which the prompt's classifier reads as "
                "its blank; remove it from the texts"
            )
        return tokens

    def encode(
        self,
        texts: Sequence[str],
        max_len: int,
        demonstrations: tuple[list[str], np.ndarray] | None = None,
        seed: int = 0,
    ) -> list[np.ndarray]:
        """int32 `<s> template(text) [demonstrations] </s>` per text; the texts (query and demonstrations
        alike) share what the template leaves of `max_len` and are cut to their share."""
        tokens = self._text_tokens(texts)
        fixed = len(self._fill([], [self.ids["mask"]]))
        demos = self._demonstrations(texts, demonstrations, seed) if demonstrations is not None else None
        parts = 1 + (len(self.first_word_ids) if demos is not None else 0)
        share = (max_len - 2 - parts * fixed) // parts  # (a demonstration's label word may take a token more)
        if share < 1:
            raise UserError(
                f"prompt.template leaves no room for the text in data.max_seq_length={max_len}; "
                "shorten the template, turn demonstrations off or raise max_seq_length"
            )
        out = []
        for i, text in enumerate(tokens):
            seq = self._fill(text[:share], [self.ids["mask"]])
            for label, demo in enumerate(demos[i] if demos is not None else []):
                seq += self._fill(demo[:share], self.first_word_ids[label])
            out.append(np.array([self.ids["bos"], *seq[: max_len - 2], self.ids["eos"]], np.int32))
        return out

    def _demonstrations(
        self, texts: Sequence[str], train: tuple[list[str], np.ndarray], seed: int
    ) -> list[list[list[int]]]:
        """Per text, one train example's tokens per class (not the text itself when it is a train example)."""
        train_texts, labels = train
        tokens = self._text_tokens(train_texts)
        pools = [np.flatnonzero(labels == c) for c in range(len(self.first_word_ids))]
        out = []
        for i, text in enumerate(texts):
            rng = np.random.default_rng([seed, i])
            picks = []
            for pool in pools:
                choices = [j for j in pool if train_texts[j] != text] or list(pool)
                picks.append(tokens[choices[rng.integers(len(choices))]] if choices else [])
            out.append(picks)
        return out


class PromptClassifier(nn.Module):
    """The masked LM (RobertaForMaskedLM's parameter tree: `roberta`, `lm_head`) as a classifier: class logits
    [batch, labels] = the LM head's logits at each row's (first) mask token, averaged over each label's verbalizer
    tokens with `label_weights`. Same call as RobertaForSequenceClassification, so losses, regularizers,
    prediction and early stopping treat both heads alike."""

    config: ModelConfig
    mask_id: int
    label_ids: tuple[tuple[int, ...], ...]
    label_weights: tuple[tuple[float, ...], ...]

    def setup(self):
        self.roberta = RobertaModel(self.config)
        self.lm_head = LMHead(self.config)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        *,
        deterministic: bool = True,
        gates: Any = None,
        embedding_noise: jax.Array | None = None,
    ) -> jax.Array:
        h = self.roberta(
            input_ids, attention_mask, deterministic=deterministic, gates=gates, embedding_noise=embedding_noise
        )
        position = jnp.argmax(input_ids == self.mask_id, axis=1)
        h = jnp.take_along_axis(h, position[:, None, None], axis=1)[:, 0]
        logits = self.lm_head(h, self.roberta.embeddings.word_embeddings.embedding)  # [batch, vocab], float32
        return jnp.sum(logits[:, jnp.asarray(self.label_ids)] * jnp.asarray(self.label_weights), axis=-1)
