"""Packed documents that do not attend to each other (data.attend_across_documents=False, TAPT's default): each
document's outputs equal those of the document alone in its own padded row, and the loader marks the segments."""

import jax
import jax.numpy as jnp
import numpy as np

from dontstop_jax.data import load_tokenizer, special_ids
from dontstop_jax.data.loader import MLMLoader
from dontstop_jax.data.masking import document_segments
from dontstop_jax.data.prepare import prepare_corpus
from dontstop_jax.model import RobertaForMaskedLM, init_params
from dontstop_jax.model.config import tiny_config
from dontstop_jax.model.roberta import position_ids
from dontstop_jax.synthetic.tokenizer import save_tokenizer, train_bpe

BOS, PAD, EOS = 0, 1, 2


def test_document_segments_number_the_documents_of_a_row_and_zero_the_padding():
    row = np.array([[BOS, 7, 8, EOS, 9, EOS, 10, 11, EOS, PAD, PAD]])
    np.testing.assert_array_equal(document_segments(row, EOS, PAD), [[1, 1, 1, 1, 2, 2, 3, 3, 3, 0, 0]])


def test_positions_restart_per_segment_and_a_plain_mask_numbers_like_hugging_face():
    ids = np.array([[BOS, 7, 8, EOS, 9, EOS, PAD]])
    np.testing.assert_array_equal(
        position_ids(jnp.asarray(ids), PAD, jnp.asarray(document_segments(ids, EOS, PAD))), [[2, 3, 4, 5, 2, 3, 1]]
    )
    plain = jnp.asarray((ids != PAD).astype(np.int32))
    np.testing.assert_array_equal(position_ids(jnp.asarray(ids), PAD, plain), position_ids(jnp.asarray(ids), PAD))
    np.testing.assert_array_equal(position_ids(jnp.asarray(ids), PAD), [[2, 3, 4, 5, 6, 7, 1]])


def test_each_packed_document_gets_the_logits_it_gets_alone():
    cfg = tiny_config(vocab_size=64, max_position_embeddings=20)
    model = RobertaForMaskedLM(cfg)
    params = init_params(model, jax.random.PRNGKey(0))
    first, second = [BOS, 7, 8, 9, EOS], [10, 11, EOS]
    packed = np.array([first + second + [PAD] * 2])
    alone = np.array([first + [PAD] * 5, second + [PAD] * 7])
    out = np.asarray(model.apply({"params": params}, packed, document_segments(packed, EOS, PAD)))
    ref = np.asarray(model.apply({"params": params}, alone, (alone != PAD).astype(np.int32)))
    np.testing.assert_allclose(out[0, :5], ref[0, :5], atol=1e-5)
    np.testing.assert_allclose(out[0, 5:8], ref[1, :3], atol=1e-5)
    # Across-document attention (one segment) sees the neighbour: the second document's logits change.
    mixed = np.asarray(model.apply({"params": params}, packed, (packed != PAD).astype(np.int32)))
    assert np.abs(mixed[0, 5:8] - ref[1, :3]).max() > 1e-3


def test_loader_gives_segment_masks_only_when_documents_are_kept_apart(tmp_path):
    corpus = tmp_path / "docs.txt"
    corpus.write_text("".join(f"alpha beta {i} gamma\n" for i in range(40)))
    tok = tmp_path / "tok"
    save_tokenizer(train_bpe([corpus], 300), tok, ["alpha beta"])
    prepared = prepare_corpus([str(corpus)], tok, tmp_path / "cache", max_seq_length=32)
    ids = special_ids(load_tokenizer(tok))

    def batch(apart):
        return MLMLoader(prepared, 4, 0, ids, vocab_size=300, attend_across_documents=not apart, prefetch=0).batch(0, 0)

    joined, apart = batch(False), batch(True)
    np.testing.assert_array_equal(joined["input_ids"], apart["input_ids"])  # same tokens and masks drawn
    assert set(np.unique(joined["attention_mask"])) <= {0, 1}
    assert apart["attention_mask"].max() >= 4  # several documents in each 32-token row
    np.testing.assert_array_equal(apart["attention_mask"] > 0, joined["attention_mask"] > 0)
