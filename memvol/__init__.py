"""memvol: log volume growth of the probability-flow ODE as a memorisation measure.

Hasegawa & Yasuda, "Quantifying the Ease of Reproducing Training Data in Unconditional
Diffusion Models" (arXiv 2503.19429).
"""

__version__ = "0.1.0"
