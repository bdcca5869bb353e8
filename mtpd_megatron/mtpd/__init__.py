"""MTP-D: vocabulary-parallel TopN self-distillation for megatron-core's MTP heads."""
