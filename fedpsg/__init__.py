"""fedpsg: federated continual learning with Private Set Generation."""

__version__ = "0.1.0"
