"""Masked-LM batches over a prepared corpus: deterministic, resumable by step, host-count independent.

Why not grain or tf.data: the prepared corpus is a memory-mapped array of equal-length blocks,
so a batch is a pure function of (seed, epoch, batch index). That gives O(1) exact resume from a
step counter and lets each host read just its rows of the global batch without worker processes
or iterator checkpoints.

Epoch e visits blocks in `default_rng([seed, e]).permutation(num_blocks)`; global batch b is the
b-th slice of G blocks, and host p of n takes rows [p*G/n, (p+1)*G/n). A block's mask is drawn with the
counter-based key `row_keys(seed, e, block_id)` (data/masking.py), so it does not depend on the host count or
batch neighbours, and every epoch masks afresh.
"""

from __future__ import annotations

import functools
import queue
import threading
import weakref
from collections.abc import Mapping
from typing import Any

import numpy as np

from dontstop_jax.data.masking import SPAN_COIN, document_segments, mask_tokens, row_keys, uniforms
from dontstop_jax.data.prepare import PreparedCorpus
from dontstop_jax.data.spans import SpanMasker
from dontstop_jax.errors import UserError

Batch = dict[str, np.ndarray]


class MLMLoader:
    """Infinite iterator of host-local MLM batches (keys as in `mask_tokens`), epoch after epoch.

    With drop_remainder=False the last batch of an epoch is filled with `<s> </s>` rows, which get
    no predictions (mlm_weights 0), so shapes stay static. `prefetch` batches are built ahead in a
    background thread; `get_state` always describes what has been yielded. attend_across_documents=False
    gives `document_segments` as the attention mask, so the documents packed into a row do not see each other.
    `span_masker` makes the occurrences of its terms masking units (data/spans.py); each row's span coins are
    its own stream of the row's key.
    """

    def __init__(
        self,
        corpus: PreparedCorpus,
        global_batch_size: int,
        seed: int,
        special_ids: Mapping[str, int],
        vocab_size: int,
        mask_prob: float = 0.15,
        max_predictions: int | None = None,
        whole_word: bool = False,
        word_starts_table: np.ndarray | None = None,
        attend_across_documents: bool = True,
        span_masker: SpanMasker | None = None,
        process_index: int = 0,
        process_count: int = 1,
        drop_remainder: bool = True,
        prefetch: int = 2,
    ) -> None:
        if global_batch_size < 1 or global_batch_size % process_count:
            raise UserError(
                f"global batch size {global_batch_size} must be a positive multiple of the process count "
                f"{process_count}"
            )
        if not 0 <= process_index < process_count:
            raise UserError(f"process_index {process_index} not in [0, {process_count})")
        if not isinstance(seed, int) or seed < 0:
            raise UserError(f"seed must be a non-negative integer, got {seed!r}")
        if whole_word and word_starts_table is None:
            raise UserError("whole_word masking needs word_starts_table; build it with word_start_table(tokenizer)")
        self.corpus = corpus
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.local_batch_size = global_batch_size // process_count
        self.local_rows = slice(process_index * self.local_batch_size, (process_index + 1) * self.local_batch_size)
        self.prefetch = prefetch
        self._mask = functools.partial(
            mask_tokens,
            special_ids=special_ids,
            vocab_size=vocab_size,
            mask_prob=mask_prob,
            max_predictions=max_predictions,
        )
        self._special_ids = dict(special_ids)
        self._word_starts = word_starts_table if whole_word else None
        self._documents_apart = not attend_across_documents
        self._spans = span_masker
        n, g = corpus.num_blocks, global_batch_size
        self.steps_per_epoch = n // g if drop_remainder else -(-n // g)
        if self.steps_per_epoch == 0:
            raise UserError(
                f"corpus has {n} blocks, fewer than the global batch size {g}; lower the batch size or add data"
            )
        self._position = (0, 0)  # (epoch, batch_in_epoch) of the next batch to yield
        self._pending: _Prefetcher | None = None
        self._order: tuple[int, np.ndarray] = (-1, np.zeros(0, np.int64))  # (epoch, its block order)

    def batch(self, epoch: int, index: int) -> Batch:
        """This host's share of global batch `index` of `epoch` (random access, no state change)."""
        tokens, block_ids = self.blocks(epoch, index)
        return self.masked(tokens, epoch, block_ids)

    def blocks(self, epoch: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens int32 [local batch, T], block ids) of this host's rows of batch `index` of `epoch`; filler rows
        (drop_remainder=False) get ids from num_blocks on."""
        g = self.global_batch_size
        ids = self._epoch_order(epoch)[index * g : (index + 1) * g][self.local_rows]
        special = self._special_ids
        # Filler rows are "<s> </s> <pad>...": nothing to predict, and no fully masked attention row that could
        # turn into NaN.
        tokens = np.full((self.local_batch_size, self.corpus.max_seq_length), special["pad"], np.int32)
        tokens[:, :2] = special["bos"], special["eos"]
        tokens[: len(ids)] = self.corpus.blocks(ids)
        return tokens, np.concatenate([ids, self.corpus.num_blocks + np.arange(self.local_batch_size - len(ids))])

    def masked(self, tokens: np.ndarray, epoch: int, block_ids: np.ndarray) -> Batch:
        """The MLM batch of `tokens` (blocks `block_ids` served in `epoch`): a pure function of its arguments."""
        special = self._special_ids
        keys = row_keys(self.seed, epoch, block_ids)
        starts = None if self._word_starts is None else self._word_starts[tokens]
        if self._spans is not None:
            coins = uniforms(keys[:, None], SPAN_COIN, np.arange(tokens.shape[1]))
            base = np.ones(tokens.shape, bool) if starts is None else starts
            starts = self._spans.word_starts_with_spans(tokens, base, coins)
        batch = self._mask(tokens, keys, whole_word_starts=starts)
        if self._documents_apart:
            batch["attention_mask"] = document_segments(tokens, special["eos"], special["pad"])
        return batch

    def __iter__(self) -> MLMLoader:
        return self

    def __next__(self) -> Batch:
        if self.prefetch <= 0:
            position, batch = self._position, self.batch(*self._position)
        else:
            if self._pending is None:
                self._pending = _Prefetcher(self, self._position, self.prefetch)
            try:
                position, batch = self._pending.get()
            except BaseException:
                self.close()
                raise
        self._position = self._advance(position)
        return batch

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable position after the last yielded batch."""
        epoch, index = self._position
        return {
            "epoch": epoch,
            "batch_in_epoch": index,
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
            "num_blocks": self.corpus.num_blocks,
        }

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Continue exactly after the batch at which `state` was taken (any process count)."""
        mine = self.get_state()
        for key in ("seed", "global_batch_size", "num_blocks"):
            if state.get(key) != mine[key]:
                raise UserError(
                    f"loader state has {key}={state.get(key)} but this run has {mine[key]}; "
                    "resume with the same data settings"
                )
        if not 0 <= state["batch_in_epoch"] < self.steps_per_epoch:
            raise UserError(
                f"loader state batch_in_epoch {state['batch_in_epoch']} not in [0, {self.steps_per_epoch}); "
                "the state is from another setup"
            )
        self.close()
        self._position = (int(state["epoch"]), int(state["batch_in_epoch"]))

    def close(self) -> None:
        """Stop the prefetch thread (it restarts on the next batch)."""
        if self._pending is not None:
            self._pending.close()
            self._pending = None

    def _epoch_order(self, epoch: int) -> np.ndarray:
        order = self._order  # one read: the prefetch thread may replace it concurrently
        if order[0] != epoch:
            order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.corpus.num_blocks))
            self._order = order
        return order[1]

    def _advance(self, position: tuple[int, int]) -> tuple[int, int]:
        epoch, index = position
        return (epoch + 1, 0) if index + 1 == self.steps_per_epoch else (epoch, index + 1)


class _Prefetcher:
    """Builds a loader's batches `size` ahead in a daemon thread; re-raises its errors in the consumer.

    The thread holds the loader only weakly, so an abandoned loader is collected and its thread ends.
    """

    def __init__(self, loader: MLMLoader, position: tuple[int, int], size: int) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(weakref.ref(loader), position), daemon=True)
        self._thread.start()

    def _run(self, loader_ref: weakref.ref, position: tuple[int, int]) -> None:
        while (loader := loader_ref()) is not None:
            try:
                entry: Any = position, loader.batch(*position)
                position = loader._advance(position)
            except BaseException as e:  # handed to the consumer, which raises it
                entry = e
            del loader
            if not self._put(entry, loader_ref) or isinstance(entry, BaseException):
                return

    def _put(self, entry: Any, loader_ref: weakref.ref) -> bool:
        while not self._stop.is_set() and loader_ref() is not None:
            try:
                self._queue.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def get(self) -> Any:
        entry = self._queue.get()
        if isinstance(entry, BaseException):
            raise entry
        return entry

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
