"""srcid: one discrete codebook shared by audio, video and text (SRCID and its DCID baselines)."""

__version__ = "0.1.0"
