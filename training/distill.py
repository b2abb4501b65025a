"""`rtsvc distill`: a 1- or 2-evaluation student from a teacher checkpoint, on a prepared data folder.

The student starts as the teacher plus a zero-initialised second time input (`rtsvc.models.student`)
and learns the teacher's guided 32-point trajectories (`training.distill_loss`); the teacher runs
alongside, frozen, producing targets for each batch. Everything else is `rtsvc train`'s machinery:
step-addressed batches, seeded per-step noise, schedule-free AdamW, RUN/metrics.jsonl, atomic
RUN/last.ckpt (+ step-N.ckpt), exact --resume, Ctrl-C saves, torchrun DDP.

The checkpoint is the teacher's upstream layout plus the student's keys, with
`hyper_parameters.cfg.student` = `StudentInfo` (nfe, grid, guidance, recipe, teacher).
"""

import copy
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from rtsvc.training.checkpoint import load_checkpoint
from rtsvc.training.config import DistillConfig
from rtsvc.training.dataset import ClipDataset, StepBatchSampler, collate, data_family
from rtsvc.training.distill_cache import TrajectoryCache
from rtsvc.training.distill_loss import teacher_trajectories, trajectory_loss
from rtsvc.training.model import model_name
from rtsvc.training.optim import BETAS, WARMUP_RATIO, make_optimizer
from rtsvc.training.prepare import load_metadata
from rtsvc.training.progress import TrainProgress
from rtsvc.training.train import (
    LAST,
    MetricsLog,
    StopFlag,
    _set_rng_state,
    _worker_init,
    autocast_dtype,
    init_distributed,
    log_window,
    save_or_stop,
)
from torch.utils.data import DataLoader

from rtsvc.errors import UserError
from rtsvc.models.families import FAMILIES, default_guidance, family_named, student_velocity, teacher_velocity
from rtsvc.models.loading import LoadedDiT, load_dit
from rtsvc.models.schedules import student_grid
from rtsvc.models.student import STUDENT_KEY, StudentInfo, make_student
from rtsvc.settings import KNOB_ROWS

TEACHER_POINTS = 32  # the teacher's reference: upstream convert's 32-point grid


@dataclass
class DistillResult:
    out: Path
    global_step: int
    interrupted: bool
    last_checkpoint: Path | None
    info: StudentInfo | None = None
    losses: list[float] = field(default_factory=list)
    rank: int = 0


def _check(cfg: DistillConfig) -> None:
    if cfg.nfe not in (1, 2):
        raise UserError(f"--nfe must be 1 or 2, got {cfg.nfe}")
    for name, value in (("--max-steps", cfg.max_steps), ("--batch-size", cfg.batch_size),
                        ("--pairs", cfg.pairs), ("--save-every", cfg.save_every),
                        ("--log-every", cfg.log_every), ("--teacher-reuse", cfg.teacher_reuse)):
        if value < 1:
            raise UserError(f"{name} must be at least 1, got {value}")
    for name in ("cfg_strength", "ds_cfg_strength", "spk_cfg_strength", "skip_cfg_strength"):
        if getattr(cfg, name) is not None:  # the teacher's guidance, baked in: the live knob's range
            KNOB_ROWS[name].check(getattr(cfg, name))  # a KnobError: the CLI names the flag
    if not 0.0 <= cfg.deployed_share <= 1.0:
        raise UserError(f"--deployed-share must be between 0 and 1, got {cfg.deployed_share}")


def _hparams(cfg: DistillConfig, teacher: LoadedDiT, info: StudentInfo, world: int) -> dict:
    family = family_named(teacher.family)
    model = family.model_hparams(teacher.config, model_name(teacher.config))  # a student has no LoRA
    if family.pretrained_path_in == "model":
        model["pretrained_path"] = cfg.teacher
    return {
        "seed": cfg.seed,
        "model": model,
        "dataset": {**teacher.dataset, "data_dir": str(cfg.data)},
        "training": {"learning_rate": cfg.lr, "betas": str(BETAS), "weight_decay": cfg.weight_decay,
                     "batch_size_per_gpu": cfg.batch_size, "pairs_per_trajectory": cfg.pairs,
                     "teacher_reuse": cfg.teacher_reuse,
                     "deployed_share": cfg.deployed_share, "max_grad_norm": cfg.grad_clip,
                     "max_steps": cfg.max_steps, "warmup_ratio": WARMUP_RATIO,
                     "save_per_steps": cfg.save_every,
                     "precision": cfg.precision, "world_size": world},
        "spk2idx": dict(teacher.speakers),
        STUDENT_KEY: info.as_dict(),
    }


