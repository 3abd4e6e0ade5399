"""The SRCID model and its DCID baselines: encoders, quantizers, losses, variants."""
