"""Drop-in integrations: FlashAttention-compatible ops (:mod:`.fa_compat`) and Hugging Face
transformers ``attn_implementation="blasst"`` (:mod:`.transformers`, needs ``transformers``).

Submodules are imported on demand so that ``import blasst_cute`` never needs transformers.
"""
