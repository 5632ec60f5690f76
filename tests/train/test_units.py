"""The pieces of the training loop: schedules, seeded sampling, sharding, statistics, and exact resume."""

import json
import os
import threading
import time

import pytest
import torch

from p2n.data import open_dataset
from p2n.latent import normalisation_stats
from p2n.train import TrainError, VAEStage, lr_at, records_from_rows, run, shard_ids
from p2n.train.data import global_stats, sample_indices, step_generator
from p2n.train.engine import clear_stale_build_locks, deepspeed_config


def test_lr_schedule_warms_up_then_decays_to_its_floor():
    assert lr_at(1, 1.0, 10, 100) == pytest.approx(0.1)
    assert lr_at(10, 1.0, 10, 100) == pytest.approx(1.0)
    assert lr_at(55, 1.0, 10, 100) == pytest.approx(0.05 + 0.95 * 0.5)
    assert lr_at(100, 1.0, 10, 100) == pytest.approx(0.05)


def test_batches_are_a_function_of_seed_rank_and_step():
    a = sample_indices(12, 8, step_generator(0, 1, 7))
    assert torch.equal(a, sample_indices(12, 8, step_generator(0, 1, 7)))
    assert not torch.equal(a, sample_indices(12, 8, step_generator(0, 0, 7)))
    assert len(set(a.tolist())) == 8  # without replacement when the shard is big enough
    b = sample_indices(3, 8, step_generator(0, 0, 1))
    assert sorted(b.tolist()).count(0) >= 2 and set(b.tolist()) == {0, 1, 2}
    with pytest.raises(TrainError, match="no training objects"):
        sample_indices(0, 4, step_generator(0, 0, 1))


def test_shards_are_balanced_disjoint_and_complete():
    ids = [f"obj{i:02d}" for i in range(11)]
    parts = [shard_ids(reversed(ids), r, 3) for r in range(3)]
    assert sorted(sum(parts, [])) == ids
    assert [len(p) for p in parts] == [4, 4, 3]


def test_global_statistics_equal_the_plain_ones_in_one_process():
    x = torch.randn(7, 50) * torch.linspace(0, 2, 50)
    mean, std, n = global_stats(x, 1e-3)
    m2, s2 = normalisation_stats(x, 1e-3)
    assert n == 7 and torch.allclose(mean, m2, atol=1e-6) and torch.allclose(std, s2, atol=1e-5)
    assert float(std[0]) == pytest.approx(1e-3)  # a constant coordinate gets the floor


def test_deepspeed_config_follows_the_train_config(tiny_cfg):
    ds = deepspeed_config(tiny_cfg.train, 1e-3, 0.0, 8, "fp32")
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"] is False
    assert ds["optimizer"]["params"]["torch_adam"] is True and ds["train_micro_batch_size_per_gpu"] == 8
    assert deepspeed_config(tiny_cfg.train, 1e-3, 0.0, 8, "bf16")["bf16"]["enabled"] is True
    with pytest.raises(TrainError, match="stage"):
        deepspeed_config(tiny_cfg.override(["train.zero_stage=3"]).train, 1e-3, 0.0, 8, "fp32")


def test_a_resumed_run_reproduces_the_uninterrupted_one_exactly(tiny_dataset, tiny_cfg, tmp_path):
    cfg = tiny_cfg.override(["train.backend=ddp", "vae.steps=12", "vae.warmup_steps=3", "train.log_every=4"])
    records, field = records_from_rows(open_dataset(str(tiny_dataset)).rows(split="train"))

    def stage():
        return VAEStage(cfg, records, [], field)

    straight = stage()
    run(straight)

    class Stop(Exception):
        pass

    def stop_after_6(step):
        if step == 6:
            raise Stop

    first = stage()
    with pytest.raises(Stop):
        run(first, fault=stop_after_6)  # the hook runs after the step: like a worker killed right after step 6
    first.save(str(tmp_path / "ckpt"))
    assert json.loads((tmp_path / "ckpt" / "trainer_state.json").read_text())["step"] == 6
    resumed = stage()
    assert resumed.load(str(tmp_path / "ckpt")) == 6
    run(resumed)
    assert resumed.step == straight.step == 12
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["kind"] for r in resumed.history].count("resume") == 1


def test_stale_torch_build_locks_are_cleared_and_fresh_ones_waited_for(tmp_path):
    stale = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock"  # left by a worker killed mid-build
    stale.parent.mkdir(parents=True)
    stale.touch()
    old = time.time() - 1000
    os.utime(stale, (old, old))
    fresh = tmp_path / "other_op" / "lock"  # a build in progress: wait for it, do not delete it
    fresh.parent.mkdir()
    fresh.touch()
    threading.Timer(0.3, fresh.unlink).start()  # the live builder finishes
    t = time.monotonic()
    removed = clear_stale_build_locks(max_age_s=60, root=str(tmp_path), poll_s=0.05)
    assert removed == [str(stale)] and not stale.exists()
    assert 0.25 <= time.monotonic() - t < 10  # it waited for the live build, and not for the full max age
    # a lock whose builder never finishes is removed once it is older than max_age_s
    fresh.touch()
    assert clear_stale_build_locks(max_age_s=0.2, root=str(tmp_path), poll_s=0.05) == [str(fresh)]
