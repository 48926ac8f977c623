"""Sparse autoencoders on a layer's MLP neurons: ``model.py`` (TopK SAE), ``train.py`` (training
and its quality, `precompute train-sae`), ``tables.py`` (stored weights and quality)."""
