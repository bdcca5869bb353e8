"""An export's main model and its MTP heads as one trainable module, and the heads' tensors back in export names.

The heads are transformers' own MtpModel (inference/hf_mtp.py loads them from the export's sidecar or inline
files), so training runs the same head forward that drafting runs in `generate(use_mtp=True)`. MtpModel holds the
main model's embedding, LM head and rotary embedding as submodules of its own; inside one module tree those
would be registered twice, and DeepSpeed ZeRO-3 partitions and hooks per module, so here they are kept as plain
attributes of the heads (still the main model's modules, called through them) and the module tree holds each
parameter once: `main.*` and `mtp.layers.*`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from mtpd_megatron.inference.hf_mtp import forward_mtp_layer

_SHARED = ("embed_tokens", "shared_head", "rotary_emb")


class ModelWithHeads(nn.Module):
    """`main` (a transformers CausalLM) and `mtp` (transformers' MtpModel of its heads, shared parts untied from
    the module tree). forward(ids) -> (main logits [b, s, V], [head k logits [b, s, V] for k = 1..K])."""

    def __init__(self, main: nn.Module, mtp: nn.Module, detach_heads: bool = False):
        super().__init__()
        for name in _SHARED:
            module = mtp._modules.pop(name, None)
            if module is not None:
                object.__setattr__(mtp, name, module)  # a plain attribute: called, not registered
        self.main = main
        self.mtp = mtp
        self.detach_heads = detach_heads  # mtp.detach_heads: no head gradient reaches the main model

    @property
    def num_heads(self) -> int:
        return len(self.mtp.layers)

    def forward(self, input_ids: torch.Tensor, with_heads: bool = True):
        """Depth k at t sees h_{k-1}[t] and token t+k (ids rolled left k times, zero-filled), as megatron trains
        the heads and as hf_mtp.teacher_forced_logits scores them: head k at t predicts token t+k+1."""
        hidden = self.main.get_decoder()(input_ids=input_ids).last_hidden_state
        logits = self.main.lm_head(hidden)
        heads = []
        if with_heads:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None].expand_as(input_ids)
            ids, h = input_ids, hidden.detach() if self.detach_heads else hidden
            for k in range(self.num_heads):
                ids = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], dim=1)
                embeds = self.mtp.embed_tokens(ids)
                if self.detach_heads:
                    embeds = embeds.detach()
                h = forward_mtp_layer(self.mtp, k, h, positions, inputs_embeds=embeds)
                heads.append(self.mtp._project_to_logits(h))
        return logits, heads


def load_with_heads(
    path: str, num_heads: int, *, dtype: torch.dtype, device: torch.device, detach_heads: bool = False
) -> ModelWithHeads:
    """The export at `path` with its first `num_heads` heads (hf_mtp.load_mtp_model), on `device`."""
    from transformers import AutoModelForCausalLM

    from mtpd_megatron.inference.hf_mtp import load_mtp_model

    main = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device)
    mtp = load_mtp_model(main, path, num_heads)
    return ModelWithHeads(main, mtp, detach_heads)


def head_tensors(wrapper: ModelWithHeads, state: Optional[dict] = None) -> dict:
    """The heads' tensors named as in the export (`model.layers.{L+k}.*`, DeepSeek-V3 layout, mtp_heads.py).

    transformers' MtpModel names them layers.{k}.{enorm, hnorm, eh_proj, post_norm, mtp_block.*}; the inner
    decoder layer's names are the main model's in-memory names, so the main model's own save-time conversion
    (transformers' revert_weight_conversion, e.g. fused MoE experts back to per-expert tensors) is applied to
    them as save_pretrained applies it to the main layers. `state` (default: the heads' state dict) lets a
    ZeRO-3 caller pass gathered tensors.
    """
    from transformers.core_model_loading import revert_weight_conversion

    num_layers = wrapper.main.config.get_text_config().num_hidden_layers
    state = wrapper.mtp.state_dict() if state is None else state
    renamed = {}
    for name, t in state.items():
        parts = name.split(".")
        if parts[0] != "layers" or not parts[1].isdigit():
            raise ValueError(f"MTP head tensor {name}: not under layers.<k> (an MtpModel of an unknown layout)")
        prefix, rest = f"model.layers.{num_layers + int(parts[1])}.", ".".join(parts[2:])
        if rest.startswith("mtp_block."):
            rest = rest[len("mtp_block.") :]
        elif rest.startswith("post_norm."):
            rest = "shared_head.norm." + rest[len("post_norm.") :]
        renamed[prefix + rest] = t.detach()
    return dict(revert_weight_conversion(wrapper.main, renamed))


def rotary_buffers(module: nn.Module) -> dict:
    """fp32 copies of every rotary embedding's inverse frequencies (restored after DeepSpeed's bf16 cast, which
    casts buffers as well and would round RoPE's frequencies to bf16)."""
    return {
        m: {n: b.detach().clone() for n, b in m.named_buffers(recurse=False) if "inv_freq" in n}
        for m in module.modules()
        if any("inv_freq" in n for n, _ in m.named_buffers(recurse=False))
    }


def restore_buffers(saved: dict) -> None:
    for m, buffers in saved.items():
        for n, b in buffers.items():
            setattr(m, n, b.to(getattr(m, n).device))


def export_meta(path: str | Path) -> dict:
    """What is written next to the heads: the source export's head description (mtp_heads.read_source)."""
    from mtpd_megatron.convert.mtp_heads import read_source

    return read_source(str(path))
