"""Train a sharded model and its single-process reference side by side on one global batch."""
import torch


def train_side_by_side(forward, opt, reference, ref_opt, rank: int, world_size: int, steps: int,
                       batch: int = 12, engine=None) -> None:
    """Each rank steps `opt` on its slice of a seeded global batch (13 inputs, 3 outputs);
    `ref_opt` steps `reference` on the whole batch, which the sharded run must equal. With an
    `engine`, the sharded side goes through `engine.backward` and `engine.step`."""
    g = torch.Generator().manual_seed(7)
    per_rank = batch // world_size
    for _ in range(steps):
        x, y = torch.randn(batch, 13, generator=g), torch.randn(batch, 3, generator=g)
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        if engine is not None:
            engine.backward(torch.nn.functional.mse_loss(forward(x[mine]), y[mine]))
            engine.step()
        else:
            torch.nn.functional.mse_loss(forward(x[mine]), y[mine]).backward()
            opt.step()
            opt.zero_grad()
        torch.nn.functional.mse_loss(reference(x), y).backward()
        ref_opt.step()
        ref_opt.zero_grad()
