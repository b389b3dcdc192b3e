"""banpick: calibrate Mixture-of-Experts routing after training (Ban&Pick)."""

__version__ = "0.1.0"
