"""A RoBERTa-style byte-level BPE tokenizer trained offline on the synthetic corpora.

Small (a few thousand entries) so the tiny model's embedding table is cheap, yet large enough
that every pseudo-word is one or two tokens, as real words mostly are for RoBERTa.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
    trainers,
)

from dontstop_jax import files
from dontstop_jax.errors import UserError

SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")  # ids 0..4, as in RoBERTa


def train_bpe(files: Sequence[Path], vocab_size: int) -> Tokenizer:
    """Byte-level BPE exactly as RoBERTa's: no prefix space, `<s> ... </s>` around each text."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(f) for f in files], trainer)
    # RoBERTa's <mask> swallows the space before it, so "a <mask>" masks the word " b" as a whole.
    tok.add_special_tokens([AddedToken("<mask>", lstrip=True, rstrip=False, normalized=False, special=True)])
    tok.post_processor = processors.RobertaProcessing(
        ("</s>", SPECIAL_TOKENS.index("</s>")),
        ("<s>", SPECIAL_TOKENS.index("<s>")),
        trim_offsets=True,
        add_prefix_space=False,
    )
    for i, t in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(t) != i:
            raise RuntimeError(f"tokenizer: special token {t} got id {tok.token_to_id(t)}, expected {i}")
    return tok


def wrap(tok: Tokenizer):
    """The transformers wrapper; `tokenizer_object=` because file arguments are ignored in v5."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        sep_token="</s>",
        cls_token="<s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
        model_max_length=512,
    )


def save_tokenizer(tok: Tokenizer, out_dir: Path, probe_texts: Iterable[str]) -> None:
    """Save with `save_pretrained` into a scratch dir, check it reloads identically, then move it in.

    The reload check uses the fast class directly: `AutoTokenizer` gives the same class here
    (tests check that) but its import drags in torch when installed, seconds for nothing.
    """
    from transformers import PreTrainedTokenizerFast

    fast = wrap(tok)
    with files.publishing(out_dir) as scratch:  # private to this process: hosts sharing a disk all write it
        fast.save_pretrained(str(scratch))
        reloaded = PreTrainedTokenizerFast.from_pretrained(str(scratch))
        for text in probe_texts:
            a, b = fast(text)["input_ids"], reloaded(text)["input_ids"]
            if a != b:
                raise UserError(f"tokenizer: reload encodes {text[:40]!r} differently ({a[:8]} vs {b[:8]})")
        if reloaded.mask_token_id != SPECIAL_TOKENS.index("<mask>") or reloaded.pad_token_id != 1:
            raise UserError("tokenizer: reloaded special token ids differ from RoBERTa's 0..4 layout")


def word_pieces(tok: Tokenizer, words: Sequence[str]) -> list[int]:
    """How many tokens each word takes mid-sentence (with its leading space)."""
    enc = tok.encode_batch([" " + w for w in words], add_special_tokens=False)
    return [len(e.ids) for e in enc]
