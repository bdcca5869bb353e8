"""Self-distilled multi-token prediction (MTP-D) on megatron-core."""
