"""GESR (Hong et al. 2025): mixture-of-attention features beside a two-tower early-stage ranker.

docs/gesr.md says what is built and what is not yet."""
