"""Every config field, declared once: its default (and so its type), a one-line doc, the rule its value must
keep, and how it counts for a phase. A phase's fingerprint (train/workdir.py), the loader's checks
(config_loader.py), the phase defaults (phases/defaults.py) and `dontstop config` all read these tables.

How a field counts:
    RESULT       it changes what a phase produces: part of the fingerprint, and a change is refused as drift
    RUNTIME      never changes the result (name, place, logging, checkpoint cadence, the mesh, caches)
    Neutral(v)   added after phases were recorded: at v (what phases did before it) it is left out, so a phase
                 finished before the field existed keeps its fingerprint
    When(s, ...) counts only while the switch field s is on (a regulariser's method not "none", the objective
                 or head that uses the section)

A leaf module: it imports nothing of the package, so loading a config pulls in no model, engine or phase.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from ml_collections import ConfigDict
from ml_collections.config_dict import placeholder

# Choice lists, owned here so that the loader checks them without importing their users.
METRICS = ("accuracy", "macro_f1", "micro_f1")  # what analysis/metrics.py classification_metrics returns
PEFT_METHODS = ("full", "frozen", "top_k", "bitfit", "houlsby", "pfeiffer", "lora")
REGULARIZERS, NOISES, NORMS = ("none", "r3f", "smart"), ("normal", "uniform"), ("inf", "l2")
MULTITASK_METHODS = ("none", "mlm")  # none: the task loss alone; mlm: plus the auxiliary masked-LM loss
AVERAGING = ("none", "ema", "swa")
HEADS = ("classifier", "prompt")  # a new classification head, or the MLM head through a prompt
OBJECTIVES = ("mlm", "das", "ewc", "derpp", "hat")  # a pretraining phase's loss: MLM or a continual stage's
SELECT_METHODS = ("knn", "rand", "dsir", "curated")
# The registered continual methods and grid variants: the objects live with their owners (phases/continual.py
# METHODS, phases/grid.py VARIANTS, engine/prompt.py HEADS), each made by `registry` from these names.
CONTINUAL_METHODS = (
    "das",
    "ewc",
    "derpp",
    "das_no_general",
    "das_no_contrast",
    "das_past_contrast",
    "das_random",
    "hat",
    "demix",
    "ncl",
    "one",
    "adapter_one",
    "base",
)
GRID_VARIANTS = (
    "baseline",
    "dapt",
    "tapt",
    "dapt_tapt",
    "not_dapt",
    "transfer_tapt",
    "knn_tapt_50",
    "knn_tapt_150",
    "knn_tapt_500",
    "rand_tapt",
    "dsir_tapt",
    "intermediate",
    "dapt_intermediate",
    "tapt_intermediate",
    "multitask",
    "dapt_multitask",
)
PAPER_VARIANTS = ("baseline", "dapt", "tapt", "dapt_tapt", "not_dapt")  # the paper's Table 5 rows: a grid's default
DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")  # how, never what, the model computes
PROMPT_TEXT, PROMPT_MASK = "{text}", "<mask>"
BATCH_AXES = ("data", "fsdp")  # FSDP is data parallelism with sharded parameters: both split the batch
# (logical axis, mesh axis or axes or None): engine/sharding.py lays parameters and activations out by these.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("position", None),
    ("type", None),
    ("norm", None),
    ("labels", None),
    ("length", None),
    ("act_embed", None),
    ("embed_out", None),
    ("adapter", None),
    ("lora", None),
)  # adapter bottleneck and LoRA rank: small, replicated


def default_dtype(platform: str) -> str:
    """What `model.dtype="auto"` computes in on a backend: bfloat16 on TPUs and GPUs (their matrix units' input
    type; parameters and optimizer state stay float32), float32 on CPUs (bfloat16 matmuls are emulated there)."""
    return "float32" if platform == "cpu" else "bfloat16"


def check_template(template: str) -> bool:
    return template.count(PROMPT_TEXT) == 1 and template.count(PROMPT_MASK) == 1


Rule = tuple[Callable[[Any], bool], str]
RESULT, RUNTIME = "changes the result", "runtime only"


@dataclasses.dataclass(frozen=True)
class Neutral:
    old: Any

    def __str__(self) -> str:
        return f"left out at {self.old!r}, its value before it existed"


@dataclasses.dataclass(frozen=True)
class When:
    """Counts while the field `switch` is `on` (or, with `off`, is anything but `off`)."""

    switch: str
    on: Any = None
    off: Any = None

    def active(self, tree: Mapping[str, Any]) -> bool:
        value = tree.get(self.switch, "<absent>")
        return value != self.off if self.off is not None else value == self.on

    def __str__(self) -> str:
        return f"only when {self.switch}" + (f" != {self.off!r}" if self.off is not None else f" == {self.on!r}")


Counts = str | Neutral | When


@dataclasses.dataclass(frozen=True)
class Unset:
    """The default of a typed placeholder: None until set, then a `kind`."""

    kind: type


@dataclasses.dataclass(frozen=True)
class Field:
    default: Any
    doc: str
    rule: Rule | None = None
    counts: Counts = RESULT
    keyed: bool = False  # a map keyed by your own names (domains, tasks): a dict value replaces it

    def counted(self, value: Any, flat: Mapping[str, Any]) -> bool:
        """Whether this field, at `value` in the phase whose {dotted field: value} is `flat`, shapes its result."""
        if isinstance(self.counts, Neutral):
            return value != self.counts.old
        if isinstance(self.counts, When):
            return self.counts.active(flat)
        return self.counts == RESULT


def one_of(choices: Sequence[str]) -> Rule:
    return (lambda v: v in choices), f"must be one of {', '.join(choices)}"


def _at_least(low: float, why: str = "") -> Rule:
    return (lambda v: v >= low), f"must be >= {low:g}{why}"


POSITIVE: Rule = (lambda v: v > 0), "must be > 0"
AT_LEAST_1, NON_NEGATIVE = _at_least(1), _at_least(0)
FRACTION: Rule = (lambda v: 0 < v < 1), "must be in (0, 1)"
HALF_OPEN: Rule = (lambda v: 0 <= v < 1), "must be in [0, 1)"


def _unset_or_positive(why: str) -> Rule:
    return (lambda v: v is None or v > 0), f"must be > 0 (or None{why})"


def _switched(table: Mapping[str, Any], counts: Counts) -> dict[str, Any]:
    """`table` with every field counted as `counts` (a section that counts only under a switch)."""
    return {
        k: _switched(v, counts) if isinstance(v, dict) else dataclasses.replace(v, counts=counts)
        for k, v in table.items()
    }


F = Field
_SEED = F(0, "seed of initialisation, dropout, masking and data order")
_INIT = F("", 'a Hugging Face directory or hub id, a finished phase\'s workdir, or "scratch"')
_MAX_LEN = F(512, "tokens per sequence", POSITIVE)
_TASK = dict(
    path=F("", "the task directory (train/dev/test.jsonl)"),
    hf_dataset=F("", "a Hugging Face dataset instead of a directory"),
    text_field=F("text", "the text's key in each example"),
    label_field=F("label", "the label's key in each example"),
)
MODEL = dict(
    dtype=F(
        "auto",
        'compute dtype; "auto": bfloat16 on TPU/GPU, float32 on CPU (the resolved one is recorded)',
        one_of(DTYPES + ("auto",)),
    ),
    remat=F("none", "rematerialisation per encoder layer (same math, less memory)", one_of(REMAT_POLICIES), RUNTIME),
    attention_impl=F(Unset(str), "attention kernel (None: XLA's; splash on TPU when attention dropout is 0)"),
    hidden_dropout_prob=F(Unset(float), "dropout (None: the init's)"),
    attention_probs_dropout_prob=F(Unset(float), "attention dropout (None: the init's)"),
    classifier_dropout=F(Unset(float), "classifier head dropout (None: the init's)"),
    **{
        name: F(Unset(int), f"architecture with init='scratch' (None: RoBERTa-base's {name})")
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
        )
    },
)
MESH = dict(
    shape=F((-1, 1, 1), "devices per (data, fsdp, tensor) axis, one -1 = the rest", counts=RUNTIME),
    dcn_shape=F(Unset(tuple), "multi-slice: slices per axis (shape is then per slice)", counts=RUNTIME),
    rules=F(DEFAULT_RULES, "(logical axis, mesh axes) layout rules of engine/sharding.py", counts=RUNTIME),
    allow_replicated=F(
        False, "accept parameters >= 1 MiB whole on every device when the mesh cannot divide them", counts=RUNTIME
    ),
)
OPTIM = dict(
    learning_rate=F(5e-4, "AdamW's peak learning rate", POSITIVE),
    warmup_fraction=F(0.06, "share of the steps warming up linearly (then linear decay to 0)", HALF_OPEN),
    b1=F(0.9, "AdamW beta1"),
    b2=F(0.98, "AdamW beta2"),
    eps=F(1e-6, "AdamW epsilon"),
    weight_decay=F(0.01, "decoupled weight decay (not on biases and norms)"),
    max_grad_norm=F(1.0, "clip the global gradient norm to this"),
)
PEFT = dict(
    method=F(
        "full", "which parameters train: full, a frozen body, or a parameter-efficient method", one_of(PEFT_METHODS)
    ),
    top_k=F(2, "top_k: train the top k encoder layers"),
    adapter_size=F(64, "houlsby/pfeiffer: adapter bottleneck width"),
    lora_rank=F(8, "lora: rank"),
    lora_alpha=F(16.0, "lora: scale alpha (the update is alpha/rank x BA)"),
    lora_targets=F(("query", "value"), "lora: the projections it adapts"),
    pooling=F("cls", "the classifier's pooling: cls (<s>) or mean"),
)
COMMON = dict(
    name=F("", "the phase's name (logs, tables)", counts=RUNTIME),
    workdir=F("", "where it writes (local or gs://)", counts=RUNTIME),
    seed=_SEED,
    init=_INIT,
    init_delta=F("", "an adapter file (peft.safetensors) put onto init's weights"),
    tokenizer=F(Unset(str), "the tokenizer directory (None: the init's)"),
    model=MODEL,
    mesh=MESH,
    optim=OPTIM,
    peft=PEFT,
)
_TRAIN = dict(
    skip_nonfinite=F(False, "skip a step whose loss or gradient is not finite instead of stopping"),
    grad_reduce_dtype=F(
        "float32",
        "dtype of the step's one gradient reduction (bfloat16 halves its bytes)",
        one_of(("float32", "bfloat16")),
        Neutral("float32"),
    ),
    gather_params_once=F(False, "FSDP: gather the parameters once per step, not per micro-batch", counts=RUNTIME),
    stop_poll_every=F(10, "steps between the processes' agreement on a stop request", counts=RUNTIME),
)
DAS = dict(
    contrastive_weight=F(1.0, "weight of DAS's contrastive loss (0: ablated)"),
    temperature=F(0.05, "contrastive temperature"),
    importance_batches=F(16, "batches of domain text measuring importance (also EWC's Fisher, DER++'s logits)"),
    importance_batch_size=F(16, "sequences per importance batch"),
    importance_dropout=F(0.1, "dropout of the general-knowledge proxy's two passes"),
    general=F(True, "False: no general-knowledge proxy (importance from domain MLM only)", counts=Neutral(True)),
    contrast=F("all", "contrast with all knowledge, or past domains' only", one_of(("all", "past")), Neutral("all")),
    random=F(False, "ablation: each importance replaced by a seeded permutation of itself", counts=Neutral(False)),
)
EWC = dict(lam=F(5000.0, "EWC penalty strength", NON_NEGATIVE))
DERPP = dict(
    buffer_size=F(200, "replay buffer sequences", AT_LEAST_1),
    alpha=F(0.1, "weight of the replayed logits' MSE", NON_NEGATIVE),
    beta=F(0.5, "weight of the replayed MLM loss", NON_NEGATIVE),
    batch_size=F(Unset(int), "replayed rows per micro-batch", _unset_or_positive(": as many rows as the micro-batch")),
)
HAT = dict(
    s_max=F(400.0, "the gate slope's final value", _at_least(1, " (the final gate slope; the paper's 400)")),
    c=F(0.75, "weight of the gates' sparsity regulariser", NON_NEGATIVE),
)
PRETRAIN: dict[str, Any] = dict(
    COMMON,
    data=dict(
        sources=F([], "corpus files, globs, hf:NAME or tfds:NAME (or source dicts)"),
        cache_dir=F(
            Unset(str), "the prepared-data cache (None: WORKDIR/prepared; a grid's: GRID/cache)", counts=RUNTIME
        ),
        max_seq_length=_MAX_LEN,
        mask_prob=F(0.15, "share of tokens masked", FRACTION),
        whole_word=F(False, "mask whole words, not word pieces"),
        attend_across_documents=F(
            True, "packed documents see each other (False: each keeps to itself)", counts=Neutral(True)
        ),
        span_masking=dict(
            terms=F("", 'a file of terms, one a line, each masked whole as one unit ("": off)', counts=Neutral("")),
            rate=F(
                1.0,
                "the chance a matched term is masked as one unit",
                ((lambda v: 0 <= v <= 1), "must be in [0, 1] (the chance a matched term is one unit)"),
                Neutral(1.0),
            ),
        ),
    ),
    checkpoint=dict(
        every=F(1000, "steps between checkpoints (0: only at the end)", NON_NEGATIVE, RUNTIME),
        keep_last=F(2, "checkpoints kept", AT_LEAST_1, RUNTIME),
    ),
    train=dict(
        batch_size=F(256, "examples (sequences) per optimizer step", POSITIVE),
        accum_steps=F(4, "micro-batches per step (gradient accumulation)", POSITIVE),
        steps=F(Unset(int), "optimizer steps", _unset_or_positive(" to train for train.epochs")),
        epochs=F(100, "passes over the data (pretraining: when steps is None)", POSITIVE),
        log_every=F(10, "steps between log lines", counts=RUNTIME),
        **_TRAIN,
    ),
    objective=F("mlm", "the loss: MLM, or a continual stage's (set by `dontstop continual`)", one_of(OBJECTIVES)),
    frozen=F([], 'parameter paths held fixed, e.g. ["lm_head", "roberta/embeddings"]'),
    das=DAS,
    ewc=_switched(EWC, When("objective", on="ewc")),  # das counts always: it did before the others came
    derpp=_switched(DERPP, When("objective", on="derpp")),
    hat=_switched(HAT, When("objective", on="hat")),
)
_OFF = "must be >= 0 (0 turns SMART's Bregman term off)"
FINETUNE: dict[str, Any] = dict(
    COMMON,
    task=dict(
        _TASK,
        train_size=F(
            0,
            "train on a stratified draw of this many examples (0: all)",
            _at_least(0, " (0 = the whole train split)"),
            Neutral(0),
        ),
        shots=F(
            0,
            "few-shot: examples per class in train and dev (0: off)",
            _at_least(0, " (examples per class; 0 = off)"),
            Neutral(0),
        ),
    ),
    data=dict(max_seq_length=_MAX_LEN),
    train=dict(
        batch_size=F(16, "examples (sequences) per optimizer step", POSITIVE),
        epochs=F(10, "passes over the data (pretraining: when steps is None)", POSITIVE),
        patience=F(3, "epochs without a better dev score before stopping", AT_LEAST_1),
        metric=F("macro_f1", "the dev score that picks the best epoch", one_of(METRICS)),
        log_every=F(50, "steps between log lines", counts=RUNTIME),
        reinit_top_layers=F(0, "re-initialise the top k encoder layers (Zhang et al. 2021)"),
        layerwise_lr_decay=F(1.0, "learning rate x this per layer down from the top (1: off)"),
        discard_fraction=F(0.0, "after this share of the epochs, stop a seed below discard_below (Dodge et al.)"),
        discard_below=F(Unset(float), "the dev score a seed must reach (the grid sets it)"),
        steps_per_epoch=F(
            Unset(int), "cap an epoch at this many batches", _unset_or_positive(" for a full pass over train")
        ),
        prune_top_layers=F(0, "drop the top k encoder layers before fine-tuning", NON_NEGATIVE, Neutral(0)),
        fresh_head=F(False, "start a new classification head even when init has one", counts=Neutral(False)),
        **_TRAIN,
    ),
    regularizer=_switched(
        dict(
            method=F("none", "R3F or SMART trust-region regulariser", one_of(REGULARIZERS)),
            weight=F(1.0, "weight of the regulariser's term", NON_NEGATIVE),
            noise=F("normal", "R3F's noise", one_of(NOISES)),
            noise_scale=F(1e-5, "R3F's noise scale", POSITIVE),
            step_size=F(1e-3, "SMART's ascent step", POSITIVE),
            radius=F(1e-5, "SMART's perturbation radius", POSITIVE),
            norm=F("inf", "SMART's perturbation norm", one_of(NORMS)),
            steps=F(1, "SMART's ascent steps", AT_LEAST_1),
            bregman_weight=F(1.0, "SMART's Bregman proximal term weight", ((lambda v: v >= 0), _OFF)),
            bregman_decay=F(0.99, "SMART's teacher EMA decay", HALF_OPEN),
        ),
        When("regularizer.method", off="none"),
    ),
    averaging=_switched(
        dict(
            method=F("none", "evaluate and hand on an average of the weights", one_of(AVERAGING)),
            ema_decay=F(0.999, "ema: decay per step", FRACTION),
            swa_start=F(1, "swa: the first epoch averaged", AT_LEAST_1),
        ),
        When("averaging.method", off="none"),
    ),
    head=F("classifier", "a new head on <s>, or the MLM head at a prompt's mask", one_of(HEADS), Neutral("classifier")),
    prompt=_switched(
        dict(
            template=F(
                "{text} It was <mask> .",
                "the prompt: exactly one {text} and one <mask>",
                (check_template, "needs exactly one {text} and one <mask>, e.g. '{text} It was <mask> .'"),
            ),
            verbalizer=F({}, "{label: word or [words]} scored at the mask", keyed=True),
            demonstrations=F(False, "add LM-BFF's demonstrations"),
        ),
        When("head", on="prompt"),
    ),
    multitask=_switched(
        dict(
            method=F("none", "add an annealed weight x MLM loss on the task's text", one_of(MULTITASK_METHODS)),
            mlm_weight=F(0.2, "the MLM loss's first weight", NON_NEGATIVE),
            mlm_weight_end=F(0.1, "its weight after anneal_epochs", NON_NEGATIVE),
            anneal_epochs=F(15, "epochs of geometric annealing", AT_LEAST_1),
            mask_prob=F(0.15, "share of tokens masked", FRACTION),
        ),
        When("multitask.method", off="none"),
    ),
    unit_gates=F(
        "",
        'an .npz of fixed gates on heads and FFN units (e.g. a HAT domain\'s mask); "": none',
        (
            (lambda v: v == "" or v.endswith(".npz")),
            'must be an .npz of gates (e.g. a HAT stage\'s hat_domain_mask.npz) or "" for none',
        ),
        Neutral(""),
    ),
)
SELECT: dict[str, Any] = dict(
    name=COMMON["name"],
    workdir=COMMON["workdir"],
    seed=_SEED,
    method=F("knn", "how documents are selected", one_of(SELECT_METHODS)),
    task=_TASK,
    sources=F([], "the domain corpus to select from"),
    curated_sources=F([], "curated: your extra in-distribution unlabeled text"),
    k=F(50, "knn: neighbours per task (train) example", POSITIVE),
    n=F(0, "rand/dsir: documents to select"),
    n_from=F("", "rand/dsir: as many as the finished selection in this workdir kept"),
    fit_docs=F(100_000, "the embedder and DSIR are fitted on the corpus' first documents", POSITIVE),
    embedding=dict(
        kind=F("vampire", "document embedding: vampire, tfidf or lm"),
        dim=F(8192, "hashed vocabulary (vampire, tfidf)"),
        ngrams=F((1,), "n-gram orders"),
        vampire=dict(
            hidden=F(64, "VAMPIRE hidden width"),
            latent=F(64, "VAMPIRE topics"),
            steps=F(2000, "VAMPIRE training steps"),
            batch_size=F(256, "VAMPIRE batch size", POSITIVE),
            learning_rate=F(1e-3, "VAMPIRE learning rate"),
        ),
        lm=dict(
            init=F("", "lm: the model embedding documents"),
            max_seq_length=F(128, "lm: tokens per document", POSITIVE),
            batch_size=F(64, "lm: documents per batch", POSITIVE),
        ),
    ),
    knn=dict(backend=F("jax", "jax or faiss"), approximate=F(False, "faiss: approximate search")),
    dsir=dict(dim=F(1 << 16, "DSIR's hashed n-gram buckets"), ngrams=F((1, 2), "DSIR's n-gram orders")),
    leakage=dict(
        splits=F(("dev", "test"), "splits checked for leaked documents"),
        ngram=F(3, "n-gram order of the check"),
        threshold=F(0.8, "share of shared n-grams that leaks"),
    ),
    chunk_size=F(4096, "documents embedded per chunk", POSITIVE),
    checkpoint_every=F(8, "chunks between checkpoints", POSITIVE, RUNTIME),
    mesh=dict(shape=MESH["shape"]),
)
GRID: dict[str, Any] = (
    dict(  # what a grid, the demo (a grid on the synthetic benchmark) and a continual run add to their phases
        workdir=COMMON["workdir"],
        base=F("", "the base model (HF directory or hub id; empty: base_pretrain trains one)"),
        seeds=F([0, 1, 2, 3, 4], "fine-tuning seeds"),
        variants=F(["baseline", "dapt", "tapt", "dapt_tapt", "not_dapt"], "the grid's rows (phases/grid.py)"),
        train_sizes=F(
            ["all"],
            "learning curves: train sizes",
            (
                lambda v: len(v) == len(set(v)) > 0 and all(s == "all" or (type(s) is int and s >= 1) for s in v),
                "must list distinct train sizes, each an int >= 1 or 'all' (the whole train split), "
                "e.g. [100, 500, 'all']",
            ),
        ),
        methods=F([], "grid: PEFT methods compared (empty: finetune.peft.method); continual: the methods run"),
        method_overrides=F(
            {}, "fine-tuning fields per method, e.g. {'lora': {'optim': {'learning_rate': 1e-3}}}", keyed=True
        ),
        seed_discard=dict(
            fraction=F(0.0, "Dodge et al.: share of epochs before discarding seeds (0: off)"),
            keep=F(3, "seeds kept", AT_LEAST_1),
        ),
        shots=F(
            [],
            "few-shot: examples per class, e.g. [16, 32, 64] (replaces train_sizes)",
            (
                lambda v: len(v) == len(set(v)) and all(type(s) is int and s >= 1 for s in v),
                "must list distinct numbers of examples per class, each an int >= 1, e.g. [16, 32, 64] ([] = off)",
            ),
        ),
        heads=F(
            [],
            "fine-tuning heads compared (empty: finetune.head)",
            (
                lambda v: len(v) == len(set(v)) and set(v) <= set(HEADS),
                f"must list distinct fine-tuning heads of {', '.join(HEADS)} ([] = finetune.head)",
            ),
        ),
        domains=F({}, "{domain: [corpus sources]}", keyed=True),
        tasks=F({}, "{task: its fields (tasks.*)}", keyed=True),
        synthetic=dict(
            scale=F("default", "the benchmark's size: default or tiny"),
            seed=F(0, "the benchmark's seed"),
            domains=F(("bio", "cs"), "the benchmark's domains"),
            task_domains=F(("bio",), "domains whose tasks are fine-tuned"),
            directory=F(Unset(str), "where the benchmark is (None: WORKDIR/benchmark)"),
            heldout_docs=F(1000, "analyze: held-out documents per domain"),
        ),
        sequence=F([], "continual: the domains in training order"),
    )
)
TASK = {
    "tasks.*." + k: v
    for k, v in dict(
        path=F("", "the task directory"),
        domain=F("", "the domain whose corpus DAPT trains on"),
        metric=F("macro_f1", "the task's score", one_of(METRICS)),
        epochs=F(10, "fine-tuning epochs"),
        text_field=_TASK["text_field"],
        label_field=_TASK["label_field"],
        irrelevant_domain=F("", "not-DAPT's domain"),
        overrides=F({}, "per-task fields of its TAPT and fine-tuning phases", keyed=True),
        transfer_from=F("", "the task whose TAPT phase transfer_tapt fine-tunes from"),
        intermediate_from=F("", "the task the intermediate rows fine-tune on first"),
    ).items()
}
ANALYZE: dict[str, Any] = dict(
    out_dir=F("runs/analysis", "where the report goes"),
    corpora=F({}, "{name: [sources]}: held-out text of each domain", keyed=True),
    vocab=dict(
        top_k=F(10_000, "words per corpus (0: no overlap section)"),
        max_docs=F(100_000, "documents read per corpus (0: all)"),
    ),
    mlm=dict(
        checkpoints=F({}, "{name: HF directory or phase workdir}", keyed=True),
        cache_dir=F("runs/cache/prepared", "prepared-data cache"),
        max_seq_length=_MAX_LEN,
        batch_size=F(16, "sequences per batch", POSITIVE),
        max_batches=F(20, "batches per corpus"),
        seed=_SEED,
        mask_prob=F(0.15, "share of tokens masked", FRACTION),
        mesh_shape=MESH["shape"],
    ),
    grid_dir=F("", "a grid's workdir: its phases and results.json"),
    curves=F({}, "{name: phase workdir}: more runs to plot", keyed=True),
    dpi=F(80, "plots' resolution"),
)
# A grid's or a continual run's phase templates sit under these names.
SLOTS = {"dapt": PRETRAIN, "tapt": PRETRAIN, "base_pretrain": PRETRAIN, "finetune": FINETUNE, "select": SELECT}


def flat(table: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Field]]:
    """(dotted path, Field) of every field in a nested table."""
    for key, value in table.items():
        if isinstance(value, dict):
            yield from flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted path: value} of a JSON tree (an empty dict is a value)."""
    if isinstance(tree, dict) and tree:
        return {k: v for key, sub in tree.items() for k, v in flatten(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def _merge(*tables: Iterable[tuple[str, Field]]) -> dict[str, Field]:
    """One {path: Field}; a path declared twice (with each phase's default) must mean the same."""
    out: dict[str, Field] = {}
    for path, field in (item for table in tables for item in table):
        if dataclasses.replace(out.setdefault(path, field), default=field.default) != field:
            raise AssertionError(f"{path} is declared twice, differently")
    return out


# Every phase's fields by path within the phase (what its fingerprint reads), and every config's by full path.
PHASE_FIELDS = _merge(flat(PRETRAIN), flat(FINETUNE), flat(SELECT))
FIELDS = _merge(
    PHASE_FIELDS.items(),
    flat(GRID),
    TASK.items(),
    flat(ANALYZE),
    *(flat(table, f"{slot}.") for slot, table in SLOTS.items()),
)
MAPS = frozenset(path.rsplit(".", 1)[-1] for path, field in FIELDS.items() if field.keyed)


def undeclared(path: str) -> str:
    """The one-line error for a field declared nowhere."""
    return (
        f"{path} is not a declared field; declare it in dontstop_jax/fields.py with its default, doc, rule "
        "and how it counts for a phase's result"
    )


def declared(path: str, table: Mapping[str, Field] = FIELDS) -> Field | None:
    """The declaration of dotted `path`: an entry of a map (tasks.rct.metric) is its map's entry (tasks.*.metric)
    or, for maps of plain values (domains.bio, prompt.verbalizer.good), the map itself."""
    parts = path.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in MAPS:
            starred = ".".join([*parts[: i + 1], "*", *parts[i + 2 :]])
            return table.get(starred) or table.get(".".join(parts[: i + 1]))
    return table.get(path)


def build(table: Mapping[str, Any]) -> ConfigDict:
    """A new ConfigDict of the declared defaults of `table` (typed: placeholders keep their type)."""
    return ConfigDict(
        {
            k: build(v)
            if isinstance(v, dict)
            else placeholder(v.default.kind)
            if isinstance(v.default, Unset)
            else copy.deepcopy(v.default)
            for k, v in table.items()
        }
    )


T = TypeVar("T")


def registry(names: tuple[str, ...], entries: Mapping[str, T]) -> dict[str, T]:
    """`entries` as a registry, if its names are exactly `names` in that order (a programming error otherwise:
    an object registered without its name declared here, or a name with no object)."""
    if tuple(entries) != names:
        raise AssertionError(
            f"registry {list(entries)} differs from the declared names {list(names)} (dontstop_jax/fields.py)"
        )
    return dict(entries)
