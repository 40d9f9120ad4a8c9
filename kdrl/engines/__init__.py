"""Rollout engines and teacher scorers.

``base`` holds the protocols; ``hf`` the transformers implementations. Optional backends
(vllm) import their dependency inside their own module, so ``import kdrl.engines`` stays light.
"""
