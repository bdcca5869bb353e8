"""Self-speculative greedy decoding on the Hugging Face side with the exported MTP heads.

The main model is the stock transformers class (`AutoModelForCausalLM`, no remote code); the MTP heads are
rebuilt here as plain torch modules from the DeepSeek-layout tensors `model.layers.{L+k}.*` that
`to_hf` writes (transformers ignores them). Each head reuses the class's own decoder layer (same structure
as the last decoder layer, like megatron's MTP inner layer), norm class, embedding and LM head, and follows
megatron's MTP forward exactly:

    h_k[t] = final_norm_k( layer_k( eh_proj_k( cat(enorm_k(embed(x[t+k])), hnorm_k(h_{k-1}[t])) ) ) )
    logits_k[t] = lm_head(h_k[t])          (h_0 = the main model's final-normed hidden state)

Decoding (greedy, batch 1): after the main model has produced token x[n], head 1 drafts x[n+1] from
h_0[n-1] and x[n], head 2 drafts x[n+2] from h_1[n-1] and the draft, and so on (K drafts from the cascade).
The main model then verifies [x[n], d_1..d_K] in one forward with its DynamicCache, accepts the longest
prefix that matches its own greedy choices plus one bonus token, and the cache is cropped to the accepted
length. The output is therefore exactly greedy decoding (`generate(do_sample=False)`), whatever the drafts.

Each head keeps its own cache of positions whose inputs are final (token t+k already accepted); positions
that depend on drafts are recomputed on the next step and cropped away, so the heads see exactly the inputs
they would see with the whole sequence known (`full_recompute=True` checks that against a cache-free path).
"""

from __future__ import annotations

import inspect
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from mtpd_megatron.convert import ConvertError


def _cache_kwarg(fn) -> str:
    """transformers 5.24 calls the cache argument `cache` (deprecating `past_key_values`)."""
    return "cache" if "cache" in inspect.signature(fn).parameters else "past_key_values"


def crop_cache(cache, length: int) -> None:
    """Crop a DynamicCache to `length` positions (5.x takes a negative count to remove, 4.x a max length)."""
    current = cache.get_seq_length()
    if current <= length:
        return
    param = next(iter(inspect.signature(cache.crop).parameters))
    cache.crop(length - current if param == "tokens_to_remove" else length)


def causal_mask(start: int, q_len: int, kv_len: int, dtype: torch.dtype, device=None) -> torch.Tensor:
    """Additive [1, 1, q_len, kv_len] mask: query i (absolute position start+i) sees keys 0..start+i."""
    q = torch.arange(start, start + q_len, device=device)[:, None]
    k = torch.arange(kv_len, device=device)[None, :]
    mask = torch.zeros(q_len, kv_len, dtype=dtype, device=device)
    return mask.masked_fill(k > q, torch.finfo(dtype).min)[None, None]


class MTPHead(nn.Module):
    """One exported MTP head: enorm, hnorm, eh_proj, a decoder layer of the model's class, shared_head.norm."""

    def __init__(self, model: nn.Module):
        super().__init__()
        conf = model.config
        base = model.model
        hidden = conf.hidden_size
        norm_cls = type(base.norm)
        self.enorm = norm_cls(hidden, eps=conf.rms_norm_eps)
        self.hnorm = norm_cls(hidden, eps=conf.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * hidden, hidden, bias=False)
        self.layer = type(base.layers[-1])(conf, layer_idx=conf.num_hidden_layers - 1)
        self.layer.self_attn.layer_idx = 0  # the head's own one-layer cache
        self.final_norm = norm_cls(hidden, eps=conf.rms_norm_eps)
        self._cache_kw = _cache_kwarg(self.layer.forward)

    def forward(self, hidden: torch.Tensor, token_emb: torch.Tensor, position_ids: torch.Tensor,
                position_embeddings, mask: torch.Tensor, cache=None) -> torch.Tensor:
        x = self.eh_proj(torch.cat([self.enorm(token_emb), self.hnorm(hidden)], dim=-1))
        x = self.layer(x, attention_mask=mask, position_ids=position_ids, use_cache=cache is not None,
                       position_embeddings=position_embeddings, **{self._cache_kw: cache})
        if isinstance(x, tuple):
            x = x[0]
        return self.final_norm(x)


# ---------------------------------------------------------------------------------------------------------
# Loading the heads
# ---------------------------------------------------------------------------------------------------------


def _head_tensors(path: Path, layer: int) -> dict:
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    prefix = f"model.layers.{layer}."
    out = {}
    for name in files:
        with safe_open(str(path / name), framework="pt") as f:
            for key in f.keys():
                if key.startswith(prefix):
                    out[key[len(prefix):]] = f.get_tensor(key)
    return out


