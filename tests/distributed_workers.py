"""Workers of tests/test_distributed.py, started by torchrun (2 processes, gloo on the CPU).

``python -m torch.distributed.run --nproc_per_node=2 --standalone tests/distributed_workers.py OUT`` runs,
on every rank, a few data-parallel supernet steps (both unused-slot rules), the split pool evaluation, a
data-parallel stand-alone epoch, the arch check against a rank whose sampler was seeded differently and
``bnao train`` under torchrun; each rank saves what it saw to ``OUT/rank<r>.pt``. The test compares those
files with each other and with single-process runs built by :func:`build` (shared so that both sides start
from the same set-up).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from bnao import data_parallel, distributed
from bnao.data import create_dataset, create_loader
from bnao.sampling import create_sampler
from bnao.space import NAOSpace
from bnao.supernet import RandomBatches, Supernet, SupernetTrainer
from bnao.supernet import fused_forward

STEPS = 4
FUSED_BUILT = fused_forward.fused_built
GLOBAL_BATCH = 16


def build(unused_slot_update: str = "decay", sampler_seed: int = 0, sync=None, kernels: str = "eager"):
    """The supernet trainer both sides use: its loader yields the global batch (sliced by the caller).

    ``kernels="fused"`` runs the fused cells; where their compiled ops are not built (a CPU build) the op
    wrappers run their pure-PyTorch references, with the fused path's dense slot gradients all the same.
    """
    # Three channels: a one-channel batch has channels-last strides too, which the fused cells refuse on the CPU.
    data = create_dataset("synthetic", num_samples=64, image_shape=(8, 8, 3), num_classes=3, seed=0)
    loader = create_loader("tensor", data, GLOBAL_BATCH, device="cpu", augment=True, shuffle=True,
                           drop_last=True, seed=0)
    space = NAOSpace(num_nodes=5, op_set="small")
    pool = space.sample_array(6, rng=np.random.default_rng(0))
    torch.manual_seed(0)
    if kernels == "fused":
        fused_forward.fused_built = lambda device_type: True  # the references stand in for missing kernels
    model = Supernet(space, layers=1, channels=4, num_classes=3, in_channels=3, drop_path_keep_prob=None,
                     kernels=kernels)
    sampler = create_sampler("proportional", np.arange(1.0, 7.0), seed=sampler_seed)
    if sync is not None:
        loader = data_parallel.ShardedLoader(loader, sync.context)
        model.batch_shard = (sync.context.rank, sync.context.world_size)
    trainer = SupernetTrainer(model, sampler, pool, loader, steps_total=10, seed=0, lr_max=0.1,
                              unused_slot_update=unused_slot_update, data_parallel=sync)
    draws = []
    real_draw = sampler.draw

    def draw():
        index = real_draw()
        draws.append(int(index))
        return index

    sampler.draw = draw
    return trainer, draws


def eval_setup():
    """A freshly seeded supernet, a pool of 7 archs and the reference's random dev batches."""
    data = create_dataset("synthetic", num_samples=60, image_shape=(8, 8, 1), num_classes=3, seed=1)
    loader = create_loader("tensor", data, 20, device="cpu", augment=False, shuffle=True, drop_last=True, seed=5)
    space = NAOSpace(num_nodes=5, op_set="small")
    torch.manual_seed(1)
    model = Supernet(space, layers=1, channels=4, num_classes=3, in_channels=1, drop_path_keep_prob=None,
                     kernels="eager")
    return model, space.sample_array(7, rng=np.random.default_rng(1)), RandomBatches(loader, 1)


def standalone_setup(parallel=None):
    """A stand-alone trainer for one epoch without drop-path, dropout or auxiliary head."""
    from bnao.train import StandaloneTrainer, make_config

    data = create_dataset("synthetic", num_samples=64, image_shape=(8, 8, 1), num_classes=3, seed=2)
    space = NAOSpace(num_nodes=5, op_set="small")
    arch = space.sample_array(1, rng=np.random.default_rng(2))[0]
    config = make_config(layers=1, channels=4, epochs=1, batch_size=16, drop_path_keep_prob=None, dropout=0.0,
                         auxiliary=False, lr_max=0.1, seed=0)
    return StandaloneTrainer(arch, space, data, None, config, device="cpu", parallel=parallel)


