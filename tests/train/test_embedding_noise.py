"""NEFTune noise: on training forwards only, bounded by alpha / sqrt(L * d), gone afterwards."""

import pytest
import torch

from graftlm.train.config import TrainConfig
from graftlm.train.embedding_noise import embedding_noise
from graftlm.train.loop import train
from tests.helpers import base_cfg


def _embed(model, ids):
    return model.get_input_embeddings()(ids)


def test_noise_only_on_training_forwards_and_within_its_bound(tiny_model_factory):
    model = tiny_model_factory("llama")
    ids = torch.randint(0, 50, (2, 12))
    clean = _embed(model, ids).detach()
    bound = 5.0 / (12 * clean.shape[-1]) ** 0.5
    with embedding_noise(model, 5.0):
        model.train()
        noisy = _embed(model, ids)
        delta = (noisy - clean).abs()
        assert delta.max() <= bound + 1e-6
        assert delta.max() > 0.5 * bound  # drawn across the whole range, not a no-op
        with torch.no_grad():  # evaluation and generation: clean
            assert torch.equal(_embed(model, ids), clean)
        model.eval()
        assert torch.equal(_embed(model, ids), clean)
    model.train()
    assert torch.equal(_embed(model, ids), clean)  # the hook is gone with the block


def test_zero_alpha_leaves_the_embeddings_alone(tiny_model_factory):
    model = tiny_model_factory("llama").train()
    ids = torch.randint(0, 50, (1, 5))
    with embedding_noise(model, 0.0):
        assert torch.equal(_embed(model, ids), _embed(model, ids))


def test_noisy_training_differs_from_clean_and_is_reproducible(tmp_path, tiny_model_dir):
    losses = {}
    for name, alpha in (("clean", 0.0), ("noisy", 5.0), ("noisy_again", 5.0)):
        (tmp_path / name).mkdir()
        cfg = base_cfg(tmp_path / name, tiny_model_dir, steps=3, neftune_alpha=alpha)
        losses[name] = train(cfg, progress=False).final_loss
    assert losses["noisy"] != losses["clean"]
    assert losses["noisy"] == losses["noisy_again"]


def test_negative_alpha_is_refused(tmp_path):
    with pytest.raises(Exception, match="neftune_alpha"):
        TrainConfig(data="x.jsonl", out=str(tmp_path), neftune_alpha=-1.0)


def test_the_lora_family_trains_with_noise_by_default_and_the_others_without(tmp_path):
    def alpha(method, **given):
        cfg = TrainConfig(data="x.jsonl", out=str(tmp_path), method=method, **given)
        return cfg.with_method_defaults().neftune_alpha

    for method in ("lora", "qlora", "dora", "qdora"):
        assert alpha(method) == 5.0, method
        assert alpha(method, neftune_alpha=0.0) == 0.0, method  # --neftune-alpha 0: off
    for method in ("adalora", "ia3", "bottleneck", "prompt", "prefix", "full"):
        assert alpha(method) == 0.0, method
    assert alpha("ia3", neftune_alpha=2.0) == 2.0


def test_a_run_says_when_it_adds_noise(tmp_path, tiny_model_dir, caplog):
    caplog.set_level("INFO", logger="graftlm")
    for name, alpha in (("noisy", 5.0), ("clean", 0.0)):
        (tmp_path / name).mkdir()
        caplog.clear()
        train(
            base_cfg(tmp_path / name, tiny_model_dir, steps=1, neftune_alpha=alpha), progress=False
        )
        said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("NEFTune")]
        assert said == (
            ["NEFTune: noise of strength 5 on the input embeddings while training "
             "(--neftune-alpha 0: off)"] if alpha else []
        )  # fmt: skip
