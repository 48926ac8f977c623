"""Which training examples stand behind a prediction (issue 7).

- ``index``: a vector index over the stored window embeddings (exact numpy search; FAISS when
  it is installed and the corpus is large; one interface).
- ``sift``: SIFT selection (Hübotter et al. 2024, arXiv 2410.08020) and the nearest-neighbour
  baseline, with the posterior variance of the linear surrogate after every pick.
- ``support``: glue for a live prompt (embed, search, select) and for diverse neuron examples.
"""
