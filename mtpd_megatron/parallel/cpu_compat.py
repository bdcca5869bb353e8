"""CPU + gloo compatibility layer for megatron-core 0.19.2 — tests and the CPU demo only.

megatron-core assumes CUDA in a handful of places (RNG tracker, `torch.cuda.current_device()` as a device,
CUDA streams in the MoE dispatcher, `device='cuda'` literals and `.type() == 'torch.cuda.FloatTensor'` checks
in the optimizer). This module answers each of them, one patch per megatron-core line, so that TP, EP
(alltoall and allgather dispatchers), sequence parallel, MTP, megatron DDP, the DistributedOptimizer and
dist_checkpointing run on CPU processes joined by gloo.

Rules:
* Switched on once per process by `enable()`, from the entry points only: `launch.init_distributed` (train,
  looped, tools that start a world) when the run's device is the CPU, `convert.megatron_world` (converters),
  and the test harness (tests/conftest.py for the pytest process, the spawned ranks of
  tests/distributed_harness.py). No other module enters it: megatron's CUDA literals are
  answered here, inside megatron's own functions (`_MAPPED`), not around our call sites.
* Refuses to run when a GPU is visible (it must never change GPU behaviour) and when the installed
  megatron-core is not the pinned version (each patch is written against that version's lines).
* `import_shims()` is the one import-time piece: megatron-core 0.19.2 imports `triton` at import time
  (transformer/moe/ops/paged_stash.py:4, paged stashing is a CUDA-only feature); where triton is absent
  that single module is stubbed. On a GPU machine triton exists and nothing is stubbed.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import sys
import types

# torch is imported inside the functions: `import mtpd_megatron` runs import_shims() and must stay cheap for
# the command-line tools that never touch torch (config checks, corpus fetch).

PINNED_MEGATRON_CORE = "0.19.2"
_ENABLED = False


class CompatError(RuntimeError):
    """The layer cannot be used here (wrong megatron-core version, or a GPU is visible)."""


def installed_megatron_version() -> str:
    try:
        return importlib.metadata.version("megatron-core")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def check_version(installed: str | None = None) -> None:
    installed = installed or installed_megatron_version()
    if installed != PINNED_MEGATRON_CORE:
        raise CompatError(
            f"megatron-core {installed} is installed but the CPU compatibility layer is written for "
            f"{PINNED_MEGATRON_CORE}: run `pip install --no-deps --ignore-requires-python "
            f"megatron-core=={PINNED_MEGATRON_CORE}` (or tools/setup_env.sh)"
        )


def import_shims() -> None:
    """Stub megatron/core/transformer/moe/ops/paged_stash.py (its line 4 imports triton) when triton is absent."""
    name = "megatron.core.transformer.moe.ops.paged_stash"
    if name in sys.modules or importlib.util.find_spec("triton") is not None:
        return
    stub = types.ModuleType(name)
    stub.__doc__ = "mtpd_megatron stub: paged stashing needs triton + CUDA; unused on CPU."

    def _unavailable(*args, **kwargs):
        raise CompatError("paged stashing needs triton and CUDA")

    def __getattr__(attr: str):  # any kernel name imported from it (moe/paged_stash.py:12)
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _unavailable

    stub.__getattr__ = __getattr__
    sys.modules[name] = stub


# --------------------------------------------------------------------------------------------------------
# Individual patches. Each names the megatron-core 0.19.2 line it answers.
# --------------------------------------------------------------------------------------------------------


class _NoStream:
    """Stands in for torch.cuda.Stream/Event: work on CPU is synchronous, so waits are no-ops."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args):
        pass

    def wait_event(self, *args):
        pass

    def record_event(self, *args):
        return _NoStream()

    def record(self, *args):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def __eq__(self, other):
        return isinstance(other, _NoStream)

    def __hash__(self):
        return 0


_CURRENT_STREAM = _NoStream()