def _guidance(cfg: DistillConfig, teacher: LoadedDiT) -> dict:
    """The teacher's default guidance with the strengths the run sets; other families' are refused."""
    family = family_named(teacher.family)
    guidance = default_guidance(teacher)
    flags = dict.fromkeys(k for f in FAMILIES.values() for k in f.guidance if hasattr(cfg, k))
    given = {k: getattr(cfg, k) for k in flags if getattr(cfg, k) is not None}
    for key, value in given.items():
        if key not in family.guidance:
            raise UserError(f"--{key.replace('_', '-')} does not apply to a {family.label} teacher")
        guidance[key] = [int(i) for i in value] if key == "cfg_skip_layers" else float(value)
    layers = guidance.get("cfg_skip_layers")
    if layers is not None and not all(0 <= i < teacher.config.depth for i in layers):
        raise UserError(f"--cfg-skip-layers must name blocks 0..{teacher.config.depth - 1}, got {layers}")
    return guidance


def _models(cfg: DistillConfig, out: Path, device: torch.device):
    """(teacher, student LoadedDiT, resumed checkpoint or None, StudentInfo)."""
    teacher = load_dit(cfg.teacher, "cpu")
    if teacher.student is not None:
        raise UserError(f"{cfg.teacher} is already a distilled student; distill from its teacher")
    if cfg.resume:
        last = out / LAST
        if not last.is_file():
            raise UserError(f"--resume: no {last} to resume from (start without --resume)")
        student = load_dit(last, "cpu")
        if student.student is None:
            raise UserError(f"--resume: {last} is not a student checkpoint")
        resumed, info = load_checkpoint(last), student.student
    else:
        guidance = _guidance(cfg, teacher)
        info = StudentInfo(nfe=cfg.nfe, grid=student_grid(cfg.nfe, TEACHER_POINTS),
                           teacher_points=TEACHER_POINTS, guidance=guidance, teacher=str(cfg.teacher))
        student = copy.copy(teacher)
        student.model = copy.deepcopy(teacher.model)
        family_named(teacher.family).merge_adapters(student.model)  # every weight trains: adapters
        student.config = student.model.config  # would only add a rank limit (V3 LoRA)
        student.model = make_student(student.model)
        student.student, resumed = info, None
    teacher.model.to(device).eval().requires_grad_(False)
    student.model.to(device).train()
    return teacher, student, resumed, info


