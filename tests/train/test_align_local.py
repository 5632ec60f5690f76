"""Stage 2 in one process: the aligner beats the mean-latent baseline on captions and unseen paraphrases, and its
file (with the VAE beside it) round-trips exactly."""

from pathlib import Path

import pytest
import torch

from p2n.align import load_aligner
from p2n.data import open_dataset
from p2n.latent import CheckpointError, load_vae
from p2n.train import AlignStage, records_from_rows, run


@pytest.fixture(scope="module")
def trained(tiny_dataset, tiny_vae_dir, tiny_cfg, tmp_path_factory):
    cfg = tiny_cfg.override(["train.backend=ddp", "align.steps=200", "train.eval_objects=4"])
    records, _ = records_from_rows(open_dataset(str(tiny_dataset)).rows())
    stage = AlignStage(cfg, [r for r in records if r.split == "train"], [r for r in records if r.split != "train"],
                       load_vae(str(tiny_vae_dir)), vae_uri=str(tiny_vae_dir))
    final = run(stage)
    out = tmp_path_factory.mktemp("align")
    stage.export(str(out))
    return stage, final, out


def test_aligner_beats_the_mean_latent_on_captions_and_unseen_paraphrases(trained):
    _, m, _ = trained
    base = m["eval/psnr_mean_latent"]
    assert m["eval/psnr_caption"] > base + 6, m
    assert m["eval/psnr_paraphrase"] > base + 4, m
    assert m["eval/psnr_caption"] > m["eval/psnr_vae"] - 2, m  # close to what the VAE itself reconstructs
    assert m["eval/top1_caption"] == 1.0 and m["eval/top1_paraphrase"] >= 0.75, m
    assert m["eval/psnr_image"] == m["eval/psnr_image"]  # image prompts were evaluated (not NaN)


def test_aligner_file_round_trip_reproduces_outputs_exactly(trained):
    stage, _, out = trained
    assert (out / "align.safetensors").is_file() and (out / "metrics.jsonl").is_file() and (out / "loss.png").is_file()
    bundle = load_aligner(str(out))
    prompts = ["a blue torus", "one orb, painted jade"]
    emb = stage.text_encoder.encode_text(prompts)
    with torch.no_grad():
        expected = stage.export_aligner()({"text": emb})["text"] * stage.latent_std + stage.latent_mean
        assert torch.equal(bundle.latents_from_text(prompts), expected)
        img = torch.rand(2, 32, 32, 3)
        want = stage.export_aligner()({"image": stage.image_encoder.encode_image(img)})["image"]
        assert torch.equal(bundle.latents_from_images(img), want * stage.latent_std + stage.latent_mean)
        assert bundle.params_from_text(prompts).shape == (2, bundle.vae.num_params)
    aligner, encoders, vae = bundle  # the tuple form
    assert vae.fingerprint() == stage.vae.fingerprint() and encoders["text"].name == "minilm"
    trained_vae = Path(stage.vae_uri) / "vae.safetensors"
    assert (out / "vae.safetensors").read_bytes() == trained_vae.read_bytes()  # a byte-for-byte copy


def test_an_aligner_refuses_a_different_vae(trained, tmp_path):
    stage, _, out = trained
    other = load_vae(stage.vae_uri)
    with torch.no_grad():
        other.std.mul_(2)
    other.save(str(tmp_path))
    with pytest.raises(CheckpointError, match="not the one this aligner was trained against"):
        load_aligner(str(out), vae_uri=str(tmp_path), with_encoders=False)
