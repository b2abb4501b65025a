"""The V2 DiT: upstream parameter names, shapes, CFG switch, rotary, init, and checkpoint loading."""

import copy
import math
import os

import pytest
import torch

from rtsvc.errors import UserError
from rtsvc.models.dit import DiT, DiTConfig, apply_rotary, sinusoidal_time
from rtsvc.models.loading import load_dit
from tests.tiny_models import make_tiny_dit_checkpoint, make_tiny_vocoder, tiny_dit_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield

# every parameter/buffer name of an upstream V2 DiT with depth 1 (rift_svc/dit.py + modules.py)
_WB = ("weight", "bias")
_COND = ("f0_embed", "rms_embed", "cvec_embed", "whisper_embed", "gate_linear", "ln",
         "mlp.dwconv", "mlp.mlp_proj", "mlp.mlp_out")
_INPUT = ("mel_embed", "proj", "mlp.dwconv", "mlp.mlp_proj", "mlp.mlp_out")
_BLOCK = ("attn_norm.proj", "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.attn_out",
          "mlp.dwconv", "mlp.mlp_proj", "mlp.mlp_out")
UPSTREAM_KEYS_DEPTH1 = {
    "spk_embed.weight", "null_whisper_embed.weight", "rotary_embed.inv_freq",
    *(f"time_embed.{m}.{p}" for m in ("time_emb", "proj") for p in _WB),
    *(f"cond_embed.{m}.{p}" for m in _COND for p in _WB),
    *(f"input_embed.{m}.{p}" for m in _INPUT for p in _WB),
    *(f"transformer_blocks.0.{m}.{p}" for m in _BLOCK for p in _WB),
    *(f"{m}.{p}" for m in ("norm_out.proj", "output") for p in _WB),
}


def inputs(b=2, n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(b, n, 128, generator=g), spk=torch.arange(b) % 2,
                f0=torch.rand(b, n, generator=g) * 300 + 100, rms=torch.rand(b, n, generator=g) * 0.1,
                cvec=torch.randn(b, n, 768, generator=g), whisper=torch.randn(b, n, 1280, generator=g),
                time=torch.rand(b, generator=g))


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_dit(make_tiny_dit_checkpoint(tmp_path_factory.mktemp("dit") / "tiny.ckpt"))


def test_parameter_names_match_upstream():
    model = DiT(DiTConfig(dim=64, depth=1, head_dim=32, num_speaker=3))
    assert set(model.state_dict()) == UPSTREAM_KEYS_DEPTH1
    sd = model.state_dict()
    assert sd["null_whisper_embed.weight"].shape == (1, 1280)
    assert sd["transformer_blocks.0.attn_norm.proj.weight"].shape == (6 * 64, 64)
    assert sd["cond_embed.gate_linear.weight"].shape == (64, 128)
    assert sd["transformer_blocks.0.mlp.dwconv.weight"].shape == (64, 1, 7)
    assert sd["rotary_embed.inv_freq"].shape == (16,)


def test_forward_shapes_and_dynamic_length(loaded):
    for n in (1, 7, 40):
        v = loaded.model(**inputs(n=n), drop_whisper=False)
        assert v.shape == (2, n, 128)
        assert torch.isfinite(v).all()


def test_scalar_time_equals_batched_time(loaded):
    kw = inputs()
    kw["time"] = torch.tensor(0.25)
    a = loaded.model(**kw, drop_whisper=False)
    kw["time"] = torch.full((2,), 0.25)
    assert torch.equal(a, loaded.model(**kw, drop_whisper=False))


def test_drop_whisper_bool_tensor_and_mixed_batch(loaded):
    kw = inputs()
    m = loaded.model
    full, null = m(**kw, drop_whisper=False), m(**kw, drop_whisper=True)
    assert (full - null).abs().max() > 1e-4  # whisper matters
    assert torch.allclose(m(**kw, drop_whisper=torch.tensor([True, True])), null, atol=1e-6)
    mixed = m(**kw, drop_whisper=torch.tensor([True, False]))
    assert torch.allclose(mixed[0], null[0], atol=1e-6) and torch.allclose(mixed[1], full[1], atol=1e-6)
    # dropped whisper: the whisper input no longer matters
    kw2 = dict(kw, whisper=torch.randn_like(kw["whisper"]))
    assert torch.allclose(m(**kw2, drop_whisper=True), null, atol=1e-6)


