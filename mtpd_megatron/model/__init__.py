"""Model construction: layer specs (torch-native fast path or Transformer Engine) and the GPT builder."""