def _patch_torch_cuda() -> None:
    import torch

    cuda = torch.cuda
    # tensor_parallel/random.py:303-308 (CudaRNGStatesTracker.add) and :490 (model_parallel_cuda_manual_seed):
    # the tracker keeps per-region RNG states; on CPU they are states of the CPU default generator.
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = cuda.manual_seed
    # models/common/embeddings/rotary_pos_embedding.py:162, tensor_parallel/mappings.py:446,
    # distributed/param_and_grad_buffer.py, optimizer/distrib_optimizer.py:998, and
    # transformer/multi_token_prediction.py:192 (roll_tensor under CP: receive buffers): the current device.
    cuda.current_device = lambda: "cpu"
    # transformer/moe/token_dispatcher.py:469 (Stream), :922-925 (current_stream, stream context).
    cuda.Stream = _NoStream
    cuda.Event = _NoStream
    cuda.current_stream = lambda device=None: _CURRENT_STREAM
    cuda.stream = lambda s=None: contextlib.nullcontext()
    cuda.synchronize = lambda device=None: None
    cuda.is_current_stream_capturing = lambda: False


def _patch_megatron() -> None:
    import torch
    from megatron.core.fusions import fused_softmax
    from megatron.core.tensor_parallel import random as tp_random
    from megatron.core.transformer import utils as tf_utils
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    # tensor_parallel/random.py:104 _get_cuda_rng_state / :135 _set_cuda_rng_state (fork/unfork of the
    # tracker) -> the CPU generator.
    tp_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    tp_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)

    # transformer/utils.py:39 get_default_causal_mask builds the mask with device="cuda"
    # (used by fusions/fused_softmax.py:327 in megatron's reference attention).
    @functools.lru_cache(maxsize=32)
    def causal_mask_cpu(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq), diagonal=1).bool()

    tf_utils.get_default_causal_mask = causal_mask_cpu
    fused_softmax.get_default_causal_mask = causal_mask_cpu

    # transformer/moe/moe_utils.py:1184 maybe_move_tensor_to_cpu only converts CUDA tensors, so on CPU the
    # split sizes stay tensors and gloo's all_to_all_single (tensor_parallel/mappings.py:460) raises a
    # TypeError. Convert CPU tensors too when numpy is asked for.
    original = moe_utils.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor) and not tensor.is_cuda and as_numpy:
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu

    # models/common/embeddings/rope_utils.py:62-64 get_pos_emb_on_this_cp_rank (CP > 1) builds its chunk
    # index with pin_memory=True and .cuda(); imported by name into rotary_pos_embedding.py:26 and
    # yarn_rotary_pos_embedding.py:13. Run megatron's function under the CUDA->CPU mapping.
    from megatron.core.models.common.embeddings import rotary_pos_embedding, yarn_rotary_pos_embedding

    original_pos_emb = rotary_pos_embedding.get_pos_emb_on_this_cp_rank

    @functools.wraps(original_pos_emb)
    def get_pos_emb_on_this_cp_rank(*args, **kwargs):
        with _cuda_to_cpu_mode()():
            return original_pos_emb(*args, **kwargs)

    rotary_pos_embedding.get_pos_emb_on_this_cp_rank = get_pos_emb_on_this_cp_rank
    yarn_rotary_pos_embedding.get_pos_emb_on_this_cp_rank = get_pos_emb_on_this_cp_rank


# --------------------------------------------------------------------------------------------------------
# megatron's optimizer and schedules are full of device='cuda' literals and CUDA type-string checks.
# --------------------------------------------------------------------------------------------------------

_CUDA_TYPE = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


def _is_cuda_device(device) -> bool:
    import torch

    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, int)


