"""`rtsvc prepare --family v3` and `rtsvc train` of V3 models: fine-tune (upstream checkpoint,
freeze_adaln_and_tembed), LoRA (adapters and speaker table train, nothing else), resume."""


import pytest
import torch
from rtsvc.training.dataset import data_family
from rtsvc.training.loss import speaker_drop
from rtsvc.training.prepare import cache_root, load_metadata
from rtsvc.training.train import TrainConfig, train

from rtsvc.errors import UserError
from rtsvc.models.loading import load_dit
from rtsvc.models.lora import LoRALinear
from tests.test_prepare import make_voices
from tests.test_train import _cli
from tests.upstream.fixtures import make_v3_head

TINY = dict(batch_size=4, lr=3e-3, log_every=5, num_workers=0, device="cpu", progress=False, eval_every=0)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def v3_data(tmp_path_factory, tiny_pretrained_v3):
    pretrained = tiny_pretrained_v3  # V3 preparation needs no Whisper
    root = tmp_path_factory.mktemp("data3")
    make_voices(root)
    code, output = _cli(["prepare", root, "--pretrained-dir", pretrained, "--f0", "pyworld", "--workers", "1",
                         "--device", "cpu", "--family", "v3"])
    assert code == 0, output
    return root


@pytest.fixture(scope="module")
def upstream_v3(tmp_path_factory):
    path, _ = make_v3_head(tmp_path_factory.mktemp("up") / "pretrain-v3.ckpt")
    return path


def test_v3_data_has_no_whisper(v3_data):
    meta = load_metadata(v3_data)
    assert data_family(meta) == "v3" and meta["settings"]["resize"] == "linear"
    clip = torch.load(cache_root(v3_data) / meta["clips"][0]["file"], weights_only=True)
    assert "whisper" not in clip and clip["cvec"].shape == (clip["mel"].shape[0], 768)


def test_v3_finetune_with_frozen_adaln(v3_data, upstream_v3, tmp_path):
    before = load_dit(upstream_v3).model.state_dict()
    result = train(TrainConfig(data=str(v3_data), out=str(tmp_path / "ft"), pretrained=str(upstream_v3),
                               max_steps=6, save_every=6, freeze_adaln_and_tembed=True, **TINY))
    loaded = load_dit(result.last_checkpoint)
    after = loaded.model.state_dict()
    assert loaded.family == "v3" and set(result.speakers) >= {"alice", "bob", "low", "high"}
    for key in ("tembed.proj.weight", "norm_out.proj.weight", "transformer_blocks.0.attn_norm.proj.weight"):
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0)  # frozen
    for key in ("transformer_blocks.0.attn.q_proj.weight", "cond_embed.out.weight", "output.weight"):
        assert not torch.equal(after[key], before[key]), key  # trained
    assert loaded.config.kernel_size == 31


def test_v3_lora_trains_adapters_and_speakers_only(v3_data, upstream_v3, tmp_path):
    before = load_dit(upstream_v3).model.state_dict()
    result = train(TrainConfig(data=str(v3_data), out=str(tmp_path / "lora"), pretrained=str(upstream_v3),
                               max_steps=6, save_every=6, lora_rank=2, lora_alpha=4.0, **TINY))
    loaded = load_dit(result.last_checkpoint)
    assert (loaded.config.lora_rank, loaded.config.lora_alpha) == (2, 4.0)
    state = loaded.model.state_dict()
    layer = loaded.model.transformer_blocks[1].attn.v_proj
    assert isinstance(layer, LoRALinear) and layer.B.abs().max() > 0  # B starts at 0: it trained
    for key, value in before.items():
        if key.startswith("spk_embed"):
            continue
        mapped = key.replace("k_proj.", "k_proj.linear.").replace("v_proj.", "v_proj.linear.")
        torch.testing.assert_close(state[mapped], value, rtol=0, atol=0)  # everything else frozen
    assert not torch.equal(state["spk_embed.weight"][:2], before["spk_embed.weight"])


def test_v3_lora_resume_keeps_training_only_the_adapters(v3_data, upstream_v3, tmp_path):
    out = tmp_path / "r"
    train(TrainConfig(data=str(v3_data), out=str(out), pretrained=str(upstream_v3), max_steps=4, save_every=2,
                      lora_rank=2, lora_alpha=4.0, **TINY))
    first = load_dit(out / "last.ckpt").model.state_dict()
    result = train(TrainConfig(data=str(v3_data), out=str(out), max_steps=6, save_every=2, resume=True,
                               **TINY))
    assert result.global_step == 6
    second = load_dit(result.last_checkpoint).model.state_dict()
    assert torch.equal(first["output.weight"], second["output.weight"])
    key = "transformer_blocks.0.attn.k_proj.B"
    assert not torch.equal(first[key], second[key])


def test_v3_from_scratch_follows_the_data_family(v3_data, tmp_path):
    result = train(TrainConfig(data=str(v3_data), out=str(tmp_path / "s"), model="dit-64-2", max_steps=2,
                               save_every=2, **TINY))
    assert load_dit(result.last_checkpoint).family == "v3"


def test_family_mismatch_and_lora_on_v2_are_user_errors(v3_data, tmp_path):
    from tests.tiny_models import make_tiny_dit_checkpoint
    v2 = make_tiny_dit_checkpoint(tmp_path / "v2.ckpt")
    with pytest.raises(UserError, match="prepared for V3 models but the model is V2"):
        train(TrainConfig(data=str(v3_data), out=str(tmp_path / "x"), pretrained=str(v2), max_steps=2,
                          **TINY))
    with pytest.raises(UserError, match="--lora-rank needs --lora-alpha"):
        train(TrainConfig(data=str(v3_data), out=str(tmp_path / "y"), model="dit-64-2", max_steps=2,
                          lora_rank=2, **TINY))


def test_speaker_drop_is_exactly_int_b_p():
    g = torch.Generator().manual_seed(0)
    for b, p in ((64, 0.2), (5, 0.2), (4, 0.0)):
        assert int(speaker_drop(b, p, g, torch.device("cpu")).sum()) == int(b * p)
