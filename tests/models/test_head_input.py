"""The output head gets a contiguous input when generation asks for the last position only."""

from __future__ import annotations

import torch
from helpers import save_tiny_model_dir

from graftlm.models.load import load_model


def test_loaded_model_head_sees_contiguous_last_position(tmp_path):
    model, _ = load_model(save_tiny_model_dir(tmp_path / "m"), dtype="bfloat16")
    seen = []
    head = model.get_output_embeddings()
    # registered after graftlm's hook, so it sees what the head's forward gets
    head.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))
    ids = torch.randint(3, 100, (4, 9))
    with torch.no_grad():
        last = model(input_ids=ids, logits_to_keep=1).logits
        every = model(input_ids=ids).logits
    assert seen == [True, True]
    # the same numbers as the full head's last position
    torch.testing.assert_close(last[:, -1], every[:, -1])
