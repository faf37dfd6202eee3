"""Why a domain needs adaptation: vocabulary overlap, per-domain MLM loss, training curves, results chart.

dontstop analyze --config configs/analyze.py:synthetic        # after `dontstop demo`
dontstop analyze --config configs/analyze.py:synthetic-tiny   # after `dontstop demo --scale tiny`
dontstop analyze --config configs/analyze.py:paper --config.mlm.checkpoints="{'roberta': '/models/roberta-base'}"
dontstop analyze --config configs/analyze.py:custom --config.corpora=... --config.mlm.checkpoints=...

Presets: synthetic[-tiny] analyses the demo's run directory on fresh held-out samples of its corpora; paper
reads the layout of configs/grid.py:paper (held-out text in /data/dontstop/heldout/<domain>/*.txt); custom
is the empty form to fill in.
"""

from ml_collections import ConfigDict

from dontstop_jax.errors import UserError

PAPER_DOMAINS = ("general", "biomed", "cs", "news", "reviews")


def get_config(arg: str = "custom") -> ConfigDict:
    cfg = ConfigDict(
        dict(
            out_dir="runs/analysis",
            corpora={},  # {name: [sources]}: held-out text of each domain (path, glob, hf:, tfds:, or a source dict)
            # top_k: words per corpus (the paper: 10K); max_docs: documents read per corpus (0 = all)
            vocab=dict(top_k=10_000, max_docs=100_000),  # top_k=0: no overlap section
            # checkpoints: {name: HF directory or phase workdir}; every one sees the same masked blocks of each corpus
            mlm=dict(
                checkpoints={},
                cache_dir="runs/cache/prepared",
                max_seq_length=128,
                batch_size=16,
                max_batches=20,
                seed=0,
                mask_prob=0.15,
                mesh_shape=(-1, 1, 1),
            ),
            grid_dir="",  # a grid's workdir: adds its finished pretraining phases and its results.json
            curves={},  # {name: phase workdir}: more runs whose metrics.jsonl to plot
            dpi=80,
        )
    )
    if arg in ("synthetic", "synthetic-tiny"):
        run = f"runs/synthetic-{arg.partition('-')[2] or 'default'}"
        cfg.out_dir = f"{run}/analysis"
        cfg.grid_dir = run
        # The synthetic vocabulary has ~1K words, so its top 200 play the role of the paper's top 10K of ~1M.
        cfg.vocab.top_k = 200
        cfg.mlm.update(max_seq_length=64, batch_size=32, max_batches=8, cache_dir=f"{run}/cache")
        cfg.synthetic = dict(directory=f"{run}/benchmark", heldout_docs=1000)
    elif arg == "custom":
        pass
    elif arg == "paper":
        cfg.out_dir = "runs/grid-paper/analysis"
        cfg.grid_dir = "runs/grid-paper"
        cfg.corpora = {d: [f"/data/dontstop/heldout/{d}/*.txt"] for d in PAPER_DOMAINS}
    else:
        raise UserError(f"unknown analysis preset {arg!r}; use synthetic, synthetic-tiny, paper or custom")
    return cfg
