"""The built-in offline default: the paper's grid on the synthetic domain-shift benchmark, on 2 CPU cores.

A tiny RoBERTa is pretrained from scratch on the general corpus (the "base model"), then the grid runs
baseline / DAPT / TAPT / DAPT+TAPT / not-DAPT fine-tuning over several seeds on each domain's task.

Prompt-based fine-tuning (finetune.head="prompt") reads each label as words: the benchmark's labels ("alpha",
...) are names, not words of its language, but each label's word cluster is tied in domain text to one general
topic (its anchor, synthetic/spec.py), whose words the base model knows. Its verbalizer is that topic's three
most frequent words (topic words are Zipf-distributed in list order), averaged: the synthetic counterpart of
"great"/"terrible", a general word the label's domain text goes with. The template is "{text} <mask>": the
benchmark has no words for LM-BFF's "It was".
"""

from __future__ import annotations

import copy
import json

from ml_collections import ConfigDict
from ml_collections.config_dict import placeholder

from dontstop_jax import config_loader
from dontstop_jax.fields import PAPER_VARIANTS
from dontstop_jax.phases.defaults import finetune_config, pretrain_config, select_config
from dontstop_jax.synthetic import generate_benchmark

SEQ = 64
LABEL_WORDS = 3  # the prompt's verbalizer: this many of a label's anchor-topic words
# Per scale: (base steps, DAPT steps, TAPT epochs, fine-tune epochs, seeds). Tuned on 2 CPU cores: the default
# fits the 15-minute budget, and at these step counts DAPT and TAPT have learned the domain's word clusters.
SCHEDULES = {"default": (600, 600, 30, 10, (0, 1, 2)), "tiny": (40, 20, 2, 3, (0, 1))}


def tiny_model() -> dict:
    return dict(
        vocab_size=4096,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=SEQ + 2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def _adaptive_phase(kind: str, **schedule: int) -> ConfigDict:
    phase = pretrain_config(kind)
    phase.data.max_seq_length = SEQ
    phase.train.update(batch_size=64, accum_steps=1, **schedule)
    phase.optim.update(learning_rate=5e-3 if kind == "dapt" else 4e-3)
    phase.model.hidden_dropout_prob = 0.0  # the tiny model underfits: dropout only slows it down
    phase.checkpoint.every = 0
    return phase


def get_config(scale: str = "default") -> ConfigDict:
    if scale not in SCHEDULES:
        raise ValueError(f"unknown scale {scale!r}; choose from {list(SCHEDULES)}")
    base_steps, dapt_steps, tapt_epochs, ft_epochs, seeds = SCHEDULES[scale]
    cfg = ConfigDict(
        dict(
            workdir=f"runs/synthetic-{scale}",
            base="",
            seeds=list(seeds),
            variants=list(PAPER_VARIANTS),
            train_sizes=["all"],  # learning curves: e.g. [16, 64, "all"] (see phases/grid.py)
            # methods: e.g. ["full", "frozen", "bitfit", "houlsby", "pfeiffer", "lora"] (empty: finetune.peft.method);
            # method_overrides: fine-tuning fields per method, e.g. {"lora": {"optim": {"learning_rate": 1e-3}}};
            # seed_discard: Dodge et al. early discarding (fraction 0 = off), see phases/grid.py.
            methods=[],
            method_overrides={},
            seed_discard=dict(fraction=0.0, keep=3),
            # few-shot: shots (examples per class, e.g. [16, 32, 64]; replaces train_sizes) and the fine-tuning heads
            # compared (e.g. ["classifier", "prompt"]; empty: finetune.head), see phases/grid.py
            shots=[],
            heads=[],
            # Tasks of `task_domains` are fine-tuned; every domain's corpus is there for the not-DAPT control.
            synthetic=dict(
                scale=scale, seed=0, domains=("bio", "cs"), task_domains=("bio",), directory=placeholder(str)
            ),  # default: WORKDIR/benchmark
            domains={},
            tasks={},
        )
    )

    base = pretrain_config("dapt")
    base.init = "scratch"
    base.model.update(tiny_model())
    base.data.max_seq_length = SEQ
    base.train.update(batch_size=64, accum_steps=1, steps=base_steps)
    base.optim.update(learning_rate=3e-3, warmup_fraction=0.06)
    base.checkpoint.every = 0
    cfg.base_pretrain = base

    cfg.dapt = _adaptive_phase("dapt", steps=dapt_steps)
    cfg.tapt = _adaptive_phase("tapt", epochs=tapt_epochs)

    ft = finetune_config()
    ft.data.max_seq_length = SEQ
    ft.train.update(batch_size=16, epochs=ft_epochs, patience=3, log_every=20)
    ft.optim.update(learning_rate=1e-3)
    ft.prompt.template = "{text} <mask>"
    cfg.finetune = ft

    cfg.select = select_config()  # only used when variants name a selection row (grid.VARIANTS with a `selection`)
    cfg.select.embedding.update(dim=4096)
    cfg.select.embedding.vampire.update(steps=300, learning_rate=1e-2)
    cfg.select.chunk_size = 1024
    return cfg.lock()


def label_words(truth: dict, domain: str) -> dict[str, list[str]]:
    """{label: the LABEL_WORDS most frequent words of its anchor topic} from the benchmark's ground truth."""
    topics = truth["general"]["topics"]
    return {
        label: topics[cluster["anchor_topic"]][:LABEL_WORDS]
        for label, cluster in truth["domains"][domain]["clusters"].items()
    }


def materialize(cfg: ConfigDict) -> ConfigDict:
    """A copy of `cfg` (typed and locked like it) with the grid's domains, tasks and tokenizer pointed at the
    benchmark, which is generated here (or reused)."""
    bench = generate_benchmark(
        cfg.synthetic.directory or f"{cfg.workdir}/benchmark",
        seed=cfg.synthetic.seed,
        scale=cfg.synthetic.scale,
        domains=tuple(cfg.synthetic.domains),
    )
    cfg = copy.deepcopy(cfg)
    cfg.base_pretrain.tokenizer = str(bench.tokenizer)
    cfg.base_pretrain.data.sources = [str(bench.general_corpus)]
    cfg.domains = {name: [str(path)] for name, path in bench.domain_corpora.items()}
    names = list(bench.domain_corpora)
    truth = json.loads(bench.manifest.read_text(encoding="utf-8"))["ground_truth"]
    tasks = [task for task in bench.tasks.values() if task.domain in cfg.synthetic.task_domains]
    # intermediate_from: the next task (the intermediate variants' first fine-tune), none when there is one task
    cfg.tasks = {
        task.name: dict(
            path=str(task.train.parent),
            domain=task.domain,
            metric="macro_f1",
            text_field="text",
            label_field="label",
            overrides={"finetune": {"prompt": {"verbalizer": label_words(truth, task.domain)}}},
            irrelevant_domain=names[(names.index(task.domain) + 1) % len(names)],
            intermediate_from=tasks[(i + 1) % len(tasks)].name if len(tasks) > 1 else "",
        )
        for i, task in enumerate(tasks)
    }
    return config_loader.lock(cfg)
