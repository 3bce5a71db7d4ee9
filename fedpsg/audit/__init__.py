"""The empirical privacy audit: canaries and memorisation (``python -m fedpsg.audit``)."""
