"""`rtsvc distill --teacher-reuse`: teacher trajectories computed every Nth step and reused between
(training.distill_cache); 1 is the original recipe, bit for bit."""

import pytest
import rtsvc.training.distill as distill_module
import torch
from rtsvc.training.distill import DistillConfig, distill
from rtsvc.training.distill_cache import TrajectoryCache
from rtsvc.training.distill_loss import Trajectories, distill_loss, teacher_trajectories, trajectory_loss

from tests import test_distill

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
TINY = dict(batch_size=2, pairs=2, lr=1e-3, log_every=2, num_workers=0, device="cpu", progress=False,
            max_frame_len=64, cfg_strength=1.5)


data, teacher = test_distill.data, test_distill.teacher  # the same fixtures: prepared set, teacher


def _entry(tag: float) -> Trajectories:
    return Trajectories(cond=None, traj=torch.full((2, 1, 1, 1), tag), grid=torch.tensor([0.0, 1.0]))


def test_cache_refreshes_every_nth_step_and_picks_reproducibly():
    cache = TrajectoryCache(reuse=3, size=2)
    assert cache.due(5)  # nothing kept yet: a resumed run refreshes at once
    cache.add(_entry(0))
    assert [cache.due(s) for s in range(6, 13)] == [True, False, False, True, False, False, True]
    cache.add(_entry(1))
    cache.add(_entry(2))
    assert [float(e.traj.flatten()[0]) for e in cache.kept] == [1.0, 2.0] and cache.refreshes == 3
    picks = [float(cache.pick(torch.Generator().manual_seed(s)).traj.flatten()[0]) for s in range(20)]
    assert set(picks) == {1.0, 2.0}
    assert picks == [float(cache.pick(torch.Generator().manual_seed(s)).traj.flatten()[0]) for s in range(20)]
    one = TrajectoryCache(reuse=1)
    one.add(_entry(0))
    assert one.kept == [] and all(one.due(s) for s in range(5))  # nothing held for the original recipe
    with pytest.raises(ValueError):
        TrajectoryCache(reuse=0)


def test_split_loss_is_the_original_loss():
    from rtsvc.models.student import StudentInfo

    g = torch.Generator().manual_seed(0)
    batch = {"mel": torch.randn(2, 12, 128, generator=g) - 4, "frame_len": torch.tensor([12, 9]),
             "spk_id": torch.tensor([0, 1]), "f0": torch.rand(2, 12, generator=g) * 200 + 100,
             "rms": torch.rand(2, 12, generator=g) * 0.1, "cvec": torch.randn(2, 12, 768, generator=g),
             "whisper": torch.randn(2, 12, 1280, generator=g)}
    info = StudentInfo(nfe=1, grid=[0.0, 1.0])
    teacher = lambda x, t, cond: 0.5 * x + t  # noqa: E731
    student = lambda x, t, dt, cond: 0.4 * x + (t + dt).reshape(-1, 1, 1)  # noqa: E731
    whole = distill_loss(student, teacher, batch, info, torch.Generator().manual_seed(7), pairs=3)
    g2 = torch.Generator().manual_seed(7)
    split = trajectory_loss(student, teacher_trajectories(teacher, batch, info, g2), info, g2, pairs=3)
    assert torch.equal(whole, split) and whole > 0


def test_teacher_runs_every_nth_step_only(data, teacher, tmp_path, monkeypatch):
    calls = []
    original = distill_module.teacher_trajectories

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(distill_module, "teacher_trajectories", counted)
    result = distill(DistillConfig(teacher=str(teacher), data=str(data), out=str(tmp_path / "r3"),
                                   max_steps=7, save_every=7, teacher_reuse=3, **TINY))
    assert result.global_step == 7 and len(calls) == 3  # steps 0, 3, 6
    ckpt = torch.load(tmp_path / "r3" / "last.ckpt", weights_only=False)
    assert ckpt["hyper_parameters"]["cfg"]["training"]["teacher_reuse"] == 3
    calls.clear()
    distill(DistillConfig(teacher=str(teacher), data=str(data), out=str(tmp_path / "r1"), max_steps=4,
                          save_every=4, teacher_reuse=1, **TINY))
    assert len(calls) == 4  # the original recipe: fresh trajectories every step
    assert DistillConfig(teacher="t", data="d", out="o").teacher_reuse == 4  # the default (issue 26)


def test_reused_steps_train_the_student(data, teacher, tmp_path):
    # steps 1 and 2 of a reuse-3 run have no teacher call of their own, but still move the student
    def run(out, steps):
        distill(DistillConfig(teacher=str(teacher), data=str(data), out=str(out), max_steps=steps,
                              save_every=steps, teacher_reuse=3, **{**TINY, "log_every": 1}))
        return torch.load(out / "last.ckpt", weights_only=True)["state_dict"]

    one, three = run(tmp_path / "a", 1), run(tmp_path / "b", 3)
    assert any(not torch.equal(one[k], three[k]) for k in one)


def test_bad_reuse_is_a_user_error(data, teacher, tmp_path):
    from rtsvc.errors import UserError

    with pytest.raises(UserError, match="--teacher-reuse must be at least 1"):
        distill(DistillConfig(teacher=str(teacher), data=str(data), out=str(tmp_path / "x"), teacher_reuse=0,
                              **TINY))


def test_resume_rebuilds_the_cache_and_is_exact(data, teacher, tmp_path):
    def run(out, steps, resume=False):
        return distill(DistillConfig(teacher=str(teacher), data=str(data), out=str(out), max_steps=steps,
                                     save_every=3, teacher_reuse=2, resume=resume, **TINY))

    run(tmp_path / "straight", 6)
    run(tmp_path / "r", 3)  # stops at step 3: the kept trajectories are those of steps 0 and 2
    assert TrajectoryCache(2).refresh_steps_before(3) == [0, 2]
    assert TrajectoryCache(2, size=4).refresh_steps_before(12) == [4, 6, 8, 10]
    run(tmp_path / "r", 6, resume=True)
    straight = torch.load(tmp_path / "straight" / "last.ckpt", weights_only=True)["state_dict"]
    again = torch.load(tmp_path / "r" / "last.ckpt", weights_only=True)["state_dict"]
    assert straight.keys() == again.keys() and all(torch.equal(straight[k], again[k]) for k in straight)
