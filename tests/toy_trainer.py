"""A tiny deterministic trainer with the same contract as vsgd_dist.train, for SLURM tests.

`ToyTrainer(recipe, run_dir)`: `run()` joins the gloo group from RANK/WORLD_SIZE/
MASTER_ADDR/MASTER_PORT, resumes from run_dir/ckpt.pt, trains a linear model on fixed
synthetic data (each rank its own shard, gradients all-reduced) for `max_steps` steps of at
least `step_sleep_s` seconds, and returns {"status", "step", "loss"}; `request_stop()` makes it
checkpoint at the next step boundary and return "stopped". Everything is fp32 on CPU and
free of randomness after initialisation, so a resumed run ends bitwise equal to an
uninterrupted one. `abort_at_exit: true` makes a completed process abort during interpreter
teardown, as a library's leftover threads sometimes do.
"""
from __future__ import annotations

import atexit
import os
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist


class ToyTrainer:
    def __init__(self, recipe: dict, run_dir: str) -> None:
        self.max_steps = int(recipe.get("max_steps", 20))
        self.step_sleep_s = float(recipe.get("step_sleep_s", 0.0))
        self.seed = int(recipe.get("seed", 0))
        self.lr = float(recipe.get("lr", 0.05))
        self.abort_at_exit = bool(recipe.get("abort_at_exit", False))
        self.run_dir = Path(run_dir)
        self._stop = threading.Event()

    def request_stop(self) -> None:
        self._stop.set()

    def _save(self, rank: int, model, opt, step: int) -> None:
        if rank == 0:
            tmp = self.run_dir / "ckpt.pt.tmp"
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                        "rng": torch.get_rng_state()}, tmp)
            os.replace(tmp, self.run_dir / "ckpt.pt")
        dist.barrier()

    def run(self) -> dict:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        dist.init_process_group("gloo", rank=rank, world_size=world)
        try:
            return self._train(rank, world)
        finally:
            dist.barrier()
            dist.destroy_process_group()

    def _train(self, rank: int, world: int) -> dict:
        torch.manual_seed(self.seed)
        model = torch.nn.Linear(8, 1)
        opt = torch.optim.SGD(model.parameters(), lr=self.lr, momentum=0.9)
        gen = torch.Generator().manual_seed(self.seed)
        x = torch.randn(64 * world, 8, generator=gen)
        y = x @ torch.randn(8, 1, generator=gen) + 0.1 * torch.randn(64 * world, 1, generator=gen)
        x, y = x[rank::world], y[rank::world]
        step = 0
        ckpt = self.run_dir / "ckpt.pt"
        if ckpt.exists():
            state = torch.load(ckpt, weights_only=False)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["rng"])
            step = state["step"]
            if rank == 0:
                print(f"toy: resumed at step {step}", flush=True)
        loss = torch.tensor(float("nan"))
        while step < self.max_steps:
            stop = torch.tensor([float(self._stop.is_set())])
            dist.all_reduce(stop, op=dist.ReduceOp.MAX)  # every rank stops at the same step
            if stop.item():
                self._save(rank, model, opt, step)
                return {"status": "stopped", "step": step}
            idx = (torch.arange(8) + step * 8) % x.shape[0]
            loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world
            opt.step()
            step += 1
            if rank == 0:
                print(f"toy: step {step} loss {loss.item():.6f}", flush=True)
            time.sleep(self.step_sleep_s)
        self._save(rank, model, opt, step)
        if rank == 0:
            torch.save(model.state_dict(), self.run_dir / "final.pt")
        if self.abort_at_exit:
            atexit.register(os.abort)
        return {"status": "completed", "step": step, "loss": loss.item()}
