"""`rtsvc train`: the training loop (fine-tune or from scratch), one process or torchrun DDP.

One step: a batch of random 256-frame crops -> rectified-flow loss (`training.loss`) under
autocast -> backward -> optional grad clipping -> schedule-free AdamW step. Around it: logging to
RUN/metrics.jsonl (+ TensorBoard when installed), validation every `eval_every` steps, atomic
checkpoints (RUN/last.ckpt, RUN/step-N.ckpt) every `save_every` steps, exact resumption, and a
Ctrl-C that finishes the current step, saves and exits.

Multi-GPU: `torchrun --nproc_per_node=G $(which rtsvc) train ...` sets WORLD_SIZE/RANK/LOCAL_RANK;
each rank trains on its own slice of every global batch (DDP averages gradients), rank 0 alone
writes files. With WORLD_SIZE unset (or 1) the very same code runs with a world of one.
"""

import json
import math
import os
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from rtsvc.training.checkpoint import build_checkpoint, load_checkpoint, save_checkpoint
from rtsvc.training.config import TrainConfig
from rtsvc.training.dataset import ClipDataset, StepBatchSampler, collate, data_family
from rtsvc.training.loss import SPEAKER_DROP_FINETUNE, SPEAKER_DROP_SCRATCH, flow_loss
from rtsvc.training.model import DEFAULT_MODEL, TrainModel, from_pretrained, from_scratch, set_trainable
from rtsvc.training.optim import BETAS, WARMUP_RATIO, current_lr, make_optimizer
from rtsvc.training.pitch_stats import checkpoint_pitch_stats
from rtsvc.training.prepare import load_metadata
from rtsvc.training.progress import TrainProgress
from rtsvc.training.validate import MAX_VAL_FRAMES, ValSettings, validate
from torch.utils.data import DataLoader

from rtsvc.compute import pick_device
from rtsvc.dsp.audio import HOP_LENGTH, N_MELS, SAMPLE_RATE
from rtsvc.errors import UserError
from rtsvc.models.families import family_named
from rtsvc.models.loading import load_vocoder

FINETUNE_LR, SCRATCH_LR = 5e-5, 1e-3  # upstream README fine-tune / config pretrain.yaml
FINETUNE_WD, SCRATCH_WD = 0.01, 0.0
LAST = "last.ckpt"
METRICS = "metrics.jsonl"


@dataclass
class TrainResult:
    out: Path
    global_step: int
    interrupted: bool
    last_checkpoint: Path | None
    speakers: dict[str, int]
    new_speakers: list[str] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # per step (this rank), for tests and summaries
    rank: int = 0  # under torchrun only rank 0 reports


