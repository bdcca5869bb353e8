"""The pretraining loop: megatron DDP + megatron optimizer + megatron's pipeline schedules, with MTP-D.

`Trainer(cfg, tokenizer, device, resume=...)` builds datasets, model (GPTModel + MTP heads, MTP-D attached),
DDP, optimizer, LR schedule and checkpoint manager, and resumes; `fit()` trains and returns an exit code.

One step (`train_step`): zero the grad buffers -> `get_forward_backward_func()` runs the micro-batches
(gradient accumulation, and the 1F1B schedule when PP > 1) and calls `finalize_model_grads` (DP all-reduce,
SP norm all-reduce, MoE expert-bias update) -> all ranks agree on the loss, on non-finite losses and on
preemption (one all-reduce) -> clip + AdamW + LR step, or a skipped update.

Losses. The main loss is the masked mean of the per-token main cross-entropy per micro-batch, averaged over
micro-batches and data-parallel ranks (megatron's `calculate_per_token_loss=False` convention). The MTP
heads' losses (CE + MTP-D KL) are not added to it: they ride on the hidden states through megatron's
`MTPLossAutoScaler`, whose backward scale the schedule sets from `config.grad_scale_func` divided by the
number of micro-batches (schedules.py, forward_step_calc_loss); the MoE aux loss rides the same way on
`MoEAuxLossAutoScaler`. So the logged `loss` is the main LM loss; the heads are logged per head.

Exit codes (returned by `fit`, see train.py): 0 done, 3 too many non-finite losses in a row
(`training.max_consecutive_nan_steps`) or a run that ends on non-finite steps, EXIT_PREEMPTED = 75 after
SIGTERM/SIGUSR1 (the step in flight finishes, a checkpoint is saved, the job can be requeued). A failed save
raises CheckpointSaveError (train.py: one line, exit 2 for space/quota/permissions, 1 for other I/O errors).

Checkpoints hold only healthy states: none is written while the last step was non-finite (a diverging run
would otherwise fill keep-last with its streak and prune the good ones), and none before the first optimizer
update (the optimizer has no state to save; resuming from it would be a fresh start that skips data).
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module

from mtpd_megatron.checkpoint import CheckpointManager, TrainState
from mtpd_megatron.checkpoint.optimizer_state import prime_adam_state
from mtpd_megatron.checkpoint.weights import HF_IMPORT_STAGE, load_model_weights
from mtpd_megatron.config.schema import Config
from mtpd_megatron.data import build_dataloader, build_datasets
from mtpd_megatron.logging_utils import RunLogger, flops_per_token, peak_tflops
from mtpd_megatron.model.builder import build_model, padded_vocab_size
from mtpd_megatron.mtpd import hook as mtpd_hook
from mtpd_megatron.mtpd.metrics import FIELDS as MTPD_FIELDS
from mtpd_megatron.mtpd.metrics import MTPDMetrics
from mtpd_megatron.mtpd.metrics import summarize as summarize_mtpd
from mtpd_megatron.optim import build_optimizer, build_scheduler, current_lr, optimizer_step
from mtpd_megatron.parallel import context

EXIT_OK = 0
EXIT_USER_ERROR = 2
EXIT_NONFINITE = 3
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: checkpoint saved after SIGTERM/SIGUSR1; requeue and resume with --resume auto

_MOE_LOSS_NAMES = {
    "aux_loss": "load_balancing_loss",
    "seq_aux_loss": "seq_load_balancing_loss",
    "global_aux_loss": "global_load_balancing_loss",
}


class Preemption:
    """SIGTERM/SIGUSR1 only set a flag; the loop finishes its step, saves and exits with EXIT_PREEMPTED.

    Ctrl-C (SIGINT) does the same, so that an interactive stop keeps the work since the last checkpoint
    instead of printing a traceback; a second Ctrl-C interrupts at once (train.py: one line, exit 130).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self) -> None:
        self.signal: Optional[int] = None

    def install(self) -> "Preemption":
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signal = signum
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    @property
    def requested(self) -> bool:
        return self.signal is not None


@dataclass
class StepResult:
    loss: float
    grad_norm: Optional[float]
    applied: bool
    nonfinite: bool
    stop: bool


def params_dtype_for(cfg: Config, device: torch.device) -> torch.dtype:
    precision = cfg.training.precision
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