def distill(cfg: DistillConfig) -> DistillResult:
    """Run (or continue) a distillation run; returns at max_steps or on Ctrl-C."""
    _check(cfg)
    d, device = init_distributed(cfg.device)
    out = Path(cfg.out)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
    if not cfg.resume and (out / LAST).exists():
        raise UserError(f"{out / LAST} exists: add --resume to continue that run, or choose another --out")
    meta = load_metadata(cfg.data)
    torch.manual_seed(cfg.seed + d.rank)
    teacher, student, resumed, info = _models(cfg, out, device)
    if data_family(meta) != teacher.family:
        raise UserError(f"{cfg.data} was prepared for {data_family(meta).upper()} models but the teacher is "
                        f"{teacher.family.upper()}: run `rtsvc prepare {cfg.data} --family {teacher.family}`")
    unknown = [s for s in meta["speakers"] if s not in teacher.speakers]
    if unknown:
        raise UserError(f"the data has speaker(s) the teacher does not know: {', '.join(unknown)}; "
                        "fine-tune the teacher on them first (rtsvc train --pretrained)")
    start_step = int(resumed["global_step"]) if resumed else 0
    if start_step >= cfg.max_steps:
        raise UserError(f"the run is already at step {start_step}; raise --max-steps to distill further")

    raw = student.model
    optimizer = make_optimizer(raw, cfg.lr, cfg.weight_decay, cfg.max_steps)
    if resumed is not None:
        optimizer.load_state_dict(resumed["optimizer_states"][0])
        _set_rng_state(resumed.get("rtsvc", {}).get("rng", {}), device)
    optimizer.train()
    model = raw
    if d.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            raw, device_ids=[device.index] if device.type == "cuda" else None)
    student_fn = student_velocity(student)
    if model is not raw:  # DDP: the forward must go through the wrapper
        wrapped = copy.copy(student)
        wrapped.model = model
        student_fn = student_velocity(wrapped)
    teacher_fn = teacher_velocity(teacher, info.guidance)

    train_set = ClipDataset(cfg.data, meta, teacher.speakers, "train", cfg.max_frame_len)
    if len(train_set) == 0:
        raise UserError(f"{cfg.data} has no training clips")
    sampler = StepBatchSampler(len(train_set), cfg.batch_size, cfg.seed, start_step, cfg.max_steps, d.rank,
                               d.world)
    loader = DataLoader(train_set, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.num_workers,
                        pin_memory=device.type == "cuda", worker_init_fn=_worker_init,
                        generator=torch.Generator().manual_seed(cfg.seed))
    amp = autocast_dtype(cfg.precision, device)
    hparams = _hparams(cfg, teacher, info, d.world)
    if resumed is not None:
        hparams = resumed["hyper_parameters"]["cfg"]
        hparams["training"]["max_steps"] = cfg.max_steps
    log = MetricsLog(out, start_step if resumed else None) if d.main else None

    result = DistillResult(out, start_step, False, None, info, rank=d.rank)
    cache = TrajectoryCache(cfg.teacher_reuse)
    for refresh in cache.refresh_steps_before(start_step):  # --resume: the kept trajectories, exactly
        items = collate([train_set[item] for item in sampler.batch(refresh)])
        generator = torch.Generator(device=device).manual_seed(_step_seed(cfg, refresh, d.rank))
        with torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext():
            cache.add(teacher_trajectories(teacher_fn, {k: v.to(device) for k, v in items.items()}, info,
                                           generator, teacher.family))
    step, window, t_window = start_step, [], time.perf_counter()
    try:
        with StopFlag() as stop, _progress(cfg, d) as bar:
            task = bar.add_task("distill", total=cfg.max_steps, completed=start_step, loss=float("nan"),
                                sps=0.0)
            for batch in loader:
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                generator = torch.Generator(device=device).manual_seed(_step_seed(cfg, step, d.rank))
                ctx = torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext()
                with ctx:
                    if cache.due(step):  # the teacher's 31 guided evaluations per trajectory
                        found = cache.add(teacher_trajectories(teacher_fn, batch, info, generator,
                                                               teacher.family))
                    else:  # this step's batch is only its step count: new pairs of kept trajectories
                        found = cache.pick(generator)
                    loss = trajectory_loss(student_fn, found, info, generator, cfg.pairs, cfg.deployed_share)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    raw.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
                optimizer.step()
                step += 1
                window.append(loss.detach())
                epoch = sampler.epoch_at(step - 1)
                if step % cfg.log_every == 0 or step == cfg.max_steps:
                    window, t_window = log_window(d, result, window, t_window, log, (bar, task), optimizer,
                                                  grad_norm, step, epoch, device)
                if d.main:
                    bar.update(task, completed=step)
                if save_or_stop(cfg, d, stop, result, window, out, raw, optimizer, hparams, step, epoch,
                                device):
                    break
    finally:
        if log is not None:
            log.close()
        if d.world > 1:
            dist.destroy_process_group()
    result.global_step = step
    return result


def _step_seed(cfg: DistillConfig, step: int, rank: int) -> int:
    """A step's generator seed: its noise and intervals (a rebuilt cache draws the same noise)."""
    return cfg.seed * 1_000_003 + step * 4096 + rank


def _progress(cfg: DistillConfig, d) -> TrainProgress:
    return TrainProgress("distill", cfg.progress and d.main)
