"""The paper's grid (Table 5): baseline, DAPT, TAPT, DAPT+TAPT and not-DAPT on eight tasks, five seeds.

Point it at your data: each task directory holds train/dev/test.jsonl ({"text", "label"}) and optionally
unlabeled.jsonl; each domain lists its corpus files.

dontstop grid --config configs/grid.py:paper --config.base=/models/roberta-base \
    --config.data_root=/data/dontstop
Add the data-selection rows (Table 8) with e.g. --config.variants='["baseline","tapt","knn_tapt_50",
"knn_tapt_150","knn_tapt_500","rand_tapt","dsir_tapt"]'; Transfer-TAPT (Table 10) with
--config.variants='["tapt","transfer_tapt"]' (each task's transfer_from is its domain's other task); intermediate-task
training with --config.variants='["baseline","intermediate","multitask"]' (intermediate_from: the same pairs); learning
curves with --config.train_sizes='[100, 500, 1000, "all"]'.
"""

import importlib.util
from pathlib import Path

from ml_collections import ConfigDict

from dontstop_jax.fields import PAPER_VARIANTS
from dontstop_jax.phases.defaults import finetune_config, pretrain_config, select_config

_spec = importlib.util.spec_from_file_location("finetune_cfg", Path(__file__).with_name("finetune.py"))
assert _spec is not None and _spec.loader is not None
_finetune = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_finetune)

# The paper's not-DAPT pairs each domain with an irrelevant one.
IRRELEVANT = {"biomed": "cs", "cs": "biomed", "news": "reviews", "reviews": "news"}
# Transfer-TAPT (Table 10) pairs the two tasks of each domain; the intermediate variants use the same pairs.
TRANSFER = {
    "chemprot": "rct",
    "rct": "chemprot",
    "acl_arc": "sciie",
    "sciie": "acl_arc",
    "hyperpartisan": "agnews",
    "agnews": "hyperpartisan",
    "helpfulness": "imdb",
    "imdb": "helpfulness",
}


def get_config(arg: str = "paper"):
    root = "/data/dontstop"  # the layout below; override data paths per task/domain if yours differ
    cfg = ConfigDict(
        dict(
            workdir="runs/grid-paper",
            base="",
            seeds=[0, 1, 2, 3, 4],
            variants=list(PAPER_VARIANTS),
            # train_sizes: learning curves, e.g. [100, 500, 1000, "all"]
            # (each seed fine-tunes on its own stratified draw)
            train_sizes=["all"],
            # methods: e.g. ["full", "frozen", "bitfit", "houlsby", "pfeiffer", "lora"] (empty: finetune.peft.method);
            # method_overrides: fine-tuning fields per method, e.g. {"lora": {"optim": {"learning_rate": 1e-3}}};
            # seed_discard: Dodge et al. early discarding (fraction 0 = off), see phases/grid.py.
            methods=[],
            method_overrides={},
            seed_discard=dict(fraction=0.0, keep=3),
            # few-shot: shots (examples per class, e.g. [16, 32, 64]; replaces train_sizes) and heads compared
            # (e.g. ["classifier", "prompt"]; empty: finetune.head; a task's verbalizer goes in its
            # overrides.finetune.prompt.verbalizer), see phases/grid.py
            shots=[],
            heads=[],
            base_pretrain=dict(init="none"),
            domains={d: [f"{root}/corpora/{d}/*.txt"] for d in IRRELEVANT},
            # tasks.<t>.overrides: per-task fields of its TAPT and fine-tuning phases, e.g.
            # --config.tasks.rct.overrides="{'finetune': {'train': {'steps_per_epoch': 2000}}}"
            tasks={
                t: dict(
                    path=f"{root}/tasks/{t}",
                    domain=d,
                    metric=m,
                    epochs=e,
                    text_field="text",
                    label_field="label",
                    irrelevant_domain=IRRELEVANT[d],
                    overrides={},
                    transfer_from=TRANSFER[t],
                    intermediate_from=TRANSFER[t],
                )
                for t, (d, m, e) in _finetune.TASKS.items()
            },
        )
    )
    cfg.dapt = pretrain_config("dapt")
    cfg.tapt = pretrain_config("tapt")
    cfg.finetune = finetune_config()
    cfg.select = select_config()  # for the selection variants (grid.VARIANTS); method/k/sources set per row
    return cfg
