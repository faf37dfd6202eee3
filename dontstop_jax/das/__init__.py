"""DAS (Ke et al., ICLR 2023): continual DAP-training with unit importance, soft-masking and contrastive
integration. `importance` measures units, `softmask` protects them, `contrastive` is the integration loss."""
