"""Short-window vs upstream features, the tables of docs/features.md (a measurement, not a test).

    python -m benchmarks.feature_windows                       # random weights at real sizes
    python -m benchmarks.feature_windows --contentvec pretrained/content-vec-best \\
        --whisper pretrained/whisper-large-v3                     # the real models
"""

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from scipy.signal import lfilter

SR = 16000
WINDOWS_S = (0.5, 1.0, 2.0, 4.0)
ENDS_S = (5.0, 7.0, 9.0, 11.0)  # where the windows end in the 12 s clip
HEADER = ("| window | comparison | cos mean | cos min | cos newest 0.25 s | rel. err mean | "
          "rel. err newest 0.25 s |\n|---|---|---|---|---|---|---|")


def window_fidelity(reference: torch.Tensor, window_fn, audio_16k: np.ndarray, window_s: float,
                    ends_s: tuple[float, ...], tail_s: float = 0.25, frame_rate: int = 50) -> dict:
    """How close features of short windows are to `reference` (the same clip's upstream features).

    `window_fn(audio_window_16k) -> [frames, d]` at `frame_rate`; for each window ending at `ends_s`
    (lasting `window_s`, left context included) the frames are compared with the reference frames at
    the same times: cosine similarity and relative L2 error per frame, over all frames and over the
    newest `tail_s` (what a streaming block keeps): the comparison behind docs/features.md.
    """
    hop = SR // frame_rate
    tail = max(1, int(tail_s * frame_rate))
    win, ref = [], []
    for end in ends_s:
        a, b = int((end - window_s) * SR), int(end * SR)
        feats = window_fn(audio_16k[a:b])
        r = reference[a // hop: a // hop + feats.shape[0]]
        win.append(feats[: r.shape[0]].float().cpu())
        ref.append(r.float().cpu())

    def stats(x: list[torch.Tensor], y: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = torch.cat(x), torch.cat(y)
        return F.cosine_similarity(x, y, dim=-1), (x - y).norm(dim=-1) / y.norm(dim=-1).clamp_min(1e-8)

    cos, rel = stats(win, ref)
    cos_t, rel_t = stats([w[-tail:] for w in win], [r[-tail:] for r in ref])
    return {"cos_mean": cos.mean().item(), "cos_min": cos.min().item(), "cos_tail": cos_t.mean().item(),
            "rel_mean": rel.mean().item(), "rel_tail": rel_t.mean().item()}



def speechlike(seconds: float, seed: int = 0) -> np.ndarray:
    """Vowel-like pulse trains (gliding F0, three formant resonances), noise bursts and pauses."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SR)
    out = np.zeros(n)
    t = 0
    while t < n:
        seg = int(rng.uniform(0.15, 0.5) * SR)
        kind = rng.choice(["voiced", "voiced", "noise", "pause"])
        if kind == "voiced":
            f0 = rng.uniform(100, 300) * 2 ** np.linspace(0, rng.uniform(-0.3, 0.3), seg)
            phase = np.cumsum(2 * np.pi * f0 / SR)
            x = sum(np.sin(k * phase) / k for k in range(1, 30))
            for fc in rng.uniform([300, 900, 2200], [900, 2200, 3500]):
                r, th = 0.97, 2 * np.pi * fc / SR
                x = lfilter([1 - r], [1, -2 * r * np.cos(th), r * r], x)
        elif kind == "noise":
            x = rng.standard_normal(seg) * 0.3
        else:
            x = np.zeros(seg)
        out[t:t + seg] = (x * np.hanning(seg) ** 0.3)[: n - t]
        t += seg
    return (0.3 * out / np.abs(out).max()).astype(np.float32)


def row(window: float, label: str, s: dict) -> str:
    return (f"| {window:.1f} s | {label} | {s['cos_mean']:.3f} | {s['cos_min']:.3f} | {s['cos_tail']:.3f} | "
            f"{s['rel_mean']:.3f} | {s['rel_tail']:.3f} |")


def merge(stats: list[dict]) -> dict:
    return {k: min(d[k] for d in stats) if k == "cos_min" else float(np.mean([d[k] for d in stats]))
            for k in stats[0]}


def random_whisper():
    from transformers import WhisperConfig, WhisperFeatureExtractor
    from transformers.models.whisper.modeling_whisper import WhisperEncoder as HFWhisperEncoder

    from rtsvc.features.whisper import WhisperEncoder

    cfg = WhisperConfig(d_model=512, encoder_layers=6, encoder_attention_heads=8, encoder_ffn_dim=2048,
                        num_mel_bins=128, decoder_layers=0, vocab_size=16, pad_token_id=1, bos_token_id=2,
                        eos_token_id=3, decoder_start_token_id=2)
    front_end = WhisperFeatureExtractor(feature_size=128)
    return WhisperEncoder(HFWhisperEncoder(cfg), front_end, torch.device("cpu"))


def random_contentvec():
    from transformers import HubertConfig

    from rtsvc.features.contentvec import ContentVec, HubertModelWithFinalProj

    return ContentVec(HubertModelWithFinalProj(HubertConfig(classifier_proj_size=256)), torch.device("cpu"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contentvec", help="content-vec-best folder (default: random HuBERT-base size)")
    parser.add_argument("--whisper", help="whisper-large-v3 folder (default: random base size)")
    args = parser.parse_args()
    torch.manual_seed(0)
    clip = speechlike(12.0)

    if args.whisper:
        from rtsvc.features.whisper import WhisperEncoder

        enc = WhisperEncoder.load(args.whisper)
    else:
        enc = random_whisper()
    full = enc.hidden(clip)  # upstream: the whole clip, padded to 30 s, cut to floor(s * 50)
    print(f"Whisper ({args.whisper or 'random, base-sized d512 x 6, 128 mel bins'})\n{HEADER}")
    for w in WINDOWS_S:
        own = []  # reference: the same window padded to 30 s (frames line up from 0)
        for end in ENDS_S:
            seg = clip[int((end - w) * SR): int(end * SR)]
            own.append(window_fidelity(enc.hidden(seg, pad_to_30s=True),
                                       lambda a: enc.hidden(a, pad_to_30s=False), seg, w, (w,)))
        print(row(w, "short vs same window padded to 30 s", merge(own)))
        print(row(w, "padded window vs whole clip",
                  window_fidelity(full, lambda a: enc.hidden(a, pad_to_30s=True), clip, w, ENDS_S)))
        print(row(w, "short vs whole clip",
                  window_fidelity(full, lambda a: enc.hidden(a, pad_to_30s=False), clip, w, ENDS_S)))
        shifted = [window_fidelity(full, lambda a, o=int((end - w) * SR) // 320: enc.hidden(
            a, pad_to_30s=False, position_offset=o), clip, w, (end,)) for end in ENDS_S]
        print(row(w, "short, positions at clip offset, vs whole clip", merge(shifted)))

    if args.contentvec:
        from rtsvc.features.contentvec import ContentVec

        cv = ContentVec.load(args.contentvec)
    else:
        cv = random_contentvec()
    fullc = cv.hidden(clip)
    print(f"\nContentVec ({args.contentvec or 'random, HuBERT-base-sized 768 x 12'})\n{HEADER}")
    for w in WINDOWS_S:
        print(row(w, "window vs whole clip", window_fidelity(fullc, cv.hidden, clip, w, ENDS_S)))


if __name__ == "__main__":
    main()
