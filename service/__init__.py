"""HTTP service for PaliGemma over one small Engine protocol (vLLM or transformers)."""