@functools.lru_cache(maxsize=1)
def _cuda_to_cpu_mode() -> type:
    """Maps the optimizer's CUDA assumptions to CPU while active.

    Answers optimizer/optimizer.py:1249 (`device='cuda'` scale tensor), optimizer/clip_grads.py:96/108/112/
    180/231 (`device='cuda'` norms and buffers; `.type() == 'torch.cuda.FloatTensor'` at :174),
    optimizer/distrib_optimizer.py:401/466/758 (`model_param.type()` checks), pipeline_parallel/schedules.py
    (`device="cuda"` token counter), plus `Tensor.cuda()` calls and `pin_memory=True` (rope_utils.py:63).
    """
    import torch

    factories = {
        torch.tensor,
        torch.zeros,
        torch.ones,
        torch.empty,
        torch.full,
        torch.arange,
        torch.zeros_like,
        torch.ones_like,
        torch.empty_like,
        torch.full_like,
        torch.as_tensor,
    }

    class CudaToCpu(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = dict(kwargs or {})
            if func in factories and _is_cuda_device(kwargs.get("device")):
                kwargs["device"] = "cpu"
            if func in factories and kwargs.get("pin_memory"):  # pinned memory needs an accelerator
                kwargs["pin_memory"] = False
            elif func is torch.Tensor.type and len(args) == 1 and not kwargs:
                name = func(*args)
                return _CUDA_TYPE.get(name, name)
            elif func is torch.Tensor.cuda:
                return args[0]
            elif func is torch.Tensor.to and _is_cuda_device(kwargs.get("device")):
                kwargs["device"] = "cpu"
            return func(*args, **kwargs)

    return CudaToCpu


# megatron-core 0.19.2 functions whose bodies hold CUDA literals: each runs under the CUDA->CPU mapping.
# (module, attribute path, the lines it answers)
_MAPPED = (
    (
        "megatron.core.pipeline_parallel.schedules",
        "forward_backward_no_pipelining",
        'pipeline_parallel/schedules.py:749 total_num_tokens = torch.zeros(..., device="cuda")',
    ),
    (
        "megatron.core.pipeline_parallel.schedules",
        "forward_backward_pipelining_with_interleaving",
        'pipeline_parallel/schedules.py:1121 total_num_tokens = torch.zeros(..., device="cuda")',
    ),
    (
        "megatron.core.pipeline_parallel.schedules",
        "forward_backward_pipelining_without_interleaving",
        'pipeline_parallel/schedules.py:2292 total_num_tokens = torch.zeros(..., device="cuda")',
    ),
    (
        "megatron.core.models.common.language_module.language_module",
        "LanguageModule.setup_embeddings_and_output_layer",
        "models/common/language_module/language_module.py:307 weight.data = weight.data.cuda() (PP > 1)",
    ),
    (
        "megatron.core.optimizer.optimizer",
        "MixedPrecisionOptimizer.__init__",
        "optimizer/optimizer.py:690/698/702 found_inf, _dummy_overflow_buf, _scale_one with device='cuda'",
    ),
    (
        "megatron.core.optimizer.optimizer",
        "Float16OptimizerWithFloat16Params.__init__",
        "optimizer/optimizer.py:1028 param.type() == 'torch.cuda.FloatTensor'",
    ),
    (
        "megatron.core.optimizer.optimizer",
        "FP32Optimizer.__init__",
        "optimizer/optimizer.py:1249 self._scale = torch.tensor(..., device='cuda')",
    ),
    (
        "megatron.core.optimizer.optimizer",
        "MegatronOptimizer.step",
        "optimizer/clip_grads.py:96/108/112/180/231 "
        "(device='cuda' norms and buffers) and :174 (.type() == 'torch.cuda.FloatTensor'), through step()",
    ),
    ("megatron.core.optimizer.optimizer", "MixedPrecisionOptimizer.step", "as MegatronOptimizer.step"),
    ("megatron.core.optimizer.optimizer", "FP32Optimizer.step", "as MegatronOptimizer.step"),
    ("megatron.core.optimizer.optimizer", "ChainedOptimizer.step", "as MegatronOptimizer.step"),
    (
        "megatron.core.optimizer.optimizer",
        "ChainedOptimizer.load_state_dict",
        "optimizer/optimizer.py:586/591 p.data.cuda(), v.cuda() (state moved back after loading)",
    ),
    ("megatron.core.optimizer.optimizer", "ChainedOptimizer._synchronize_steps", "as ChainedOptimizer.load_state_dict"),
    (
        "megatron.core.optimizer.optimizer",
        "Float16OptimizerWithFloat16Params.load_state_dict",
        "as ChainedOptimizer.load_state_dict",
    ),
    ("megatron.core.optimizer.optimizer", "FP32Optimizer.load_state_dict", "as ChainedOptimizer.load_state_dict"),
    (
        "megatron.core.optimizer.optimizer",
        "Float16OptimizerWithFloat16Params.sharded_state_dict",
        "as ChainedOptimizer.load_state_dict",
    ),
    ("megatron.core.optimizer.optimizer", "FP32Optimizer.sharded_state_dict", "as ChainedOptimizer.load_state_dict"),
    ("megatron.core.optimizer.optimizer", "ChainedOptimizer.sharded_state_dict", "as ChainedOptimizer.load_state_dict"),
    (
        "megatron.core.optimizer.distrib_optimizer",
        "DistributedOptimizer.__init__",
        "optimizer/distrib_optimizer.py:466 model_param.type() == 'torch.cuda.FloatTensor'",
    ),
    (
        "megatron.core.optimizer.distrib_optimizer",
        "DistributedOptimizer.load_state_dict",
        "optimizer/distrib_optimizer.py:1374 send_tensor.cuda() and the state gathers on the current device",
    ),
    (
        "megatron.core.optimizer.distrib_optimizer",
        "DistributedOptimizer.sharded_state_dict",
        "as DistributedOptimizer.load_state_dict",
    ),
    (
        "megatron.core.optimizer.distrib_optimizer",
        "DistributedOptimizer.load_parameter_state_from_fully_reshardable",
        "as DistributedOptimizer.load_state_dict",
    ),
    (
        "megatron.core.optimizer.distrib_optimizer",
        "DistributedOptimizer.load_parameter_state_from_dp_reshardable",
        "as DistributedOptimizer.load_state_dict",
    ),
    (
        "megatron.core.optimizer.distrib_optimizer",
        "DistributedOptimizer.load_parameter_state_from_fs_model_space",
        "as DistributedOptimizer.load_state_dict",
    ),
)

_DEPTH = [0]  # nesting of mapped calls (a mapped method calling another enters the mode once)


def _mapped(fn):
    mode = _cuda_to_cpu_mode()

    @functools.wraps(fn)
    def under_mapping(*args, **kwargs):
        if _DEPTH[0]:
            return fn(*args, **kwargs)
        _DEPTH[0] += 1
        try:
            with mode():
                return fn(*args, **kwargs)
        finally:
            _DEPTH[0] -= 1

    under_mapping.__mtpd_cpu_compat__ = True
    return under_mapping


def _patch_cuda_literals() -> None:
    """Run each of `_MAPPED` under the CUDA->CPU mapping. Functions are replaced in their module (megatron's
    get_forward_backward_func looks its schedules up there at call time); methods on their class."""
    import importlib

    for module_name, path, _lines in _MAPPED:
        owner = importlib.import_module(module_name)
        *outer, name = path.split(".")
        for part in outer:
            owner = getattr(owner, part)
        original = owner.__dict__[name]  # KeyError: the pinned version's layout changed (check_version guards)
        if not getattr(original, "__mtpd_cpu_compat__", False):
            setattr(owner, name, _mapped(original))


def enable() -> None:
    """Switch the layer on for this (CPU-only) process. Idempotent."""
    global _ENABLED
    if _ENABLED:
        return
    import torch

    if torch.cuda.is_available():
        raise CompatError("the CPU compatibility layer must not be enabled in a process that sees a GPU")
    check_version()
    import_shims()
    _patch_torch_cuda()
    _patch_megatron()
    _patch_cuda_literals()
    _ENABLED = True


def is_enabled() -> bool:
    return _ENABLED