def stop_on_rank_1(context) -> int:
    """Supernet steps every rank ran when only rank 1 was asked to stop before the first (all must stop at 1)."""
    from bnao import signals

    trainer, _ = build(sync=data_parallel.GradientSync(context))
    done = [0]

    def on_step(steps):
        done[0] += steps
        if trainer.data_parallel.stop_agreed:
            raise StopIteration

    with signals.GracefulStop():
        if context.rank == 1:
            signals.request_stop()
        try:
            trainer.train_steps(STEPS, progress=on_step)
        except StopIteration:
            pass
    return done[0]


def standalone_stop_on_rank_1(context, out: Path) -> str:
    """A stand-alone epoch stopped mid-way by a request on rank 1 only; rank 0 checkpoints to OUT/mid.pt."""
    from bnao import signals

    trainer = standalone_setup(distributed.current())
    trainer.checkpoint_path = out / "mid.pt"
    forward = trainer.model.forward

    def forward_then_ask_to_stop(*args, **kwargs):  # rank 1 is asked during the first step
        if context.rank == 1:
            signals.request_stop()
        return forward(*args, **kwargs)

    trainer.model.forward = forward_then_ask_to_stop
    with signals.GracefulStop():
        try:
            trainer.fit(resume=False)
        except signals.Stopped as stopped:
            return stopped.where
    return "not stopped"


def main(out: Path) -> None:
    from types import SimpleNamespace

    from bnao.search.distributed_phases import evaluate_split

    torch.set_num_threads(1)
    context = distributed.init_from_env("cpu", timeout_s=60)
    record = {"world_size": context.world_size}
    for rule, kernels in (("decay", "eager"), ("freeze", "eager"), ("decay", "fused")):
        trainer, draws = build(rule, sync=data_parallel.GradientSync(context, check_arch=True), kernels=kernels)
        stats = trainer.train_steps(STEPS)
        fused_forward.fused_built = FUSED_BUILT
        record[rule if kernels == "eager" else kernels] = {"draws": draws, "stats": stats, "model": trainer.model.state_dict(),
                        "momentum": [trainer.optimizer.state[p].get("momentum_buffer") for p in trainer.params]}
    model, archs, batches = eval_setup()
    acc, loss = evaluate_split(SimpleNamespace(pool=SimpleNamespace(archs=archs), dev_batches=batches, model=model),
                               bf16=False)
    record["eval"] = {"acc": acc, "loss": loss, "loader": batches.state_dict()}
    standalone = standalone_setup(distributed.current())
    standalone.fit(resume=False)
    record["standalone"] = standalone.model.state_dict()
    record["stop_steps"] = stop_on_rank_1(context)
    record["standalone_stop"] = standalone_stop_on_rank_1(context, out)
    # A rank whose sampler was seeded differently: the arch check must stop both ranks.
    trainer, _ = build(sampler_seed=context.rank, sync=data_parallel.GradientSync(context, check_arch=True))
    try:
        trainer.train_steps(STEPS)
        record["mismatch"] = None
    except distributed.DistributedError as err:
        record["mismatch"] = str(err)
    # `bnao train` itself, data-parallel (it leaves the process group when done).
    from bnao.cli import main as cli

    arch = " ".join(map(str, NAOSpace(num_nodes=5, op_set="small").sample_array(1, rng=np.random.default_rng(3))[0]))
    record["train_exit"] = cli(["train", arch, "--dataset", "synthetic", "--train-limit", "128", "--test-limit", "50",
                                "--layers", "1", "--channels", "4", "--epochs", "1", "--batch-size", "32", "--out",
                                str(out / "train"), "--device", "cpu", "--threads", "1", "--no-progress"])
    torch.save(record, out / f"rank{context.rank}.pt")
    distributed.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
