"""Helper the tests launch, as one rank of a torchrun job or alone; every knob comes from the environment.

`python tests/dist_driver.py OUT_DIR` runs ITERATIONS training steps with train_gpt.py's own pieces and saves
what the world-size tests compare. No wallclock cap: the LR schedule is the iteration-count one, so late QAT and
SWA switch on at fixed steps. Writes OUT_DIR/rank<R>.pt holding this rank's resolved RUN_ID, the per-step
training loss (all-reduced mean over ranks), the final weights, the EMA and SWA weights and the optimiser state.

`python tests/dist_driver.py --main OUT_DIR` runs train_gpt.main() itself, unchanged, recording on the side the
RUN_ID it settled on (seen when it builds the model), every (step, LR scale) its loop computes, and whether a
DistributedDataParallel wrapper is still alive when finish() (which destroys the process group) starts. Writes
OUT_DIR/main_rank<R>.json. `--main-until-build` stops (exit 0) as soon as main() builds the model, for tests of the
set-up alone. Once finish() has returned the process exits at once: with a DDP wrapper still alive, its teardown
can deadlock on gloo (the reducer drops the last reference to the process group while holding the GIL, and the
group's destructor joins a worker thread that waits for the GIL); the tests check that precondition explicitly
instead of hanging."""

from __future__ import annotations

import faulthandler
import gc
import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402


def train(out: Path) -> None:
    rank, world, local_rank, device = tg.setup_distributed()
    torch.set_num_threads(1)  # the same arithmetic in every run, and no OpenMP stalls when runs share the cores
    args = tg.resolve(tg.Hyperparameters.from_env(), world)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    tg.prepare_runtime(args, device)
    autocast = tg.make_autocast(device)
    model, train_model, optimizers, loader = tg.build_training(args, device, rank, world, local_rank)
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tg.warm_up(model, train_model, loader, optimizers, args, autocast)
    averages = tg.WeightAverages(model, args)
    losses, qat_step, swa_step = [], None, None
    for step in range(args.iterations):
        scale = tg.lr_scale(step, 0.0, args)
        if qat_step is None and args.late_qat_threshold > 0 and scale < args.late_qat_threshold:
            qat_step = step
            model.set_qat(True)
        loss = tg.train_step(train_model, loader, optimizers, args, scale, tg.muon_momentum(step, args), autocast)
        if averages.update(step + 1, scale, args.iterations):
            swa_step = step + 1
        mean = loss.detach().double().reshape(1)
        if world > 1:
            dist.all_reduce(mean)
        losses.append(mean.item() / world)
    swa = averages.weights("swa")
    result = dict(
        rank=rank, world=world, grad_accum_steps=args.grad_accum_steps, run_id=args.run_id, losses=losses,
        qat_step=qat_step, swa_step=swa_step,
        init=init, state={k: v.detach().clone() for k, v in model.state_dict().items()},
        names=[n for n, _ in model.named_parameters()],
        ema=[t.clone() for t in averages.weights("ema")],
        swa=None if swa is None else [t.clone() for t in swa],
        optim=[opt.state_dict() for opt in optimizers],
    )
    out.mkdir(parents=True, exist_ok=True)
    torch.save(result, out / f"rank{rank}.pt")
    del train_model  # DDP first, while the process group is still registered (see the module docstring)
    gc.collect()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def run_main(out: Path, until_build: bool) -> None:
    """train_gpt.main() as torchrun would run it, with its RUN_ID, LR scales (and the time each was computed from)
    and teardown order recorded."""
    rank = int(os.environ.get("RANK", 0))
    record: dict = dict(run_id=None, scales=[], ddp_alive_at_finish=None, finished=False)
    real_build, real_lr_scale, real_finish = tg.build_training, tg.lr_scale, tg.finish

    def save() -> None:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"main_rank{rank}.json").write_text(json.dumps(record))

    def recording_build(args, *rest):
        record["run_id"] = args.run_id
        if until_build:
            save()
            sys.stdout.flush()
            os._exit(0)
        return real_build(args, *rest)

    def recording_lr_scale(step, elapsed_ms, args):
        scale = real_lr_scale(step, elapsed_ms, args)
        record["scales"].append([step, scale, elapsed_ms])
        return scale

    def finish_then_exit(*args, **kwargs):
        record["ddp_alive_at_finish"] = sum(isinstance(o, torch.nn.parallel.DistributedDataParallel)
                                            for o in gc.get_objects())
        code = 0
        try:
            real_finish(*args, **kwargs)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        record["finished"] = True
        save()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    tg.build_training, tg.lr_scale, tg.finish = recording_build, recording_lr_scale, finish_then_exit
    try:
        tg.main()
    finally:
        save()


if __name__ == "__main__":
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>` prints where a hung rank waits
    if sys.argv[1] in ("--main", "--main-until-build"):
        run_main(Path(sys.argv[2]), until_build=sys.argv[1] == "--main-until-build")
    else:
        train(Path(sys.argv[1]))