def test_every_condition_changes_the_output(loaded):
    kw = inputs()
    base = loaded.model(**kw, drop_whisper=False)
    for name in ("x", "f0", "rms", "cvec", "time"):
        changed = dict(kw, **{name: kw[name] * 1.5 + 0.1})
        assert (loaded.model(**changed, drop_whisper=False) - base).abs().max() > 1e-5, name
    other_spk = dict(kw, spk=1 - kw["spk"])
    assert (loaded.model(**other_spk, drop_whisper=False) - base).abs().max() > 1e-5


def test_key_mask_hides_padded_frames_from_attention(loaded):
    attn, rope = loaded.model.transformer_blocks[0].attn, loaded.model.rotary_embed(20)
    x = torch.randn(1, 20, 64)
    mask = torch.ones(1, 20, dtype=torch.bool)
    mask[:, 15:] = False
    a = attn(x, rope, mask)
    x2 = x.clone()
    x2[:, 15:] += 3.0  # change only the masked frames
    b = attn(x2, rope, mask)
    assert torch.allclose(a[:, :15], b[:, :15], atol=1e-6)
    assert torch.count_nonzero(a[:, 15:]) == 0  # masked frames' outputs are zeroed, as upstream
    assert not torch.allclose(attn(x, rope), attn(x2, rope), atol=1e-3)  # without a mask they matter
    full = torch.ones(1, 20, dtype=torch.bool)
    kw = inputs(b=1, n=20)
    assert torch.allclose(loaded.model(**kw, drop_whisper=False, mask=full),
                          loaded.model(**kw, drop_whisper=False), atol=1e-5)


def test_rotary_rotates_first_head_only_and_is_relative():
    freqs_mod = DiT(DiTConfig(dim=128, depth=1, head_dim=64)).rotary_embed
    freqs = freqs_mod(10)
    assert freqs.shape == (10, 64)
    q = torch.randn(1, 10, 128)
    rq = apply_rotary(q, freqs)
    assert torch.equal(rq[..., 64:], q[..., 64:])  # upstream quirk: channels past head_dim untouched
    assert torch.allclose(rq[:, 0], q[:, 0])  # position 0: no rotation
    assert torch.allclose(rq[..., :64].norm(dim=-1), q[..., :64].norm(dim=-1), atol=1e-5)
    # the score between positions depends only on their distance
    v, w = torch.randn(64), torch.randn(64)
    rv = apply_rotary(v.expand(1, 10, 64), freqs)[0]
    rw = apply_rotary(w.expand(1, 10, 64), freqs)[0]
    assert torch.allclose(rv[2] @ rw[5], rv[4] @ rw[7], atol=1e-4)
    # interleaved pairs (x-transformers): channels 0 and 1 rotate together at frequency 1
    x = torch.zeros(1, 2, 64)
    x[..., 0] = 1.0
    r = apply_rotary(x, freqs[:2])
    assert torch.allclose(r[0, 1, :2], torch.tensor([math.cos(1.0), math.sin(1.0)]), atol=1e-6)


def test_time_embedding_formula():
    t = torch.tensor([0.0, 0.5])
    emb = sinusoidal_time(t)
    assert emb.shape == (2, 256)
    i = 5
    freq = math.exp(-math.log(10000) * i / 127)
    assert math.isclose(emb[1, i].item(), math.sin(1000 * 0.5 * freq), abs_tol=1e-4)
    assert math.isclose(emb[1, 128 + i].item(), math.cos(1000 * 0.5 * freq), abs_tol=1e-4)


def test_spectral_init():
    torch.manual_seed(0)
    model = DiT(DiTConfig(dim=256, depth=2, num_speaker=4))
    w = model.cond_embed.whisper_embed.weight  # fan_in 1280, fan_out 256
    expected = 1 / math.sqrt(1280) * math.sqrt(256 / 1280)
    assert abs(w.std().item() / expected - 1) < 0.05
    up = model.transformer_blocks[0].mlp.mlp_proj.weight  # fan_in 256 -> fan_out 1024: min(1, .) = 1
    assert abs(up.std().item() * math.sqrt(256) - 1) < 0.05
    assert abs(model.spk_embed.weight.std().item() * math.sqrt(256) - 1) < 0.3
    zeroed = (model.output.weight, model.norm_out.proj.weight,
              model.transformer_blocks[1].attn_norm.proj.bias, model.cond_embed.mlp.mlp_out.weight,
              model.input_embed.mlp.mlp_out.weight)
    for zero in zeroed:
        assert torch.count_nonzero(zero) == 0
    assert torch.count_nonzero(model.cond_embed.cvec_embed.bias) == 0  # biases start at zero
    out = model(**inputs(n=5), drop_whisper=False)
    assert torch.count_nonzero(out) == 0  # zero output layer: a fresh model predicts 0


