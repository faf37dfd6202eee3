"""DAPT: continue masked-LM pretraining on a domain corpus (Gururangan et al. 2020, Table 12).

dontstop pretrain --config configs/dapt.py:biomed --config.init=/models/roberta-base \
    --config.data.sources='["/data/s2orc-biomed/*.jsonl.gz"]'
"""

from dontstop_jax.phases.defaults import pretrain_config

# The paper's four domains and their corpora (you bring the text; sources are set on the command line).
DOMAINS = {
    "biomed": "S2ORC biomedical papers (7.55B tokens)",
    "cs": "S2ORC computer-science papers (8.10B)",
    "news": "RealNews (6.66B)",
    "reviews": "Amazon reviews (2.11B)",
}


def get_config(domain: str = "biomed"):
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; choose from {sorted(DOMAINS)}")
    cfg = pretrain_config("dapt")
    cfg.name = f"dapt-{domain}"
    cfg.workdir = f"runs/dapt-{domain}"
    return cfg
