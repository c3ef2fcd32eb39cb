"""rlhf-pg: token-level policy-gradient RL (REINFORCE, RLOO, GRPO, PPO) for Hugging Face causal LMs."""

__version__ = "0.1.0"