def _to_module_names(tensors: dict, module_keys: set, expert_proj: tuple) -> dict:
    """Hub (per-expert) names -> the layer module's names (transformers 5 packs experts in 3-D tensors)."""
    out = {}
    experts: dict = {}
    pattern = re.compile(r"^(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight$")
    for name, t in tensors.items():
        m = pattern.match(name)
        if m and name not in module_keys:
            experts.setdefault(m.group(2), {})[int(m.group(1))] = t
            continue
        if name.startswith("block_sparse_moe.") and name not in module_keys:
            name = "mlp." + name[len("block_sparse_moe."):]
        out[name] = t
    if experts:
        gate, up, down = expert_proj
        n = len(experts[gate])
        out["mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([experts[gate][e], experts[up][e]], dim=0) for e in range(n)])
        out["mlp.experts.down_proj"] = torch.stack([experts[down][e] for e in range(n)])
    return out


def load_heads(model: nn.Module, path: str | Path, num_heads: Optional[int] = None) -> nn.ModuleList:
    """Build the MTP heads of an exported directory on top of the loaded HF `model`."""
    from mtpd_megatron.convert.mapping import ARCHS

    path = Path(path)
    conf = model.config
    available = int(getattr(conf, "num_nextn_predict_layers", 0) or 0)
    num = available if num_heads is None else num_heads
    if num > available:
        raise ConvertError(f"{path}: {available} MTP heads exported, {num} asked for")
    arch = ARCHS.get(conf.model_type)
    expert_proj = arch.expert_proj if arch else ("gate_proj", "up_proj", "down_proj")
    heads = nn.ModuleList()
    dtype = next(model.parameters()).dtype
    for k in range(num):
        head = MTPHead(model)
        tensors = _head_tensors(path, conf.num_hidden_layers + k)
        if not tensors:
            raise ConvertError(f"{path}: no tensors model.layers.{conf.num_hidden_layers + k}.* for MTP head {k + 1}")
        layer_keys = set(head.layer.state_dict())
        own = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight", "eh_proj.weight": "eh_proj.weight",
               "shared_head.norm.weight": "final_norm.weight"}
        state = {own[n]: t for n, t in tensors.items() if n in own}
        shared = ("shared_head.", "embed_tokens.")  # DeepSeek files may repeat the shared head/embedding
        rest = {n: t for n, t in tensors.items() if n not in own and not n.startswith(shared)}
        state.update({f"layer.{n}": t for n, t in _to_module_names(rest, layer_keys, expert_proj).items()})
        head.to(dtype)
        keep_fp32 = tuple(getattr(model, "_keep_in_fp32_modules_strict", None) or ())  # GLM's router
        for name, t in list(head.named_parameters()) + list(head.named_buffers()):
            if name.endswith(keep_fp32) and keep_fp32:
                t.data = t.data.float()
        missing, unexpected = head.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ConvertError(f"{path}: MTP head {k + 1} tensors do not fit the model class "
                               f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        heads.append(head)
    return heads.eval()


# ---------------------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------------------


@dataclass
class DecodeResult:
    tokens: list                       # prompt + generated
    new_tokens: list                   # generated only
    steps: int = 0                     # main-model forwards after the prefill
    drafted: int = 0
    accepted: int = 0
    accepted_at: list = field(default_factory=list)   # per draft position: how often it was accepted
    drafts: list = field(default_factory=list)        # the drafts of every step (for tests)

    @property
    def tokens_per_step(self) -> float:
        return len(self.new_tokens) / max(1, self.steps + 1)


class HFMTPDecoder:
    """Greedy self-speculative decoding: stock HF model + exported MTP heads. Batch size 1."""

    def __init__(self, model: nn.Module, heads: nn.ModuleList, vocab_limit: Optional[int] = None):
        self.model = model.eval()
        self.heads = heads
        self.vocab_limit = vocab_limit  # ids >= this are megatron's padding rows: never predicted
        self.base = model.model
        self.embed = model.get_input_embeddings()
        self.lm_head = model.get_output_embeddings()
        self._model_cache_kw = _cache_kwarg(self.base.forward)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype = torch.float32,
                        num_heads: Optional[int] = None, **kwargs) -> "HFMTPDecoder":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **kwargs)
        from mtpd_megatron.convert.to_hf import exported_vocab_size

        return cls(model, load_heads(model, path, num_heads), vocab_limit=exported_vocab_size(path))

    @property
    def device(self):
        return next(self.model.parameters()).device

    def _argmax(self, logits: torch.Tensor) -> torch.Tensor:
        return logits[..., : self.vocab_limit].argmax(-1)

    # -- pieces -------------------------------------------------------------------------------------------

    def _main(self, ids: torch.Tensor, start: int, cache):
        pos = torch.arange(start, start + ids.shape[1], device=ids.device)[None]
        out = self.base(input_ids=ids, position_ids=pos, use_cache=True, **{self._model_cache_kw: cache})
        hidden = out.last_hidden_state
        return hidden, self.lm_head(hidden)

    def _head(self, k: int, hidden: torch.Tensor, tokens: torch.Tensor, start: int, cache=None) -> torch.Tensor:
        """Head k (0-based) over positions start.. (len = hidden.shape[1]); `cache` holds positions < start."""
        n = hidden.shape[1]
        pos = torch.arange(start, start + n, device=hidden.device)[None]
        emb = self.embed(tokens)
        pe = self.base.rotary_emb(emb, pos)
        mask = causal_mask(start, n, start + n, emb.dtype, emb.device)
        return self.heads[k](hidden, emb, pos, pe, mask, cache)

    @torch.no_grad()
    def mtp_logits(self, input_ids: torch.Tensor) -> list:
        """Teacher-forced logits of every head over a whole sequence, as megatron computes them in training:
        depth k at t sees token t+k (ids rolled left k times, zero-filled) -> [b, s, V] per head."""
        hidden = self.base(input_ids=input_ids).last_hidden_state
        ids = input_ids
        out = []
        for k in range(len(self.heads)):
            ids = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], dim=1)
            hidden = self._head(k, hidden, ids, 0)
            out.append(self.lm_head(hidden))
        return out

    # -- decoding -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int, *, num_draft: Optional[int] = None,
                 eos_token_id: Optional[int | Sequence[int]] = None,
                 drafter: Optional[Callable[[list, int], list]] = None,
                 full_recompute: bool = False) -> DecodeResult:
        """Greedy decoding with K = num_draft (default: every head) drafts per step.

        drafter(tokens so far, k) -> k draft tokens replaces the heads (tests the verification path);
        full_recompute=True recomputes the heads over the whole sequence each step (reference for the caches).
        """
        from transformers import DynamicCache

        ids = torch.as_tensor(input_ids, device=self.device).reshape(1, -1)
        K = len(self.heads) if num_draft is None else num_draft
        if drafter is None and K > len(self.heads):
            raise ConvertError(f"num_draft={K} but only {len(self.heads)} MTP heads are loaded")
        eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
        prompt = ids[0].tolist()
        p = len(prompt)
        res = DecodeResult(tokens=[], new_tokens=[], accepted_at=[0] * K)
        if max_new_tokens <= 0:
            res.tokens = prompt
            return res

        cache = DynamicCache()
        hidden, logits = self._main(ids, 0, cache)
        seq = prompt + [int(self._argmax(logits[0, -1]))]
        h0 = hidden                                   # main hidden, positions 0..n-1
        n = p
        head_hidden = [h0[:, :0] for _ in range(K)]   # per head: outputs of final positions
        head_cache = [DynamicCache() for _ in range(K)]

        def done() -> bool:
            return len(seq) - p >= max_new_tokens or any(t in eos for t in seq[p:])

        while not done():
            k_step = min(K, max_new_tokens - (len(seq) - p) - 1)
            if k_step <= 0:
                drafts = []
            elif drafter is not None:
                drafts = [int(t) for t in drafter(list(seq), k_step)][:k_step]
            elif full_recompute:
                drafts = self._draft_full(seq, h0, n, k_step)
            else:
                drafts = self._draft(seq, h0, n, k_step, head_hidden, head_cache)
            res.drafts.append(drafts)
            inp = torch.tensor([seq[n:n + 1] + drafts], device=self.device)
            hidden, logits = self._main(inp, n, cache)
            greedy = self._argmax(logits[0]).tolist()
            a = 0
            while a < len(drafts) and drafts[a] == greedy[a]:
                res.accepted_at[a] += 1
                a += 1
            seq.extend(drafts[:a] + [greedy[a]])
            crop_cache(cache, n + 1 + a)
            h0 = torch.cat([h0, hidden[:, : a + 1]], dim=1)
            n += a + 1
            res.steps += 1
            res.drafted += len(drafts)
            res.accepted += a

        new = seq[p:][:max_new_tokens]
        for i, t in enumerate(new):
            if t in eos:
                new = new[: i + 1]
                break
        res.new_tokens, res.tokens = new, prompt + new
        return res

    def _draft(self, seq: list, h0: torch.Tensor, n: int, K: int, head_hidden: list, head_cache: list) -> list:
        """K cascaded drafts for positions n+1..n+K using the heads' caches of final positions."""
        drafts: list = []
        prev = h0  # positions 0..n-1 of the previous depth
        for k in range(K):
            depth = k + 1
            c = head_hidden[k].shape[1]
            ext = seq + drafts
            tokens = torch.tensor([ext[c + depth: n + depth]], device=self.device)
            out = self._head(k, prev[:, c:n], tokens, c, head_cache[k])
            full = torch.cat([head_hidden[k], out], dim=1)
            drafts.append(int(self._argmax(self.lm_head(full[:, -1]))))
            keep = max(0, n - depth + 1)  # positions whose token t+depth is accepted (not a draft)
            head_hidden[k] = full[:, :keep]
            crop_cache(head_cache[k], keep)
            prev = full
        return drafts

    def _draft_full(self, seq: list, h0: torch.Tensor, n: int, K: int) -> list:
        """Reference drafting without caches: every head over positions 0..n-1."""
        drafts: list = []
        prev = h0
        for k in range(K):
            ext = seq + drafts
            tokens = torch.tensor([ext[k + 1: n + k + 1]], device=self.device)
            prev = self._head(k, prev, tokens, 0)
            drafts.append(int(self._argmax(self.lm_head(prev[:, -1]))))
        return drafts


__all__ = ["DecodeResult", "HFMTPDecoder", "MTPHead", "causal_mask", "crop_cache", "load_heads"]
