"""A sequence classifier that keeps its masked-LM head: multi-task fine-tuning's model (the task loss plus an
auxiliary MLM loss on the task's text, Chronopoulou et al. 2019; engine/multitask.py).

Its parameters are {"roberta", "classifier", "lm_head"}, the names of RobertaForSequenceClassification and
RobertaForMaskedLM, so a pretraining phase's LM head is loaded and trained on, and a phase that reads only one
of the two heads (prediction, export, the next fine-tune) finds its weights where it expects them.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
from jax import Array

from dontstop_jax.model.config import ModelConfig
from dontstop_jax.model.roberta import ClassificationHead, Gates, LMHead, RobertaModel


class RobertaForClassificationAndMLM(nn.Module):
    """Classification logits [batch, labels] by default, as RobertaForSequenceClassification (so the predict
    step and the R3F/SMART regularisers use it unchanged); vocabulary logits at `mlm_positions` when they are
    given, as RobertaForMaskedLM (so `mlm_loss_sums` uses it unchanged)."""

    config: ModelConfig
    num_labels: int

    def setup(self):
        self.roberta = RobertaModel(self.config)
        self.classifier = ClassificationHead(self.config, self.num_labels)
        self.lm_head = LMHead(self.config)

    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array,
        mlm_positions: Array | None = None,
        *,
        deterministic: bool = True,
        gates: Gates | None = None,
        embedding_noise: Array | None = None,
    ) -> Array:
        h = self.roberta(
            input_ids, attention_mask, deterministic=deterministic, gates=gates, embedding_noise=embedding_noise
        )
        if mlm_positions is not None:
            return self.lm_head(
                jnp.take_along_axis(h, mlm_positions[..., None], axis=1),
                self.roberta.embeddings.word_embeddings.embedding,
            )
        if self.is_initializing():  # create the LM head's parameters too
            self.lm_head(h[:, :1], self.roberta.embeddings.word_embeddings.embedding)
        return self.classifier(h, deterministic, attention_mask)
