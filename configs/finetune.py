"""Fine-tuning on the paper's eight tasks, with each task's metric (micro-F1 for ChemProt and RCT).

dontstop finetune --config configs/finetune.py:chemprot --config.init=runs/tapt-chemprot \
    --config.task.path=/data/chemprot
"""

from dontstop_jax.phases.defaults import finetune_config

# task: (domain, metric, max epochs). The paper trains 10 epochs (patience 3) except on the two
# large tasks, RCT and AGNews, where it runs 3 epochs.
TASKS = {
    "chemprot": ("biomed", "micro_f1", 10),
    "rct": ("biomed", "micro_f1", 3),
    "acl_arc": ("cs", "macro_f1", 10),
    "sciie": ("cs", "macro_f1", 10),
    "hyperpartisan": ("news", "macro_f1", 10),
    "agnews": ("news", "macro_f1", 3),
    "helpfulness": ("reviews", "macro_f1", 10),
    "imdb": ("reviews", "macro_f1", 10),
}


def get_config(task: str = "chemprot"):
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {sorted(TASKS)}")
    _, metric, epochs = TASKS[task]
    cfg = finetune_config()
    cfg.name = f"finetune-{task}"
    cfg.workdir = f"runs/finetune-{task}"
    cfg.train.metric = metric
    cfg.train.epochs = epochs
    return cfg
