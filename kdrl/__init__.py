"""kdrl: post-train reasoning LLMs with KDRL (Xu et al., arXiv 2506.02208).

One objective joins GRPO on rule-based rewards and on-policy reverse-KL distillation from a
teacher (k2 estimator, β annealed, optionally masked by reward). This package is the library:
math, models, engines, storage. It never imports prefect; `flows/` and `tasks/` drive it.

Dimension key (suffixes on tensor and array names only):

    P  prompts in a step        G  samples per prompt        B  sequences (= P*G)
    T  completion tokens        S  prompt+completion tokens  V  vocabulary
    K  top-k entries

e.g. ``logp_BT``, ``rewards_PG``, ``mask_BT``, ``logits_BTV``.

Importing ``kdrl`` is cheap: torch, transformers and vllm are imported by the submodules
that need them.
"""

__version__ = "0.1.0"
