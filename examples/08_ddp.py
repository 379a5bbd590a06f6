"""08: data-parallel (DDP) training of an ensemble in your own loop, under torchrun.

Shows ``ensemblekit.training.distributed``: the loop of example 02, run by N processes
(one per GPU, or CPU processes with the gloo backend). ``distributed.detect()``
reads torchrun's variables, ``distributed.init`` joins the process group,
``ShardedEpochSampler`` deals each process its share of every *global* batch
(``--batch-size`` is the global batch, whatever N), and ``distributed.data_parallel``
wraps forward pass *and* loss in DistributedDataParallel (it returns
``(output, loss)``; one probe step decides whether DDP must look for unused
parameters). Only rank 0 prints and evaluates. Started with plain ``python``
the same script trains in one process, with no process group.

The ready-made loop ``ensemblekit.training.trainer.train`` (and ``ensemblekit train``)
does all of this by itself under torchrun; see docs/distributed.md.

Run:
    python examples/08_ddp.py --smoke                                # one process
    torchrun --nproc-per-node=2 examples/08_ddp.py --smoke           # two processes (CPU: gloo)
    torchrun --nproc-per-node=4 examples/08_ddp.py                   # e.g. 4 GPUs
"""

from __future__ import annotations

import argparse
import time

import torch

import ensemblekit as ek
from ensemblekit.backbones import create_backbone
from ensemblekit.evaluation.reports import anytime_report, collect_members
from ensemblekit.training import distributed
from ensemblekit.training.data import load_dataset, make_loader
from ensemblekit.training.trainer import select_device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=3, help="tree depth: 2^depth members (default: 3)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch, split over the processes")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="depth 2, a narrower backbone, 8 steps")
    args = parser.parse_args()
    width = {"stem_width": 16, "channels": [16, 32, 64, 128]}
    max_steps = None
    if args.smoke:
        args.depth, args.epochs, max_steps = 2, 1, 8
        width = {"stem_width": 8, "channels": [8, 16, 32, 64]}

    env = distributed.detect()                                   # rank, world size, local rank (1 process: 0, 1, 0)
    device = distributed.process_device(select_device(args.device), env)  # cuda:LOCAL_RANK on GPUs
    created = distributed.init(env, device)                      # NCCL on CUDA, gloo on the CPU; no-op alone
    if args.batch_size % env.world_size:
        raise SystemExit(f"--batch-size {args.batch_size} must be a multiple of the {env.world_size} processes")

    def log(message: str) -> None:
        if env.is_main:
            print(message, flush=True)

    try:
        torch.manual_seed(args.seed)  # same weights everywhere (DDP also broadcasts rank 0's)
        train_set, info = load_dataset("digits", "train", image_size=16)
        backbone = create_backbone("resnet10t", num_classes=info.num_classes, **width)
        ens = ek.recipes.hne(backbone, depth=args.depth, example_input=torch.zeros(1, *info.input_shape))
        ens.cost_table(input_size=info.input_shape)  # measured before training (cached)
        ens.to(device)
        log(f"HNE with {ens.num_members} members on {env.world_size} process(es), device {device}, "
            f"global batch {args.batch_size} ({args.batch_size // env.world_size} per process)")

        # Each process reads its share of every global batch; each epoch is one seeded permutation.
        torch.manual_seed(distributed.rank_seed(args.seed, env.rank))  # own augmentation draws per process
        sampler = distributed.ShardedEpochSampler(train_set, args.batch_size, env, seed=args.seed, drop_last=True)
        loader = make_loader(train_set, args.batch_size // env.world_size, shuffle=False, sampler=sampler,
                             drop_last=True)
        opt = torch.optim.SGD(ens.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
        steps = args.epochs * len(loader) if max_steps is None else min(max_steps, args.epochs * len(loader))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)

        step_fn, step, start = None, 0, time.perf_counter()
        for epoch in range(args.epochs):
            sampler.set_epoch(epoch)
            ens.train()
            for x, y in loader:
                x, y = x.to(device), y.to(device)
                if step_fn is None:  # DDP(forward_output + loss); the bare step in a single process
                    step_fn = distributed.data_parallel(ens, env, device, probe=(x, y))
                output, result = step_fn(x, y)
                opt.zero_grad()
                result.total.backward()  # DDP averages the gradients over the processes here
                opt.step()
                sched.step()
                step += 1
                mean_loss = distributed.all_sum(result.total.detach().reshape(1), env).item() / env.world_size
                if step % 5 == 0 or step == steps:
                    log(f"epoch {epoch + 1} step {step}/{steps}: loss {mean_loss:.3f} (mean over processes)")
                if step == steps:
                    break
            if step == steps:
                break
        log(f"trained {step} steps in {time.perf_counter() - start:.1f} s")

        if env.is_main:  # every process holds the same weights; one evaluates
            test_set, _ = load_dataset("digits", "test", image_size=16)
            ens.eval()
            members, labels = collect_members(ens.forward_members, make_loader(test_set, 256, shuffle=False),
                                              device)
            report = anytime_report(members, labels, ens.aggregator, costs=ens.cost_table(input_size=info.input_shape))
            print(report.table(f"HNE trained on {env.world_size} process(es), digits test"), flush=True)
    finally:
        if created:
            distributed.shutdown()


if __name__ == "__main__":
    main()
