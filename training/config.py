"""What `rtsvc train` and `rtsvc distill` run with: the run settings and their defaults, importable
without torch (the command line reads its defaults and help from here)."""

from dataclasses import dataclass

MAX_FRAME_LEN = 256  # upstream dataset.max_frame_len (about 3 s)
WHISPER_DROP = 0.2  # V2
DISTILL_LR = 1e-4


@dataclass
class TrainConfig:
    data: str
    out: str
    pretrained: str | None = None  # checkpoint to fine-tune; None = from scratch
    model: str | None = None  # preset for from-scratch (default dit-768-12)
    max_steps: int = 30000
    batch_size: int = 64  # per GPU
    lr: float | None = None  # None: 5e-5 fine-tune, 1e-3 from scratch
    weight_decay: float | None = None  # None: 0.01 fine-tune, 0 from scratch
    grad_clip: float = 0.0  # max global grad norm; 0 = off (upstream)
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    save_every: int = 1000
    eval_every: int = 1000
    log_every: int = 10
    eval_samples: int = 2
    eval_steps: int = 32
    eval_cfg: float = 2.0
    max_frame_len: int = MAX_FRAME_LEN
    whisper_drop: float = WHISPER_DROP
    lognorm: bool = True
    num_workers: int = 2
    seed: int = 2025
    resume: bool = False
    device: str = "auto"
    pretrained_dir: str | None = None  # for the validation vocoder; default: the one prepare used
    vocoder: str | None = None
    progress: bool = True
    lora_rank: int | None = None  # V3: train LoRA adapters (+ the speaker table) only
    lora_alpha: float | None = None
    freeze_adaln_and_tembed: bool = False  # V3: upstream's fine-tune option
    spk_drop: float | None = None  # V3 speaker drop; None: 0.2 from scratch, 0 fine-tuning (upstream)


@dataclass
class DistillConfig:
    teacher: str
    data: str
    out: str
    nfe: int = 1  # evaluations per block the student is made for (1 or 2)
    max_steps: int = 5000
    batch_size: int = 16  # trajectories per step per GPU; the student sees batch_size * pairs items
    pairs: int = 4  # intervals trained per teacher trajectory
    teacher_reuse: int = 4  # steps per batch of teacher trajectories (training.distill_cache); 1: fresh
    deployed_share: float = 0.5  # share of intervals that are the 1-/2-evaluation ones
    # guidance baked in; None = the family's default (V2: cfg 2.0; V3: ds 0.2, spk 0.8, skip 0, rescale 0.7)
    cfg_strength: float | None = None  # V2
    ds_cfg_strength: float | None = None  # V3
    spk_cfg_strength: float | None = None  # V3
    skip_cfg_strength: float | None = None  # V3
    cfg_skip_layers: list[int] | None = None  # V3: blocks the skip pass bypasses
    lr: float = DISTILL_LR
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    precision: str = "auto"
    save_every: int = 500
    log_every: int = 10
    max_frame_len: int = MAX_FRAME_LEN
    num_workers: int = 2
    seed: int = 2025
    resume: bool = False
    device: str = "auto"
    progress: bool = True
