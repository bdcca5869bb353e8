"""Post-training that keeps the MTP heads: DeepSpeed ZeRO fine-tuning of an HF export with the MTP-D objective.

config.py    typed config (YAML, dotted overrides, flags), validated in one line per mistake
data.py      the new domain's text (e.g. CPython's stdlib) as token sequences, held out by whole documents
model.py     the export's main model + transformers' MtpModel heads as one module; heads back to export names
loss.py      main CE + each head's loss from mtpd/kl.py (CE + beta TopN KL to the detached main head)
finetune.py  DeepSpeed ZeRO-2/3 training loop and the export writer
evaluate.py  held-out main-head loss and teacher-forced a_k / CAR_k / tau of an export; reload-and-draft check
cli.py       tools/finetune_hf.py
experiment.py  tools/run_posttrain_experiment.py: the domain-shift comparison of frozen / CE / MTP-D heads
"""
