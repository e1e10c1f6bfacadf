"""Data: manifests, audio decoding, coat-mini, feature store and Ray Data pipelines (import submodules)."""
