"""ichfed: federated fine-tuning for neoplastic vs non-neoplastic ICH on head CT."""

__version__ = "0.1.0"
