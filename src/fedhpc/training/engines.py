"""Intra-site training engines behind one small interface: single process, DDP, FSDP, DeepSpeed.

The training loop only ever calls `forward`, `backward`, `step` and `set_lr`; how gradients
are synchronised, sharded or accumulated is the engine's business. Whatever the engine, a
site produces one update: `full_state()` gathers the whole model onto rank 0.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch

from fedhpc.config.federation import TrainingConfig
from fedhpc.training.distributed import World
from fedhpc.training.loop import make_optimizer
from fedhpc.training.model import Block, trainable


def on_cpu(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fp32 copies on the CPU, where the update is taken against the global model."""
    return {name: p.detach().to("cpu", torch.float32, copy=True).contiguous() for name, p in params.items()}


class Engine:
    """Single-process training: plain PyTorch."""

    name = "single"

    def __init__(self, model: torch.nn.Module, t: TrainingConfig, world: World, device: torch.device):
        self.module, self.t, self.world, self.device = model, t, world, device
        self.model = self._wrap(model)
        self.optimizer = make_optimizer(self.module, t)

    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def forward(self, x: torch.Tensor, y: torch.Tensor, last_micro: bool = True) -> torch.Tensor:
        return self.model(x, y)[1]

    def backward(self, loss: torch.Tensor, share: float, last_micro: bool) -> None:
        """Accumulate the gradient of `loss`, this micro-batch's mean, weighted by its `share` of the step's sequences."""
        (loss * share).backward()

    correction = None  # FedProx/SCAFFOLD terms (site_correction.GradCorrection), applied before clipping

    def step(self) -> float:
        if self.correction is not None:
            self.correction()
        clip = self.t.grad_clip if self.t.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def eval_forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.model(x, y)[1]

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    def full_state(self) -> dict[str, torch.Tensor] | None:
        """The whole model, fp32 on the CPU, by parameter name: on rank 0; None on the others."""
        return on_cpu(trainable(self.module)) if self.world.is_main else None

    def optimizer_state(self) -> dict:
        return self.optimizer.state_dict()

    def load_optimizer_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)

    @property
    def keeps_optimizer_state(self) -> bool:
        return True


class DDPEngine(Engine):
    name = "ddp"

    def _wrap(self, model):
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def forward(self, x, y, last_micro=True):
        # Gradients are all-reduced once per optimizer step, on the last micro-batch.
        ctx = contextlib.nullcontext() if last_micro else self.model.no_sync()
        with ctx:
            return self.model(x, y)[1]

    def backward(self, loss, share, last_micro):
        ctx = contextlib.nullcontext() if last_micro else self.model.no_sync()
        with ctx:
            (loss * share).backward()


def fsdp_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The layers FSDP shards one by one (one all-gather each, so only one layer is whole at a time).

    A model's decoder layers: instances of the classes any of its modules names in
    `_no_split_modules` (Hugging Face models do, PEFT's wrapper keeps them) and the built-in
    GPT's `Block`. A model with neither: the entries of its `nn.ModuleList`s, where repeated
    layers live. Only the outermost of nested candidates; none at all leaves the model one unit.
    """
    names = {n for m in model.modules() for n in (getattr(m, "_no_split_modules", None) or ())}
    units = [m for m in model.modules() if type(m).__name__ in names or isinstance(m, Block)]
    if not units:
        units = [layer for m in model.modules() if isinstance(m, torch.nn.ModuleList) for layer in m]
    inner = {id(sub) for u in units for sub in u.modules() if sub is not u}
    return [u for u in units if id(u) not in inner]


class FSDPEngine(Engine):
    """FSDP2 (`fully_shard`): each decoder layer (`fsdp_units`) is sharded, then the whole model."""

    name = "fsdp"

    def _wrap(self, model):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(self.device.type, (self.world.size,))
        for layer in fsdp_units(model):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    def full_state(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.world.is_main:
            return None
        names = trainable(self.module)  # skips tied aliases and frozen parameters, like exported_state
        return {k: full[k].to(torch.float32).contiguous() for k in names}

    def optimizer_state(self):
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(self.module, self.optimizer)

    def load_optimizer_state(self, state):
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(self.module, self.optimizer, state)


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO 1-3; its config is written from our training settings."""

    name = "deepspeed"

    def __init__(
        self,
        model,
        t,
        world,
        device,
        micro_batch: int,
        grad_accum: int,
        zero_stage: int,
        config_out: Path | None = None,
    ):
        if device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        self.module, self.t, self.world, self.device = model, t, world, device
        self.ds_config = {
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": grad_accum,
            "gradient_clipping": t.grad_clip,
            "zero_optimization": {"stage": zero_stage},
            "bf16": {"enabled": t.precision == "bf16" or (t.precision == "auto" and device.type == "cuda")},
            "steps_per_print": 1 << 30,
            "wall_clock_breakdown": False,
        }
        if config_out is not None:
            config_out.parent.mkdir(parents=True, exist_ok=True)
            config_out.write_text(json.dumps(self.ds_config, indent=2))
        self.model, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=make_optimizer(model, t), config=self.ds_config
        )

    def forward(self, x, y, last_micro=True):
        return self.model(x, y)[1]

    def backward(self, loss, share, last_micro):
        # DeepSpeed's own boundary and 1/gradient_accumulation_steps assume every step has the
        # configured micro-batch count; a round's last step may have fewer, so the loop decides both.
        self.model.set_gradient_accumulation_boundary(last_micro)
        self.model.backward(loss * share, scale_wrt_gas=False)
        self.model.step()

    def step(self):
        norm = self.model.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def set_lr(self, lr):
        for group in self.model.optimizer.param_groups:
            group["lr"] = lr

    def full_state(self):
        from deepspeed.utils import safe_get_full_fp32_param

        # The optimizer's fp32 master weights: in bf16 the module holds a rounded copy of them,
        # and under ZeRO each rank a slice, so every rank takes part in assembling each one.
        masters = {}
        for name, p in trainable(self.module).items():
            master = safe_get_full_fp32_param(p)  # None: no master copy (ZeRO-0 in fp32), p is it
            masters[name] = p if master is None else master
        return on_cpu(masters) if self.world.is_main else None

    @property
    def keeps_optimizer_state(self) -> bool:
        # ZeRO partitions the optimizer by rank in its own format; restoring it without
        # also restoring DeepSpeed's weights is not supported, so the state is reset.
        return False


ENGINES = {"single": Engine, "ddp": DDPEngine, "fsdp": FSDPEngine, "deepspeed": DeepSpeedEngine}


def make_engine(
    kind: str,
    model: torch.nn.Module,
    t: TrainingConfig,
    world: World,
    device: torch.device,
    micro_batch: int,
    grad_accum: int,
    zero_stage: int,
    config_out: Path | None = None,
) -> Engine:
    if kind == "deepspeed":
        return DeepSpeedEngine(model, t, world, device, micro_batch, grad_accum, zero_stage, config_out)
    if not world.distributed:
        return Engine(model, t, world, device)
    return ENGINES[kind](model, t, world, device)
