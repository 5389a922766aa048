"""Device-side building blocks shared by every blasst_cute kernel (prefill, decode, ...)."""