# --- loading -----------------------------------------------------------------------------------

def test_load_reads_speakers_config_and_is_deterministic(tmp_path, loaded):
    assert loaded.speakers == {"alice": 0, "bob": 1}
    assert loaded.config == tiny_dit_config(2)
    assert not loaded.model.training
    assert loaded.dataset["hop_length"] == 512
    again = load_dit(make_tiny_dit_checkpoint(tmp_path / "same.ckpt"))
    kw = inputs()
    assert torch.equal(loaded.model(**kw, drop_whisper=False), again.model(**kw, drop_whisper=False))
    other = load_dit(make_tiny_dit_checkpoint(tmp_path / "other.ckpt", seed=1))
    assert not torch.equal(loaded.model(**kw, drop_whisper=False), other.model(**kw, drop_whisper=False))
    assert loaded.speaker_index("bob") == 1
    with pytest.raises(UserError, match="unknown speaker 'carol'.*alice, bob"):
        loaded.speaker_index("carol")


def _edit(path, fn):
    ckpt = torch.load(path, weights_only=False)
    fn(ckpt)
    torch.save(ckpt, path)
    return path


def test_strict_keys(tmp_path):
    extra = _edit(make_tiny_dit_checkpoint(tmp_path / "extra.ckpt"),
                  lambda c: c["state_dict"].__setitem__("model.transformer.foo.weight", torch.zeros(1)))
    with pytest.raises(UserError, match="unexpected 1 key.*foo.weight"):
        load_dit(extra)
    missing = _edit(make_tiny_dit_checkpoint(tmp_path / "missing.ckpt"),
                    lambda c: c["state_dict"].pop("model.transformer.output.bias"))
    with pytest.raises(UserError, match="missing 1 key.*output.bias"):
        load_dit(missing)
    shape = _edit(make_tiny_dit_checkpoint(tmp_path / "shape.ckpt"),
                  lambda c: c["state_dict"].__setitem__("model.transformer.output.bias", torch.zeros(7)))
    with pytest.raises(UserError, match="does not match.*output.bias"):
        load_dit(shape)


def test_wrong_kind_of_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_dit(tmp_path / "nope.ckpt")
    text = tmp_path / "notes.ckpt"
    text.write_text("hello")
    with pytest.raises(UserError, match="not a PyTorch checkpoint"):
        load_dit(text)
    with pytest.raises(UserError, match="vocoder"):
        load_dit(make_tiny_vocoder(tmp_path / "voc"))
    rmvpe = tmp_path / "model.pt"
    torch.save({"unet.conv.weight": torch.zeros(2)}, rmvpe)
    with pytest.raises(UserError, match="bare state dict"):
        load_dit(rmvpe)
    with pytest.raises(UserError, match="directory"):
        load_dit(tmp_path)


def test_refuses_unknown_family_and_missing_speaker_table(tmp_path):
    def to_v1(c):
        sd = c["state_dict"]
        for k in [k for k in sd if "whisper" in k]:
            del sd[k]
    with pytest.raises(UserError, match="neither V2 keys .* nor V3 keys"):
        load_dit(_edit(make_tiny_dit_checkpoint(tmp_path / "v1.ckpt"), to_v1))
    no_table = _edit(make_tiny_dit_checkpoint(tmp_path / "nospk.ckpt"),
                     lambda c: c["hyper_parameters"]["cfg"].pop("spk2idx"))
    with pytest.raises(UserError, match="no speaker table"):
        load_dit(no_table)


def test_bfloat16_runs_close_to_float32(loaded):
    """Half precision: rotary and time features stay float32 inside, so positions stay exact."""
    half = copy.deepcopy(loaded.model).to(torch.bfloat16)
    kw = inputs(n=64)
    ref = loaded.model(**kw, drop_whisper=False)
    out = half(**{k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in kw.items()},
               drop_whisper=False)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()
