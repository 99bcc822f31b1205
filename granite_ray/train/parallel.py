"""Data-parallel strategies behind one interface: DDP, FSDP2 (torch `fully_shard`), DeepSpeed ZeRO-2/3.

The training loop calls: `model` (forward), `accumulating(boundary)`, `backward(loss, boundary)`,
`step()`, `lr()`, `full_state_dict()` (collective; the whole model on rank 0) and
`save_state(dir)` / `load_state(dir)` (optimizer and schedule, kept as the strategy shards them).
Weights are restored into the plain model before a strategy wraps it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.distributed as dist

from granite_ray.config import TrainConfig
from granite_ray.train.optim import build_optimizer, build_scheduler


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def load_optimizer_file(path: Path) -> dict:
    """optimizer.pt as tensors and plain values only (`weights_only`): checkpoint storage (an S3 bucket)
    is not trusted to run code on the workers, which unpickling arbitrary objects would allow."""
    return torch.load(path, map_location="cpu", weights_only=True)


def _encoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    base = getattr(model, "model", model)
    return list(getattr(base, "layers", []))


class DDPStrategy:
    def __init__(self, model: torch.nn.Module, tc: TrainConfig, device: torch.device) -> None:
        import ray.train.torch

        self.tc = tc
        self.raw = model
        if tc.activation_checkpointing:
            model.gradient_checkpointing_enable()
        self.model = ray.train.torch.prepare_model(model)
        self.optimizer = build_optimizer(self.raw, tc)
        self.scheduler = build_scheduler(self.optimizer, tc)

    def accumulating(self, boundary: bool):
        if boundary or not hasattr(self.model, "no_sync"):
            return contextlib.nullcontext()
        return self.model.no_sync()

    def backward(self, loss: torch.Tensor, boundary: bool) -> None:
        loss.backward()

    def step(self) -> None:
        if self.tc.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tc.clip_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        return {k: v.detach().cpu() for k, v in self.raw.state_dict().items()} if _rank() == 0 else None

    def save_state(self, directory: Path) -> None:
        if _rank() == 0:
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                       directory / "optimizer.pt")

    def load_state(self, directory: Path) -> None:
        state = load_optimizer_file(directory / "optimizer.pt")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


class FSDP2Strategy(DDPStrategy):
    """Each encoder layer, then the whole model, sharded with torch's `fully_shard` (FSDP2)."""

    def __init__(self, model: torch.nn.Module, tc: TrainConfig, device: torch.device) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        self.tc = tc
        if tc.activation_checkpointing:
            model.gradient_checkpointing_enable()
        model.to(device)
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if tc.precision == "bf16" else MixedPrecisionPolicy()
        for layer in _encoder_layers(model):
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        self.model = self.raw = model
        self.optimizer = build_optimizer(model, tc)
        self.scheduler = build_scheduler(self.optimizer, tc)

    def accumulating(self, boundary: bool):
        self.model.set_requires_gradient_sync(boundary)
        return contextlib.nullcontext()

    def _options(self, **kw):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = get_model_state_dict(self.model, options=self._options())
        return state if _rank() == 0 else None

    def save_state(self, directory: Path) -> None:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        optim = get_optimizer_state_dict(self.model, self.optimizer, options=self._options())
        if _rank() == 0:
            torch.save({"optimizer": optim, "scheduler": self.scheduler.state_dict()}, directory / "optimizer.pt")

    def load_state(self, directory: Path) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        state = load_optimizer_file(directory / "optimizer.pt")
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=self._options())
        self.scheduler.load_state_dict(state["scheduler"])


class DeepSpeedStrategy:
    """DeepSpeed ZeRO-2/3 with our (torch) optimizer and schedule; optional CPU offload."""

    def __init__(self, model: torch.nn.Module, tc: TrainConfig, device: torch.device) -> None:
        import deepspeed

        self.tc = tc
        if tc.activation_checkpointing:
            model.gradient_checkpointing_enable()
        model.to(device)
        optimizer = build_optimizer(model, tc)
        scheduler = build_scheduler(optimizer, tc)
        self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(tc))

    def accumulating(self, boundary: bool):
        return contextlib.nullcontext()  # the engine skips gradient reduction off boundaries itself

    def backward(self, loss: torch.Tensor, boundary: bool) -> None:
        self.model.backward(loss, scale_wrt_gas=False)  # the loop already divided by the accumulation steps
        if not boundary:
            self.model.step()  # the engine counts every micro-step and updates only on the boundary

    def step(self) -> None:
        self.model.step()

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The fp32 master weights (not the bf16 working copy), gathered across ZeRO partitions."""
        from deepspeed.utils import safe_get_full_fp32_param

        module = self.model.module
        state = {name: safe_get_full_fp32_param(p).detach().cpu() for name, p in module.named_parameters()}
        persistent = module.state_dict().keys()  # leaves out buffers recomputed at load (RoPE frequencies)
        state.update({name: b.detach().cpu() for name, b in module.named_buffers() if name in persistent})
        return state if _rank() == 0 else None

    def save_state(self, directory: Path) -> None:
        self.model.save_checkpoint(str(directory / "deepspeed"), tag="state", save_latest=False)

    def load_state(self, directory: Path) -> None:
        """DeepSpeed unpickles its own checkpoint files (no weights-only mode): resume ZeRO runs only from
        storage you trust; DDP and FSDP2 read optimizer state as tensors only."""
        self.model.load_checkpoint(str(directory / "deepspeed"), tag="state")


def deepspeed_config(tc: TrainConfig) -> dict:
    """The engine config a GPU cluster would use, derived from the stage's train section."""
    zero: dict = {"stage": tc.zero_stage, "overlap_comm": True, "contiguous_gradients": True}
    if tc.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if tc.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if tc.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": tc.batch_size,
        "gradient_accumulation_steps": tc.grad_accum_steps,
        "gradient_clipping": tc.clip_grad_norm or 0.0,
        "bf16": {"enabled": tc.precision == "bf16"},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


STRATEGIES = {"ddp": DDPStrategy, "fsdp2": FSDP2Strategy, "deepspeed": DeepSpeedStrategy}
