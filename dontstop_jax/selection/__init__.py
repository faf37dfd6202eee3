"""Task-adaptive data selection: embeddings, nearest neighbours, DSIR, leakage filtering (kNN/RAND/DSIR-TAPT)."""
