"""Audio experts: the features the thinking slots learn to regress (see registry.py for names)."""

from coat.experts.base import Expert, ExpertSpec
from coat.experts.registry import UnknownExpertError, available_experts, build_expert, expert_spec

__all__ = ["Expert", "ExpertSpec", "UnknownExpertError", "available_experts", "build_expert", "expert_spec"]