class Trainer:
    def __init__(
        self,
        cfg: Config,
        tokenizer,
        device: torch.device,
        *,
        resume: str = "auto",
        preemption: Optional[Preemption] = None,
        stage: str = "pretrain",
        prepare_model: Optional[Callable] = None,
        trained_heads: Optional[tuple] = None,
    ):
        """`prepare_model(gpt_model)` runs on the bare model before DDP wraps it (looped extension: load the
        previous stage, initialise new heads, freeze); `trained_heads` marks heads without a loss (frozen)."""
        # run_config: our typed YAML config (schema.py); megatron_config: megatron's TransformerConfig of the model
        self.run_config, self.device, self.stage = cfg, device, stage
        self.prepare_model, self.trained_heads = prepare_model, trained_heads
        self.preemption = preemption or Preemption()
        self.rank = dist.get_rank()
        t = cfg.training
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.cp_group = parallel_state.get_context_parallel_group()
        self.cp_rank = parallel_state.get_context_parallel_rank()
        self.cp_size = parallel_state.get_context_parallel_world_size()
        self.num_micro = t.global_batch_size // (t.micro_batch_size * self.dp_size)
        self.dtype = params_dtype_for(cfg, device)
        self.log = self._print if self.rank == 0 else (lambda line: None)
        self.mtpd_settings: Optional[mtpd_hook.MTPDSettings] = None  # set in _build_model when there are MTP heads
        self.mtpd_metrics: Optional[MTPDMetrics] = None

        # 1. Data and vocabulary: user errors surface here, before anything is written.
        self.vocab_size = cfg.model.vocab_size or tokenizer.vocab_size
        self.padded_vocab = padded_vocab_size(
            self.vocab_size, cfg.model.make_vocab_size_divisible_by, cfg.parallel.tensor_model_parallel_size
        )
        eval_samples = t.eval_iters * t.micro_batch_size * self.dp_size if t.eval_interval else 0
        self.train_ds, self.valid_ds, _ = build_datasets(
            cfg.data,
            tokenizer,
            seq_length=cfg.data.seq_length,
            seed=t.seed,
            num_samples=(t.train_iters * t.global_batch_size, eval_samples, 0),
        )

        # 2. Which checkpoint to resume from, and is it this model's (before building anything big).
        self.ckpt = CheckpointManager(
            cfg, vocab_size=self.vocab_size, padded_vocab_size=self.padded_vocab, stage=stage, log=self.log
        )
        self.resume_path = self.ckpt.resolve_resume(resume)
        self.init_weights_from = None
        if self.resume_path is not None:
            meta = self.ckpt.read_and_check(self.resume_path)
            if meta.get("stage") == HF_IMPORT_STAGE:  # weights only (tools/convert_from_hf.py): a fresh run
                self.init_weights_from, self.resume_path = self.resume_path, None

        # 3. Model, DDP, optimizer, schedule. megatron's MoE metrics tracker is process-global and sizes its
        # per-layer tensors on first use (num_layers + MTP layers of the model that first records): a fresh
        # one per trainer, so a second trainer in the process (tools/bench_train.py's arms) with more heads
        # does not index past an earlier trainer's entries.
        from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker

        destroy_moe_metrics_tracker()
        self.model = [self._build_model()]
        self.megatron_config = self.model[0].config
        self.optimizer = build_optimizer(cfg, self.model, self.dtype)
        self.scheduler = build_scheduler(cfg, self.optimizer)
        self.megatron_config.grad_scale_func = self.optimizer.scale_loss
        self.megatron_config.finalize_model_grads_func = finalize_model_grads
        if self.model[0].ddp_config.overlap_grad_reduce:
            self.megatron_config.no_sync_func = self.model[0].no_sync
            self.megatron_config.grad_sync_func = self.model[0].start_grad_sync
        self.forward_backward = get_forward_backward_func()

        # 4. Resume, then the data position.
        self.state = TrainState()
        if self.resume_path is not None:  # falls back to older checkpoints under --resume auto
            self.state = self.ckpt.load(self.resume_path, self.model, self.optimizer, self.scheduler)
            self.resume_path = self.ckpt.loaded_path
        self.train_iter = iter(
            build_dataloader(
                self.train_ds,
                t.micro_batch_size,
                self.dp_rank,
                self.dp_size,
                self.state.consumed_samples,
                cfg.data.num_workers,
            )
        )

        # 5. Logging (rank 0 only writes).
        self.flops_per_token = flops_per_token(cfg, self.vocab_size)
        self.peak = peak_tflops(device)
        log_dir = cfg.logging.tensorboard_dir or (f"{cfg.checkpoint.save}/tensorboard" if cfg.checkpoint.save else None)
        self.logger = RunLogger(
            cfg, enabled=self.rank == 0, log_dir=log_dir, total_iters=t.train_iters, start_iter=self.state.iteration
        )
        self._interval = {"losses": [], "time": 0.0, "steps": 0}

    def _print(self, line: str) -> None:
        logger = getattr(self, "logger", None)
        if logger is not None:
            logger.print(line)
        else:
            print(line, flush=True)

    # ------------------------------------------------------------------ build

    def _build_model(self) -> DistributedDataParallel:
        cfg = self.run_config
        model = build_model(cfg, self.padded_vocab, params_dtype=self.dtype)
        if cfg.mtp.num_heads:  # MTP-D, or plain MTP (beta = 0) with the same per-head metrics
            # The MTP heads' loss (mtpd/hook.py, in place of megatron's process_mtp_loss): its settings and the
            # per-head metrics it adds to are built here and handed to the hook.
            self.mtpd_settings = mtpd_hook.MTPDSettings.from_config(cfg.mtp, trained=self.trained_heads)
            self.mtpd_metrics = MTPDMetrics(cfg.mtp.num_heads)
            mtpd_hook.attach(model.config, self.mtpd_settings, self.mtpd_metrics, mtp_block=getattr(model, "mtp", None))
        if self.prepare_model is not None:
            self.prepare_model(model)
        if self.init_weights_from is not None:
            load_model_weights(model, self.init_weights_from, log=self.log)
            self.log(
                f"[checkpoint] initialised the weights from {self.init_weights_from} (imported; fresh "
                "optimizer and schedule)"
            )
        if self.device.type == "cuda":
            model.cuda(torch.cuda.current_device())
        if self.dtype == torch.bfloat16:
            model = Float16Module(model.config, model)
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=self.device.type == "cuda",
            use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        )
        return DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)

    # ------------------------------------------------------------------ one step

    def _forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        batch = {
            k: batch[k].to(self.device, non_blocking=True) for k in ("tokens", "labels", "loss_mask", "position_ids")
        }
        # CP: every rank of a CP group reads the same micro-batch and keeps its two chunks of the sequence
        # (Megatron-LM's get_batch_on_this_cp_rank); megatron's RoPE, MTP rolls and our attention follow.
        batch = context.split_batch(batch, self.cp_size, self.cp_rank)
        output = model(
            batch["tokens"], batch["position_ids"], None, labels=batch["labels"], loss_mask=batch["loss_mask"]
        )
        return output, partial(self._loss_func, batch["loss_mask"])

    def _loss_func(self, loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
        """(sum, tokens, report): the schedule divides by tokens and micro-batches before backward."""
        mask = loss_mask.float()
        total = (per_token_loss.float() * mask).sum()
        tokens = mask.sum()
        report = torch.stack([total.detach().clone(), tokens.detach().clone()])
        if self.cp_size > 1:
            # The loss is the whole sequence's: its sum and token count over the CP group. The schedule divides
            # by the local count and DDP averages gradients over DP x CP: scaled so that the gradient is
            # exactly that of (sum over the sequence) / (its tokens), as at CP = 1.
            dist.all_reduce(report, group=self.cp_group)
            total = total * (self.cp_size * tokens.clamp(min=1) / report[1].clamp(min=1))
        return total, tokens.to(torch.int), {"lm loss": report}

    def _grads_finite(self) -> bool:
        """No inf/NaN in this rank's gradient buffers (a finite loss can still give non-finite gradients)."""
        for chunk in self.model:
            for buffer in [*chunk.buffers, *chunk.expert_parallel_buffers]:
                if buffer.grad_data is not None and not torch.isfinite(buffer.grad_data).all():
                    return False
        return True

    def _agree(self, outputs: list, check_grads: bool = False) -> tuple[float, bool, bool]:
        """One all-reduce over the world: the global loss, any non-finite loss/grad, any preemption signal."""
        vec = torch.zeros(3, dtype=torch.float64, device=self.device)
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True) and outputs:
            reports = torch.stack([o["lm loss"].double() for o in outputs])
            local = (reports[:, 0] / reports[:, 1].clamp(min=1)).mean()
            if parallel_state.get_tensor_model_parallel_rank() == 0 and self.cp_rank == 0:  # CP: reports are summed
                vec[0] = local / self.dp_size
            vec[1] = float(not torch.isfinite(local).item())
        if check_grads and not self._grads_finite():
            vec[1] = 1.0
        vec[2] = float(self.preemption.requested)
        dist.all_reduce(vec)
        return vec[0].item(), bool(vec[1].item() > 0), bool(vec[2].item() > 0)

    def train_step(self) -> StepResult:
        t = self.run_config.training
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        outputs = self.forward_backward(
            forward_step_func=self._forward_step,
            data_iterator=self.train_iter,
            model=self.model,
            num_microbatches=self.num_micro,
            seq_length=self.run_config.data.seq_length,
            micro_batch_size=t.micro_batch_size,
            forward_only=False,
        )
        loss, nonfinite, stop = self._agree(outputs, check_grads=True)
        if nonfinite:  # skip the update: the grads of this step are dropped
            for chunk in self.model:
                chunk.zero_grad_buffer()
            self.optimizer.zero_grad()
            applied, grad_norm = False, None
        else:
            applied, grad_norm = optimizer_step(self.optimizer)
            if applied:
                self.scheduler.step(increment=1)
        self.state.iteration += 1
        self.state.consumed_samples += t.global_batch_size
        if not applied:
            self.state.skipped_steps += 1
        return StepResult(loss, grad_norm, applied, nonfinite, stop)

    # ------------------------------------------------------------------ metrics

    def _head_metrics(self) -> dict:
        """The MTP-D hook's per-head summary over the data- and context-parallel ranks, delivered to rank 0;
        then reset."""
        if not self.run_config.mtp.num_heads:
            return {}
        tracker = self.mtpd_metrics
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            summary = tracker.summary(group=parallel_state.get_data_parallel_group(with_context_parallel=True))
        else:  # no heads on this stage; same keys, values come from the last stage below
            summary = summarize_mtpd(torch.zeros(self.run_config.mtp.num_heads, len(MTPD_FIELDS), dtype=torch.float64))
        tracker.reset()
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:  # the heads live on the last stage
            keys = sorted(summary)
            vec = torch.tensor([summary[k] for k in keys], dtype=torch.float64, device=self.device)
            dist.broadcast(vec, src=dist.get_world_size() - 1)
            summary = dict(zip(keys, vec.tolist()))
        return summary

    def _moe_metrics(self, steps: int) -> dict:
        moe = self.run_config.model.moe
        name = _MOE_LOSS_NAMES.get(moe.load_balancing_type)
        if not moe.num_experts or name is None or moe.aux_loss_coeff <= 0:
            return {}
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

        totals: dict = {}
        get_moe_metrics_tracker().report(
            loss_scale=1.0 / (self.num_micro * max(steps, 1)),
            iteration=self.state.iteration,
            force_initialize=True,
            track_names=[name],
            num_layers=self.run_config.model.num_layers,
            moe_layer_freq=moe.layer_freq,
            mtp_num_layers=self.run_config.mtp.num_heads or None,
            total_loss_dict=totals,
        )
        return {f"moe/{k}": float(v) for k, v in totals.items()}

    def _log_interval(self, result: StepResult, step_time: float) -> None:
        iv = self._interval
        iv["time"] += step_time
        iv["steps"] += 1
        if math.isfinite(result.loss):
            iv["losses"].append(result.loss)
        self.logger.advance()
        t = self.run_config.training
        if self.state.iteration % self.run_config.logging.log_interval and self.state.iteration != t.train_iters:
            return
        steps, seconds = iv["steps"], max(iv["time"], 1e-9)
        tokens_per_s = steps * t.global_batch_size * self.run_config.data.seq_length / seconds
        tflops = tokens_per_s * self.flops_per_token / 1e12
        per_gpu = tflops / dist.get_world_size()
        metrics = {
            "loss": sum(iv["losses"]) / len(iv["losses"]) if iv["losses"] else float("nan"),
            "lr": current_lr(self.optimizer),
            "grad_norm": result.grad_norm,
            "tokens_per_s": tokens_per_s,
            "tflops": tflops,
            "mfu": per_gpu / self.peak if self.peak else None,
            "step_time_s": seconds / steps,
            "skipped_steps": self.state.skipped_steps,
            "consumed_samples": self.state.consumed_samples,
        }
        metrics.update(self._head_metrics())
        metrics.update(self._moe_metrics(steps))
        self.logger.log_train(self.state.iteration, metrics)
        self._interval = {"losses": [], "time": 0.0, "steps": 0}

    # ------------------------------------------------------------------ validation

    def evaluate(self) -> dict:
        """Main loss and per-head metrics on the first `eval_iters` validation micro-batches of each DP rank."""
        t = self.run_config.training
        tracker = self.mtpd_metrics
        saved = tracker.raw() if tracker is not None else None  # training sums of the current log interval
        if tracker is not None:
            tracker.reset()
        loader = build_dataloader(self.valid_ds, t.micro_batch_size, self.dp_rank, self.dp_size, 0, 0)
        for chunk in self.model:
            chunk.eval()
        try:
            with torch.no_grad():
                outputs = self.forward_backward(
                    forward_step_func=self._forward_step,
                    data_iterator=iter(loader),
                    model=self.model,
                    num_microbatches=t.eval_iters,
                    seq_length=self.run_config.data.seq_length,
                    micro_batch_size=t.micro_batch_size,
                    forward_only=True,
                )
        finally:
            for chunk in self.model:
                chunk.train()
        loss, _, _ = self._agree(outputs)
        metrics = {"loss": loss, **self._head_metrics()}
        if tracker is not None and saved is not None:
            for head in range(saved.shape[0]):
                if saved[head].abs().sum() > 0:
                    tracker.add(head, **{f: saved[head, i] for i, f in enumerate(MTPD_FIELDS)})
        self.logger.log_eval(self.state.iteration, metrics)
        return metrics

    # ------------------------------------------------------------------ loop

    def save(self) -> None:
        self.ckpt.save(self.state, self.model, self.optimizer, self.scheduler)
        self._last_saved = self.state.iteration

    def save_initial(self) -> None:
        """An iteration-0 checkpoint of a fresh run (looped extension: the stage's starting point).

        The one checkpoint written before any update, on purpose: it is the training-free extension."""
        if self.resume_path is None:
            prime_adam_state(self.optimizer)  # Adam's initial state (step 0, zero moments) is savable
            self.save()

    def save_blocker(self, last: Optional[StepResult]) -> Optional[str]:
        """Why the current state must not become a checkpoint, or None."""
        if self.state.applied_steps <= 0:
            return "no optimizer step has been applied yet, every step so far was non-finite"
        if last is not None and last.nonfinite:
            return "the last step was non-finite"
        return None

    def _kept(self) -> str:
        return f"iter_{self._last_saved:07d} is kept" if self._last_saved is not None else "nothing was saved"

    def fit(self) -> int:
        try:
            return self._fit()
        except BaseException:
            self._close_after_failure()
            raise

    def _fit(self) -> int:
        t, c = self.run_config.training, self.run_config.checkpoint
        self._last_saved = self.state.iteration if self.resume_path is not None else None
        nan_run, last_eval, last = 0, self.state.iteration, None
        if self.state.iteration >= t.train_iters:
            self.log(
                f"[{self.run_config.name}] already at iteration {self.state.iteration} >= training.train_iters="
                f"{t.train_iters}: nothing to do (raise training.train_iters to train further)"
            )
        while self.state.iteration < t.train_iters:
            start = time.perf_counter()
            result = last = self.train_step()
            self._log_interval(result, time.perf_counter() - start)
            nan_run = nan_run + 1 if result.nonfinite else 0
            if nan_run >= t.max_consecutive_nan_steps:
                self._error(
                    f"training.max_consecutive_nan_steps: {nan_run} steps in a row with a non-finite loss or gradient, at step "
                    f"{self.state.iteration}; stopping without saving ({self._kept()}; lower training.lr, raise "
                    f"training.lr_warmup_iters or check the data)"
                )
                self.close()
                return EXIT_NONFINITE
            self.ckpt.finalize(blocking=False)
            if result.stop:
                blocker = self.save_blocker(result) if c.save else None
                if not c.save:
                    where = "checkpoint.save is null, so nothing is saved"
                elif blocker:
                    where = f"not saving: {blocker} ({self._kept()})"
                else:
                    where = f"saving at step {self.state.iteration}"
                self.log(
                    f"[{self.run_config.name}] signal {self.preemption.signal or 'on another rank'}: {where}; exiting "
                    f"with {EXIT_PREEMPTED} (resume with --resume auto)"
                )
                if c.save and not blocker:
                    self.save()
                self.close()
                return EXIT_PREEMPTED
            if t.eval_interval and self.state.iteration % t.eval_interval == 0:
                self.evaluate()
                last_eval = self.state.iteration
            if c.save and c.save_interval and self.state.iteration % c.save_interval == 0:
                blocker = self.save_blocker(result)
                if blocker:
                    self.log(f"[checkpoint] not saving at step {self.state.iteration}: {blocker} ({self._kept()})")
                else:
                    self.save()
        if t.eval_interval and last_eval != self.state.iteration:  # always end with a validation
            self.evaluate()
        if c.save and self._last_saved != self.state.iteration:
            blocker = self.save_blocker(last)
            if blocker:
                self._error(
                    f"training.train_iters={t.train_iters} reached but {blocker}: no final checkpoint "
                    f"written ({self._kept()}); lower training.lr, raise training.lr_warmup_iters or check "
                    "the data, then resume"
                )
                self.close()
                return EXIT_NONFINITE
            self.save()
        self.close()
        return EXIT_OK

    def _error(self, line: str) -> None:
        if self.rank == 0:
            import sys

            from mtpd_megatron.cli import TRAIN_PROG, error_line

            print(error_line(TRAIN_PROG, line), file=sys.stderr, flush=True)

    def close(self) -> None:
        """Publish any background save (collective), close the log sinks and release the model (below)."""
        try:
            self.ckpt.close()
        finally:
            self.logger.close()
            self._release_model()

    def _close_after_failure(self) -> None:
        """After an error on the way out: close the sinks; a background save still in flight is abandoned
        (its iter_N.tmp is never published and is removed at the next start)."""
        try:
            self.ckpt.abandon()
        finally:
            self.logger.close()
            self._release_model()

    def _release_model(self) -> None:
        """Let the garbage collector free the model, its grad buffers and the optimizer once the trainer is
        dropped (tools/bench_train.py builds several trainers in one process; an MoE one otherwise stayed
        on the GPU whole and the next one ran out of memory).

        The model can only be collected as a cycle: megatron's DDP keeps the parameters' AccumulateGrad nodes
        (`grad_accs`) whose backward hooks are closures over the DDP itself (distributed_data_parallel.py,
        `grad_acc.register_hook(self._make_backward_post_hook(param))`). torch lets the collector see a
        node's Python hooks only while the node has no other owner (THPCppFunction_traverse); an autograd
        graph still alive that ends in a parameter is such an owner, and then the whole cycle looks
        referenced from outside and is never freed. Two such graphs outlive the last step:
        - megatron's MoE token dispatcher keeps the last forward's routing probabilities, graph attached
          (token_dispatcher.py, MoEAlltoAllTokenDispatcher.dispatch_preprocess: `self.probs = probs`; never
          cleared): dropped here, on every dispatcher of the model (MTP heads' MoE layers included);
        - the distributed optimizer's fp32 parameter shards are views of the parameters, not detached
          (distrib_optimizer.py, fp32 params: `shard_model_param = model_param.view(-1)[...]`; bf16 shards
          are detached): fp32 training only (CPU). The optimizer dies with the trainer once the model's
          config no longer points at it, so the callbacks set in __init__ are reset here.
        """
        dispatchers = [
            m.token_dispatcher
            for chunk in getattr(self, "model", None) or []
            for m in chunk.modules()
            if getattr(m, "token_dispatcher", None) is not None
        ]
        holders = dispatchers + [d._comm_manager for d in dispatchers if getattr(d, "_comm_manager", None) is not None]
        for holder in holders:
            for name, value in list(vars(holder).items()):
                if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                    setattr(holder, name, None)
        config = getattr(self, "megatron_config", None)
        if config is not None:
            config.grad_scale_func = config.finalize_model_grads_func = None
            config.no_sync_func = config.grad_sync_func = None