# --- distributed set-up ---------------------------------------------------------------------------

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> tuple[Dist, torch.device]:
    """WORLD_SIZE > 1 (torchrun): join the process group, one GPU per local rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), pick_device(device_name)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_name != "cpu"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank, world, local_rank), torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")


def _all_mean(value: float, d: Dist, device: torch.device) -> float:
    if d.world == 1:
        return value
    t = torch.tensor([value], device=device, dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / d.world


def _any(flag: bool, d: Dist, device: torch.device) -> bool:
    if d.world == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t)


# --- precision ------------------------------------------------------------------------------------

def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise UserError(f"unknown --precision {precision!r}: use auto, fp32, bf16 or fp16")
    if precision == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else None
    if precision == "fp16" and device.type != "cuda":
        raise UserError("--precision fp16 needs a CUDA device (use bf16 or fp32 on CPU)")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


# --- run folder -----------------------------------------------------------------------------------

class MetricsLog:
    """RUN/metrics.jsonl (one JSON object per line) and TensorBoard scalars when available."""

    def __init__(self, out: Path, resume_step: int | None):
        self.path = out / METRICS
        if resume_step is not None and self.path.exists():
            keep = [line for line in self.path.read_text().splitlines() if _step_of(line) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in keep))  # steps after it are redone
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
        except Exception:  # tensorboard not installed: the jsonl file is the log
            self.tb = None

    def write(self, record: dict) -> None:
        plain = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        with self.path.open("a") as f:  # strict JSON: NaN / inf become null
            f.write(json.dumps(plain) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key in ("step", "time") or not isinstance(value, int | float) or not math.isfinite(value):
                    continue
                tag = f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}"
                self.tb.add_scalar(tag, value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _step_of(line: str) -> float:
    """The step of a metrics line; a torn last line (crash mid-write) counts as after every step."""
    try:
        return json.loads(line).get("step", math.inf)
    except ValueError:
        return math.inf


class StopFlag:
    """First Ctrl-C asks the loop to stop after the current step; a second one aborts at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: no handler, Ctrl-C stays a KeyboardInterrupt
            self._previous = None
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _worker_init(_: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process handles Ctrl-C


# --- the run --------------------------------------------------------------------------------------

def _hparams(cfg: TrainConfig, tm: TrainModel, meta_path: str, lr: float, wd: float, world: int,
             spk_drop: float) -> dict:
    c = tm.dit.config
    family = family_named(tm.family)
    model = family.model_hparams(c, tm.name)  # upstream's layout (V2 nested under cfg, V3 flat)
    family_training = {}
    if family.training_drop == "whisper":  # upstream records these with V2's model
        model.update(lognorm=cfg.lognorm, whisper_drop_prob=cfg.whisper_drop)
    else:  # "speaker" (V3, in its training section)
        family_training["drop_spk_prob"] = spk_drop
    if family.adapters:
        family_training["freeze_adaln_and_tembed"] = cfg.freeze_adaln_and_tembed
    (model if family.pretrained_path_in == "model" else family_training)["pretrained_path"] = cfg.pretrained
    if family.adapters and c.lora_rank is not None:
        family_training.update(lora_training=cfg.lora_rank is not None, lora_rank=c.lora_rank,
                               lora_alpha=c.lora_alpha)
    return {
        "seed": cfg.seed,
        "model": model,
        "dataset": {"data_dir": str(cfg.data), "meta_info_path": meta_path, "sample_rate": SAMPLE_RATE,
                    "hop_length": HOP_LENGTH, "n_mel_channels": N_MELS, "max_frame_len": cfg.max_frame_len},
        "training": {"learning_rate": lr, "betas": str(BETAS), "weight_decay": wd,
                     "batch_size_per_gpu": cfg.batch_size, "grad_accumulation_steps": 1,
                     "max_grad_norm": cfg.grad_clip, "max_steps": cfg.max_steps, "warmup_ratio": WARMUP_RATIO,
                     "save_per_steps": cfg.save_every, "test_per_steps": cfg.eval_every,
                     "eval_sample_steps": cfg.eval_steps, "eval_cfg_strength": cfg.eval_cfg,
                     "precision": cfg.precision, "world_size": world, "save_weights_only": False,
                     "time_schedule": "lognorm" if cfg.lognorm else "uniform", **family_training},
        "spk2idx": dict(tm.spk2idx),
        # the voice this run adds is what live/convert/serve use without --speaker (rtsvc.models.loading)
        "default_speaker": tm.new_speakers[0] if tm.new_speakers else None,
    }


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _save(out: Path, raw, optimizer, hparams: dict, step: int, epoch: int, device: torch.device,
          keep_step: bool) -> Path:
    """Evaluation weights + optimizer state -> RUN/last.ckpt (and RUN/step-N.ckpt)."""
    optimizer.eval()  # schedule-free: x (the averaged weights) is what inference should use
    ckpt = build_checkpoint(raw.state_dict(), hparams, step, epoch, optimizer.state_dict(),
                            {"rng": _rng_state(device)})
    optimizer.train()
    last = save_checkpoint(out / LAST, ckpt)
    if keep_step:
        step_path = out / f"step-{step}.ckpt"
        step_path.unlink(missing_ok=True)
        try:
            os.link(last, step_path)  # same bytes; last.ckpt is later replaced, not rewritten
        except OSError:
            save_checkpoint(step_path, ckpt)
    return last


def _build_model(cfg: TrainConfig, speakers: list[str], out: Path,
                 family: str) -> tuple[TrainModel, dict | None]:
    if cfg.resume:
        last = out / LAST
        if not last.is_file():
            raise UserError(f"--resume: no {last} to resume from (start without --resume)")
        ckpt = load_checkpoint(last)
        tm = from_pretrained(str(last), [])
        missing = [s for s in speakers if s not in tm.spk2idx]
        if missing:
            raise UserError(f"--resume: the data has new speaker(s) {', '.join(missing)}; start a new run "
                            f"with --pretrained {last} to add them")
        tm.new_speakers = []
        training = ckpt["hyper_parameters"]["cfg"].get("training", {})  # what trained stays so
        set_trainable(tm.dit, training.get("lora_rank") if training.get("lora_training") else None,
                      training.get("lora_alpha"), bool(training.get("freeze_adaln_and_tembed")))
        return tm, ckpt
    if cfg.pretrained:
        tm = from_pretrained(cfg.pretrained, speakers, cfg.model)
    else:
        tm = from_scratch(cfg.model or DEFAULT_MODEL, speakers, family)
    set_trainable(tm.dit, cfg.lora_rank, cfg.lora_alpha, cfg.freeze_adaln_and_tembed)
    return tm, None


def _vocoder(cfg: TrainConfig, meta: dict, device: torch.device):
    """The vocoder for validation audio, or None (validation then writes plots only)."""
    from rtsvc.pretrained import resolve_pretrained

    pretrained_dir = cfg.pretrained_dir or meta.get("settings", {}).get("pretrained_dir")
    try:
        paths = resolve_pretrained(pretrained_dir, vocoder=cfg.vocoder, need=("vocoder",))
        return load_vocoder(paths.vocoder, device)
    except UserError:
        if cfg.vocoder or cfg.pretrained_dir:  # asked for explicitly: a wrong path is an error
            raise
        return None


def check_config(cfg: TrainConfig) -> None:
    """Counts that must be positive, said before anything loads."""
    for name, value in (("--max-steps", cfg.max_steps), ("--batch-size", cfg.batch_size),
                        ("--save-every", cfg.save_every), ("--log-every", cfg.log_every)):
        if value < 1:
            raise UserError(f"{name} must be at least 1, got {value}")


def train(cfg: TrainConfig) -> TrainResult:
    """Run (or continue) a training run; returns when max_steps is reached or on Ctrl-C."""
    check_config(cfg)
    d, device = init_distributed(cfg.device)
    if device.type == "cuda":  # TF32 matmuls for whatever runs outside autocast (fp32 runs, the loss)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out = Path(cfg.out)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
    if not cfg.resume and (out / LAST).exists():
        raise UserError(f"{out / LAST} exists: add --resume to continue that run, or choose another --out")
    meta = load_metadata(cfg.data)
    torch.manual_seed(cfg.seed + d.rank)
    family = data_family(meta)
    tm, resumed = _build_model(cfg, meta["speakers"], out, family)
    if tm.family != family:
        raise UserError(f"{cfg.data} was prepared for {family.upper()} models but the model is "
                        f"{tm.family.upper()}: run `rtsvc prepare {cfg.data} --family {tm.family}`")
    start_step = int(resumed["global_step"]) if resumed else 0
    if start_step >= cfg.max_steps:
        raise UserError(f"the run is already at step {start_step}; raise --max-steps to train further")

    finetune = bool(cfg.pretrained)
    spk_drop = cfg.spk_drop
    if spk_drop is None:
        spk_drop = SPEAKER_DROP_FINETUNE if finetune else SPEAKER_DROP_SCRATCH
    lr = cfg.lr if cfg.lr is not None else (FINETUNE_LR if finetune else SCRATCH_LR)
    wd = cfg.weight_decay if cfg.weight_decay is not None else (FINETUNE_WD if finetune else SCRATCH_WD)
    raw = tm.dit.to(device).train()
    optimizer = make_optimizer(raw, lr, wd, cfg.max_steps)
    if resumed is not None:
        if not resumed["optimizer_states"]:
            raise UserError(f"{out / LAST} has no optimizer state: cannot resume exactly")
        optimizer.load_state_dict(resumed["optimizer_states"][0])
        _set_rng_state(resumed.get("rtsvc", {}).get("rng", {}), device)
    optimizer.train()
    model = raw
    if d.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            raw, device_ids=[device.index] if device.type == "cuda" else None)

    train_set = ClipDataset(cfg.data, meta, tm.spk2idx, "train", cfg.max_frame_len)
    if len(train_set) == 0:
        raise UserError(f"{cfg.data} has no training clips")
    val_set = ClipDataset(cfg.data, meta, tm.spk2idx, "val", MAX_VAL_FRAMES)  # clip starts, uncropped
    if len(val_set) == 0:  # tiny datasets hold nothing out: validate on training clips
        val_set = ClipDataset(cfg.data, meta, tm.spk2idx, "train", MAX_VAL_FRAMES)
        val_set.split = "val"
    sampler = StepBatchSampler(len(train_set), cfg.batch_size, cfg.seed, start_step, cfg.max_steps,
                               d.rank, d.world)
    loader = DataLoader(train_set, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.num_workers,
                        pin_memory=device.type == "cuda", worker_init_fn=_worker_init,
                        persistent_workers=False,
                        generator=torch.Generator().manual_seed(cfg.seed))  # leaves the global RNG alone
    amp = autocast_dtype(cfg.precision, device)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    hparams = _hparams(cfg, tm, str(Path(cfg.data) / ".rtsvc-cache" / "metadata.json"), lr, wd, d.world,
                       spk_drop)
    hparams["pitch_stats"] = checkpoint_pitch_stats(meta, tm.base_pitch_stats, tm.spk2idx)  # auto pitch
    if resumed is not None:  # the run keeps the settings it started with; only its length changes
        hparams = resumed["hyper_parameters"]["cfg"]
        hparams["training"]["max_steps"] = cfg.max_steps
    log = MetricsLog(out, start_step if resumed else None) if d.main else None
    vocoder = _vocoder(cfg, meta, device) if d.main and cfg.eval_every > 0 else None
    speakers = [n for n, _ in sorted(tm.spk2idx.items(), key=lambda kv: kv[1])]

    result = TrainResult(out, start_step, False, None, dict(tm.spk2idx), list(tm.new_speakers), rank=d.rank)
    step = start_step
    window: list[torch.Tensor] = []  # losses since the last log line, kept on the device (no sync)
    t_window = time.perf_counter()
    progress = _progress(cfg, d, start_step)
    data_speakers = list(meta["speakers"])
    progress.say(f"train: {tm.family.upper()} model, {len(train_set)} clips from {len(data_speakers)} speaker"
                 f"{'s' if len(data_speakers) != 1 else ''} ({', '.join(data_speakers)}), device {device}, "
                 f"steps {start_step} to {cfg.max_steps}")
    try:
        with StopFlag() as stop, progress as bar:
            task = bar.add_task("train", total=cfg.max_steps, completed=start_step, loss=float("nan"),
                                sps=0.0)
            for batch in loader:
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                seed = cfg.seed * 1_000_003 + step * 4096 + d.rank  # this step's noise, times, drops
                generator = torch.Generator(device=device).manual_seed(seed)
                ctx = torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext()
                with ctx:
                    loss = flow_loss(model, batch, generator, cfg.whisper_drop, cfg.lognorm, tm.family,
                                     spk_drop)
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                else:
                    loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    raw.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                step += 1
                window.append(loss.detach())
                epoch = sampler.epoch_at(step - 1)

                if step % cfg.log_every == 0 or step == cfg.max_steps:
                    window, t_window = log_window(d, result, window, t_window, log, (bar, task), optimizer,
                                                  grad_norm, step, epoch, device)
                if d.main:
                    bar.update(task, completed=step)

                if cfg.eval_every > 0 and (step % cfg.eval_every == 0 or step == cfg.max_steps) and d.main:
                    optimizer.eval()
                    raw.eval()
                    metrics = validate(raw, val_set, out / "val" / f"step-{step}", device,
                                       ValSettings(cfg.eval_samples, cfg.eval_steps, cfg.eval_cfg),
                                       speakers, vocoder)
                    raw.train()
                    optimizer.train()
                    log.write({"step": step, **metrics})
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


def log_window(d: "Dist", result, window: list, t_window: float, log, progress, optimizer, grad_norm,
               step: int, epoch: int, device: torch.device) -> tuple[list, float]:
    """A metrics.jsonl line for the steps since the last one (mean loss over ranks, steps/s) and the
    progress bar; returns the new, empty window and its start time."""
    values = torch.stack(window).float().cpu().tolist()  # the one sync per log line
    result.losses.extend(values)
    mean_loss = _all_mean(sum(values) / len(values), d, device)
    elapsed = time.perf_counter() - t_window
    sps = len(values) / elapsed if elapsed > 0 else 0.0
    if d.main:
        log.write({"step": step, "loss": mean_loss, "lr": current_lr(optimizer),
                   "grad_norm": float(grad_norm), "steps_per_s": sps, "epoch": epoch, "time": time.time()})
        bar, task = progress
        bar.update(task, loss=mean_loss, sps=sps)
    return [], time.perf_counter()


def save_or_stop(cfg, d: "Dist", stop, result, window: list, out: Path, raw, optimizer, hparams: dict,
                 step: int, epoch: int, device: torch.device) -> bool:
    """End of a step in `train` and `distill`: the periodic checkpoint (and the last one), then a
    Ctrl-C stop that saves where it is. True when the loop must stop."""
    if step % cfg.save_every == 0 or step == cfg.max_steps:
        if d.main:
            result.last_checkpoint = _save(out, raw, optimizer, hparams, step, epoch, device,
                                           keep_step=step % cfg.save_every == 0)
        _barrier(d)
    if not (_any(stop.requested, d, device) and step < cfg.max_steps):
        return False
    result.interrupted = True
    result.losses.extend(torch.stack(window).float().cpu().tolist() if window else [])
    if d.main and step % cfg.save_every != 0:
        result.last_checkpoint = _save(out, raw, optimizer, hparams, step, epoch, device, keep_step=False)
    return True


def _barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def _progress(cfg: TrainConfig, d: Dist, start: int) -> TrainProgress:
    """Loss, steps/s and ETA on rank 0 (a bar on a terminal, plain lines otherwise); silent elsewhere."""
    return TrainProgress("train", cfg.progress and d.main)
