"""GGUF export for llama.cpp (graftlm/export/gguf_*.py, graftlm/export/llama_layout.py).

Fast tests on tiny Llama models: the q/k row permutation, the adapter file as llama.cpp reads it
(names, orientation, one alpha per file with per-module scales folded into B), the writer's
tensor types, and the refusals. The slow tests at the end run the real llama.cpp (through
llama-cpp-python) on the built-in model: an adapter trained by `graftlm train` and exported must
answer the task like graftlm does, as an adapter file on the built-in Q4_1 base and merged.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import helpers
import numpy as np
import pytest
import torch

import graftlm
from graftlm.cli.parser import main as cli_main
from graftlm.errors import GraftError
from graftlm.export.gguf import export_adapter_gguf, export_merged_gguf
from graftlm.export.llama_layout import gguf_name, permute_qk, qk_heads, unpermute_qk

DATA = Path(__file__).resolve().parents[2] / "examples" / "data" / "tickets"


# -- helpers -----------------------------------------------------------------------------------------


def _export(*args: str) -> None:
    assert cli_main(["export", *args]) == 0


def _randomize_b(model, seed: int = 0, std: float = 0.05) -> None:
    """Give every LoRA B non-zero values (a fresh adapter's B is zero: no visible update)."""
    from graftlm.methods.lora.inject import lora_layers

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            if hasattr(layer, "lora_B"):
                for lin in layer.lora_B.values():
                    lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) * std)


def _tiny_adapter(folder: Path, base_dir: Path, config: graftlm.LoraConfig) -> Path:
    model, _ = graftlm.load_model(str(base_dir))
    graftlm.inject(model, config)
    _randomize_b(model)
    graftlm.save_adapter(model, folder)
    return folder


def _merged_state(base_dir: Path, adapter: Path) -> tuple[dict, dict]:
    """(base state dict, state dict with the adapter merged by graftlm), HF names and order."""
    model, _ = graftlm.load_model(str(base_dir))
    base = {k: v.clone() for k, v in model.state_dict().items()}
    graftlm.load_adapter(model, adapter)
    merged = graftlm.merge_and_unload(model).state_dict()
    return base, merged


def _hf_key(tensor: str, state: dict) -> str:
    for key in state:
        module = key.rsplit(".", 1)[0]
        if key.endswith(".weight") and gguf_name(module) == tensor.removesuffix(".weight"):
            return key
    raise KeyError(tensor)


def _tensors(path: Path) -> dict:
    import gguf

    reader = gguf.GGUFReader(str(path))
    return reader, {t.name: t for t in reader.tensors}


def _dequantized(t) -> np.ndarray:
    import gguf

    return gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))


# -- the q/k permutation ---------------------------------------------------------------------------


def test_permute_qk_interleaves_each_heads_halves_and_transformers_undoes_it():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    # one head of size 8: HF rows [x0 x1 x2 x3 | y0 y1 y2 y3] -> llama.cpp [x0 y0 x1 y1 ...]
    rows = np.arange(16).reshape(16, 1)  # 2 heads
    assert permute_qk(rows, 2)[:, 0].tolist() == [
        0,
        4,
        1,
        5,
        2,
        6,
        3,
        7,
        8,
        12,
        9,
        13,
        10,
        14,
        11,
        15,
    ]
    weights = np.random.default_rng(0).standard_normal((4 * 16, 64)).astype(np.float32)
    for n_head in (4, 2):  # q with 4 heads; k with 2 key/value heads
        gguf_order = permute_qk(weights, n_head)
        np.testing.assert_array_equal(unpermute_qk(gguf_order, n_head), weights)
        # what transformers' GGUF loader (and so graftlm.models.load) applies when reading a GGUF
        # file: q with (n_head, n_head), k with (n_head, n_kv_head)
        undone = LlamaTensorProcessor()._reverse_permute_weights(gguf_order, 4, n_head)
        np.testing.assert_array_equal(undone, weights)
    tensor = torch.from_numpy(weights)
    torch.testing.assert_close(permute_qk(tensor, 4), torch.from_numpy(permute_qk(weights, 4)))
    assert qk_heads("blk.3.attn_q.weight", 9, 3) == 9 and qk_heads("blk.3.attn_k", 9, 3) == 3
    assert qk_heads("blk.3.attn_v.weight", 9, 3) is None


def _rope_interleaved(x: torch.Tensor, base: float) -> torch.Tensor:
    """llama.cpp's RoPE for Llama (ggml rope mode 0): rotate adjacent pairs (2i, 2i+1).

    x: (T, heads, d) at positions 0..T-1."""
    t, _, d = x.shape
    theta = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = torch.arange(t, dtype=torch.float64)[:, None] * theta[None, :]  # (T, d/2)
    cos, sin = angle.cos()[:, None, :], angle.sin()[:, None, :]
    even, odd = x[..., 0::2].double(), x[..., 1::2].double()
    out = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return out.flatten(-2).float()


def test_llama_cpp_ordered_base_plus_permuted_lora_gives_the_same_attention(tiny_llama):
    """On a tiny Llama (4 query / 2 key-value heads): HF-ordered W + s·B·A under HF's rotate-half
    RoPE and llama.cpp-ordered permute(W) + s·permute(B)·A under llama.cpp's interleaved RoPE give
    the same attention scores, and the same projections up to the row order."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = tiny_llama
    cfg = model.config
    heads, kv, d = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.hidden_size // cfg.num_attention_heads,
    )
    attn = model.model.layers[0].self_attn
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, cfg.hidden_size, generator=gen)
    scale = 2.0
    proj = {}
    for name, n in (("q", heads), ("k", kv)):
        w = getattr(attn, f"{name}_proj").weight.detach()
        a = torch.randn(4, cfg.hidden_size, generator=gen) * 0.1
        b = torch.randn(w.shape[0], 4, generator=gen) * 0.1
        hf = x @ (w + scale * b @ a).T
        gguf = x @ (permute_qk(w, n) + scale * permute_qk(b, n) @ a).T
        torch.testing.assert_close(gguf, permute_qk(hf.T, n).T)  # same values, llama.cpp's rows
        proj[name] = (hf, gguf)

    position_ids = torch.arange(7)[None]
    cos, sin = model.model.rotary_emb(x[None], position_ids)
    q_hf = proj["q"][0].view(1, 7, heads, d).transpose(1, 2)
    k_hf = proj["k"][0].view(1, 7, kv, d).transpose(1, 2)
    q_hf, k_hf = apply_rotary_pos_emb(q_hf, k_hf, cos, sin)
    theta = cfg.rope_parameters["rope_theta"]
    q_g = _rope_interleaved(proj["q"][1].view(7, heads, d), theta).transpose(0, 1)
    k_g = _rope_interleaved(proj["k"][1].view(7, kv, d), theta).transpose(0, 1)
    group = heads // kv
    for h in range(heads):
        scores_hf = q_hf[0, h] @ k_hf[0, h // group].T
        scores_g = q_g[h] @ k_g[h // group].T
        torch.testing.assert_close(scores_g, scores_hf, rtol=1e-4, atol=1e-5)


# -- the adapter file ------------------------------------------------------------------------------


ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize(
    "config",
    [
        graftlm.LoraConfig(rank=8, alpha=16, targets=ALL_TARGETS),
        graftlm.LoraConfig(rank=8, alpha=16, targets=ALL_TARGETS, use_rslora=True),
        graftlm.LoraConfig(
            rank=8,
            alpha=16,
            targets=ALL_TARGETS,
            rank_pattern={"k_proj": 4, "down_proj": 12},
            alpha_pattern={"q_proj": 4, "layers.1.mlp.up_proj": 40},
        ),
    ],
    ids=["plain", "rslora", "rank_and_alpha_pattern"],
)
def test_adapter_file_applied_as_llama_cpp_does_equals_graftlm_merge(
    tmp_path, tiny_model_dir, config
):
    """llama.cpp adds alpha_file / r · B·A (r = the width of that module's B) to its q/k-permuted
    base weight; un-permuted, that must equal graftlm's merge for every module."""
    adapter = _tiny_adapter(tmp_path / "adapter", tiny_model_dir, config)
    out = export_adapter_gguf(adapter, tmp_path / "adapter.gguf")
    reader, tensors = _tensors(out)
    fields = {
        k: reader.fields[k].contents()
        for k in ("general.type", "general.architecture", "adapter.type", "adapter.lora.alpha")
    }
    assert fields == {
        "general.type": "adapter",
        "general.architecture": "llama",
        "adapter.type": "lora",
        "adapter.lora.alpha": 16.0,
    }
    base, merged = _merged_state(tiny_model_dir, adapter)
    names = sorted(n.removesuffix(".lora_a") for n in tensors if n.endswith(".lora_a"))
    assert len(names) == 2 * 7 and len(tensors) == 2 * len(names)
    assert {n.split(".")[2] for n in names} == {
        "attn_q",
        "attn_k",
        "attn_v",
        "attn_output",
        "ffn_gate",
        "ffn_up",
        "ffn_down",
    }
    alpha = fields["adapter.lora.alpha"]
    for name in names:
        a, b = tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"]
        key = _hf_key(name, base)
        out_f, in_f = base[key].shape
        rank = int(a.shape[1])
        # ggml order: lora_a [in, r], lora_b [r, out] (numpy (r, in) and (out, r): PEFT's A and B)
        assert a.shape.tolist() == [in_f, rank] and b.shape.tolist() == [rank, out_f]
        heads = qk_heads(name, 4, 2)
        delta = (
            alpha / rank * (torch.from_numpy(np.array(b.data)) @ torch.from_numpy(np.array(a.data)))
        )
        if heads is not None:
            delta = unpermute_qk(delta, heads)
        torch.testing.assert_close(delta, merged[key] - base[key], rtol=1e-4, atol=1e-6)
    if config.rank_pattern:
        assert tensors["blk.0.attn_k.weight.lora_a"].shape.tolist()[1] == 4
        assert tensors["blk.1.ffn_down.weight.lora_b"].shape.tolist()[0] == 12


def test_adapter_outtypes(tmp_path, tiny_model_dir):
    adapter = _tiny_adapter(
        tmp_path / "adapter",
        tiny_model_dir,
        graftlm.LoraConfig(rank=8, targets=["q_proj", "down_proj"]),
    )
    _, ref = _tensors(export_adapter_gguf(adapter, tmp_path / "f32.gguf"))
    for outtype, a_type, tol in (
        ("f16", "F16", 1e-3),
        ("bf16", "BF16", 1e-2),
        ("q8_0", "Q8_0", 2e-2),
    ):
        _, tensors = _tensors(
            export_adapter_gguf(adapter, tmp_path / f"{outtype}.gguf", outtype=outtype)
        )
        assert tensors["blk.0.attn_q.weight.lora_a"].tensor_type.name == a_type
        # B's rows (rank 8) are shorter than a q8_0 block: f16, as llama.cpp's converters do
        assert tensors["blk.0.attn_q.weight.lora_b"].tensor_type.name == (
            "F16" if outtype == "q8_0" else a_type
        )
        for name, t in tensors.items():
            want = np.array(ref[name].data)
            np.testing.assert_allclose(_dequantized(t), want, atol=tol * np.abs(want).max())


# -- merged file, tensors (the tokenizer part is checked on the built-in model) -------------------


def test_hf_folder_writer_permutes_q_and_k_and_keeps_every_tensor(
    tmp_path, tiny_model_dir, monkeypatch
):
    import graftlm.export.llama_layout as gl

    monkeypatch.setattr(gl, "add_tokenizer", lambda writer, folder, vocab_size: None)
    adapter = _tiny_adapter(
        tmp_path / "adapter", tiny_model_dir, graftlm.LoraConfig(rank=4, targets=ALL_TARGETS)
    )
    _, merged = _merged_state(tiny_model_dir, adapter)
    for quant, types, tol in (("f16", {"F16", "F32"}, 1e-3), ("q8_0", {"Q8_0", "F32"}, 1e-2)):
        out = export_merged_gguf(
            adapter, tmp_path / f"merged-{quant}.gguf", model=str(tiny_model_dir), quant=quant
        )
        reader, tensors = _tensors(out)
        assert reader.fields["llama.attention.head_count_kv"].contents() == 2
        assert {t.tensor_type.name for t in tensors.values()} == types
        # tied embeddings: no output.weight, llama.cpp falls back to token_embd
        assert len(tensors) == 2 + 9 * 2 and "output.weight" not in tensors
        for name, t in tensors.items():
            w = _dequantized(t)
            heads = qk_heads(name, 4, 2)
            if heads is not None:
                w = unpermute_qk(w, heads)
            want = merged[_hf_key(name, merged)].numpy()
            np.testing.assert_allclose(w, want, atol=tol * np.abs(want).max())


# -- refusals --------------------------------------------------------------------------------------


def test_embedding_and_modules_to_save_adapters_are_refused(tmp_path, tiny_model_dir):
    emb = _tiny_adapter(
        tmp_path / "emb",
        tiny_model_dir,
        graftlm.LoraConfig(rank=4, targets=["embed_tokens", "q_proj"]),
    )
    with pytest.raises(GraftError, match="embedding adapters are not exported.*embed_tokens"):
        export_adapter_gguf(emb, tmp_path / "x.gguf")
    saved = _tiny_adapter(
        tmp_path / "saved",
        tiny_model_dir,
        graftlm.LoraConfig(rank=4, targets=["q_proj"], modules_to_save=("norm",)),
    )
    with pytest.raises(GraftError, match="modules_to_save"):
        export_adapter_gguf(saved, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_other_architectures_and_mismatched_bases_are_refused(tmp_path, tiny_model_dir):
    import gguf

    adapter = _tiny_adapter(
        tmp_path / "adapter", tiny_model_dir, graftlm.LoraConfig(rank=4, targets=["q_proj"])
    )
    qwen = helpers.save_tiny_model_dir(tmp_path / "qwen2", "qwen2")
    with pytest.raises(GraftError, match="model_type 'qwen2'.*convert_hf_to_gguf"):
        export_adapter_gguf(adapter, tmp_path / "x.gguf", model=str(qwen))
    other = gguf.GGUFWriter(str(tmp_path / "phi.gguf"), "phi3")
    other.write_header_to_file()
    other.write_kv_data_to_file()
    other.write_tensors_to_file()
    other.close()
    with pytest.raises(GraftError, match="architecture 'phi3' has no llama.cpp tensor-name map"):
        export_adapter_gguf(adapter, tmp_path / "x.gguf", model=str(tmp_path / "phi.gguf"))
    config = json.loads((tiny_model_dir / "config.json").read_text())
    (tmp_path / "wider").mkdir()
    (tmp_path / "wider" / "config.json").write_text(json.dumps({**config, "hidden_size": 128}))
    with pytest.raises(GraftError, match="shapes do not match the base.*q_proj"):
        export_adapter_gguf(adapter, tmp_path / "x.gguf", model=str(tmp_path / "wider"))
    with pytest.raises(GraftError, match="pre-tokenizer"):
        export_merged_gguf(adapter, tmp_path / "x.gguf", model=str(tiny_model_dir))
    with pytest.raises(GraftError, match="not found"):
        export_adapter_gguf(adapter, tmp_path / "x.gguf", model=str(tmp_path / "nowhere"))


def test_an_adapter_of_another_base_with_the_same_shapes_needs_force(tmp_path, tiny_model_dir):
    adapter = _tiny_adapter(
        tmp_path / "adapter", tiny_model_dir, graftlm.LoraConfig(rank=4, targets=["q_proj"])
    )
    other = helpers.save_tiny_model_dir(tmp_path / "other", "llama", seed=1)
    with pytest.raises(GraftError, match="trained on a different base model.*--force"):
        export_adapter_gguf(adapter, tmp_path / "x.gguf", model=str(other))
    assert export_adapter_gguf(adapter, tmp_path / "x.gguf", model=str(other), force=True).is_file()


def test_cli_export_errors_are_one_line(tmp_path, tiny_model_dir, capsys):
    adapter = _tiny_adapter(
        tmp_path / "adapter", tiny_model_dir, graftlm.LoraConfig(rank=4, targets=["q_proj"])
    )
    assert (
        cli_main(
            [
                "export",
                "--adapter",
                str(adapter),
                "--format",
                "gguf",
                "--out",
                str(tmp_path / "a.gguf"),
                "--quant",
                "q8_0",
            ]
        )
        == 2
    )
    assert "--quant is for --format gguf-merged" in capsys.readouterr().err
    assert (
        cli_main(
            [
                "export",
                "--adapter",
                str(tmp_path / "missing"),
                "--format",
                "gguf",
                "--out",
                str(tmp_path / "a.gguf"),
            ]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
    code = cli_main(
        [
            "export",
            "--adapter",
            str(adapter),
            "--format",
            "gguf",
            "--out",
            str(tmp_path / "a.gguf"),
            "--outtype",
            "f16",
        ]
    )
    assert code == 0 and (tmp_path / "a.gguf").is_file()


# -- the real llama.cpp, on the built-in model -----------------------------------------------------
#
# One adapter is trained by `graftlm train` (all linear layers, rank 16, as the defaults) for a few
# steps on the tickets task; graftlm's greedy answers to N test prompts are the reference. The
# rsLoRA and rank_pattern adapters are exact re-parametrisations of it (graftlm computes the same
# function with them, checked below), so each must also answer like graftlm in llama.cpp: their
# files differ in alpha, per-module ranks and folded scales, which is what the export must get
# right. llama.cpp runs its own Q4_1 kernels (activations rounded to 8 bits), so a few answers
# of an uncertain model may differ: "like graftlm" is most answers equal and the same accuracy
# within a few points.

N_PROMPTS = 32
MAX_NEW = 8


def _require_llama_cpp() -> None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        message = "llama-cpp-python is not installed (`make test` builds it into .venv)"
        if os.environ.get("GRAFTLM_REQUIRE_LLAMA_CPP"):
            pytest.fail(message)
        pytest.skip(message)


class Task:
    """The trained adapter, the prompts, and graftlm's answers (shared by the slow tests)."""

    def __init__(self, root: Path):
        from graftlm.data.dataset import prompt_for_generation, reference_answer
        from graftlm.infer.generate import SamplingConfig, generate, load_for_inference

        self.root = root
        self.adapter = root / "adapter"
        data = root / "train.jsonl"
        data.write_text("".join((DATA / "train.jsonl").read_text().splitlines(keepends=True)[:192]))
        args = ["train", "--data", str(data), "--out", str(self.adapter)]
        args += "--steps 16 --batch-size 8 --lr 2e-3 --quiet".split()
        assert cli_main(args) == 0
        self.model, self.tokenizer = load_for_inference(None, {"default": str(self.adapter)})
        rows = [
            json.loads(line) for line in (DATA / "test.jsonl").read_text().splitlines()[:N_PROMPTS]
        ]
        self.prompts = [prompt_for_generation(row, self.tokenizer) for row in rows]
        self.refs = [reference_answer(row) for row in rows]
        self.answers = generate(
            self.model,
            self.tokenizer,
            self.prompts,
            sampling=SamplingConfig(max_new_tokens=MAX_NEW),
        )
        self.accuracy = self.score(self.answers)

    def score(self, answers: list[str]) -> float:
        return sum(a.strip() == r.strip() for a, r in zip(answers, self.refs)) / len(self.refs)

    def run_llama_cpp(self, model_path: Path, lora_path: Path | None = None) -> list[str]:
        from graftlm.export.llamacpp_run import LlamaCpp

        with LlamaCpp(model_path, lora_path=lora_path) as llm:
            return llm.generate(self.prompts, max_new_tokens=MAX_NEW)

    def assert_like_graftlm(
        self, answers: list[str], *, same: float = 0.8, points: float = 0.1
    ) -> None:
        equal = sum(a == b for a, b in zip(answers, self.answers)) / len(answers)
        accuracy = self.score(answers)
        report = f"llama.cpp: {equal:.0%} of answers equal to graftlm's, accuracy {accuracy:.2f} vs graftlm {self.accuracy:.2f}"
        print(report)
        assert equal >= same, report
        assert abs(accuracy - self.accuracy) <= points, report


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    _require_llama_cpp()
    return Task(tmp_path_factory.mktemp("gguf_task"))


def _variant(task: Task, kind: str) -> Path:
    """An adapter folder computing the same function as the trained one, written differently.

    rslora: use_rslora with alpha' = alpha / sqrt(r), so alpha' / sqrt(r) = alpha / r.
    rank_pattern: q_proj and down_proj at rank 24 (A' = Q[A; 0], B' = [B, 0]Qᵀ·c for a random
    orthogonal Q, so B'A' = c·B·A) and q_proj with its own alpha (c keeps every scale·B·A).
    """
    from safetensors.torch import save_file

    from graftlm.methods.lora.files import read_adapter_weights

    folder = task.root / kind
    if folder.exists():
        return folder
    folder.mkdir()
    config = json.loads((task.adapter / "adapter_config.json").read_text())
    weights = read_adapter_weights(task.adapter)
    rank, alpha = config["r"], config["lora_alpha"]
    if kind == "rslora":
        config.update(use_rslora=True, lora_alpha=alpha / rank**0.5)
    else:
        wide, q_alpha = 24, 8.0
        config.update(
            rank_pattern={"q_proj": wide, "down_proj": wide}, alpha_pattern={"q_proj": q_alpha}
        )
        gen = torch.Generator().manual_seed(0)
        for key in [
            k
            for k in weights
            if k.endswith("lora_A.weight") and (".q_proj." in k or ".down_proj." in k)
        ]:
            a, b_key = weights[key], key.replace("lora_A", "lora_B")
            b = weights[b_key]
            q, _ = torch.linalg.qr(torch.randn(wide, wide, generator=gen, dtype=torch.float64))
            c = (alpha / rank) / ((q_alpha if ".q_proj." in key else alpha) / wide)
            a_wide = torch.cat([a.double(), a.new_zeros(wide - rank, a.shape[1]).double()])
            b_wide = torch.cat([b.double(), b.new_zeros(b.shape[0], wide - rank).double()], dim=1)
            weights[key] = (q @ a_wide).float().contiguous()
            weights[b_key] = (b_wide @ q.T * c).float().contiguous()
    save_file(weights, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(config))
    (folder / "graftlm.json").write_text((task.adapter / "graftlm.json").read_text())
    return folder


@pytest.mark.slow
def test_llama_cpp_tokenizes_the_prompts_like_graftlm(task):
    from graftlm.export.llamacpp_run import LlamaCpp
    from graftlm.models.load import builtin_gguf_path

    with LlamaCpp(builtin_gguf_path()) as llm:
        for prompt in task.prompts:
            assert (
                llm.tokenize(prompt)
                == task.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            )


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["all_linear", "rslora", "rank_pattern"])
def test_adapter_gguf_on_the_builtin_q4_1_base_answers_like_graftlm(task, kind):
    from graftlm.models.load import builtin_gguf_path

    folder = task.adapter
    if kind != "all_linear":
        folder = _variant(task, kind)
        graftlm.load_adapter(task.model, folder, name=kind)
        ids = task.tokenizer(task.prompts[0], add_special_tokens=False, return_tensors="pt")[
            "input_ids"
        ]
        with torch.no_grad():
            graftlm.set_adapter(task.model, kind)
            logits_variant = task.model(ids).logits[0, -1]
            graftlm.set_adapter(task.model, "default")
            logits = task.model(ids).logits[0, -1]
        graftlm.delete_adapter(task.model, kind)
        torch.testing.assert_close(logits_variant, logits, rtol=1e-4, atol=1e-4)
    out = task.root / f"{kind}.gguf"
    _export("--adapter", str(folder), "--format", "gguf", "--out", str(out))
    task.assert_like_graftlm(task.run_llama_cpp(builtin_gguf_path(), lora_path=out))


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_merged_gguf_answers_like_graftlm_without_an_adapter(task, quant):
    out = task.root / f"merged-{quant}.gguf"
    _export(
        "--adapter",
        str(task.adapter),
        "--format",
        "gguf-merged",
        "--quant",
        quant,
        "--out",
        str(out),
    )
    _, tensors = _tensors(out)
    assert tensors["blk.0.attn_q.weight"].tensor_type.name == quant.upper()
    assert tensors["token_embd.weight"].tensor_type.name == "Q8_0"  # not adapted: copied as is
    if quant == "f16":  # every weight, read back and un-permuted, is graftlm's merged weight
        graftlm.merge(task.model)
        try:
            merged = {k: v.detach().clone() for k, v in task.model.state_dict().items()}
        finally:
            graftlm.unmerge(task.model)
        for name, t in tensors.items():
            w = _dequantized(t)
            heads = qk_heads(name, 9, 3)
            if heads is not None:
                w = unpermute_qk(w, heads)
            want = merged[_hf_key(name, merged)].numpy()
            np.testing.assert_allclose(w, want, atol=1e-3 * np.abs(want).max(), err_msg=name)
    task.assert_like_graftlm(task.run_llama_cpp(out))


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["q4_0", "q4_1"])
def test_4bit_merged_gguf_is_written_loads_and_warns_that_the_fine_tune_is_lost(
    task, quant, caplog
):
    """Rounding base + a small update to 4 bits again loses most of it: on a Q4_1 base, q4_1
    snaps the weights back to the base's grid and q4_0 adds noise many times the update's size.
    The export says so; the file still loads and runs in llama.cpp."""
    from graftlm.export.llamacpp_run import LlamaCpp

    out = task.root / f"merged-{quant}.gguf"
    with caplog.at_level("INFO", logger="graftlm.export.gguf_merged"):
        export_merged_gguf(task.adapter, out, quant=quant)
    assert "much of the fine-tune is lost" in caplog.text
    _, tensors = _tensors(out)
    assert tensors["blk.0.ffn_up.weight"].tensor_type.name == quant.upper()
    assert tensors["token_embd.weight"].tensor_type.name == "Q8_0"
    with LlamaCpp(out) as llm:
        answers = llm.generate(task.prompts[:4], max_new_tokens=MAX_NEW)
    assert all(isinstance(a, str) and a for a in answers)


@pytest.mark.slow
def test_merged_gguf_from_a_hugging_face_folder(task):
    """The base as a Hugging Face folder (graftlm's converted copy of the built-in model): the
    written GGUF has the tokenizer and hyperparameters of the original GGUF, and answers like
    graftlm in llama.cpp."""
    from graftlm.models.load import builtin_gguf_path, gguf_cache_path

    folder = gguf_cache_path(builtin_gguf_path())
    out = task.root / "merged-from-hf.gguf"
    args = ["--adapter", str(task.adapter), "--format", "gguf-merged", "--quant", "q8_0"]
    _export(*args, "--model", str(folder), "--out", str(out))
    written, tensors = _tensors(out)
    source, source_tensors = _tensors(builtin_gguf_path())
    assert tensors.keys() == source_tensors.keys()
    for key, field in source.fields.items():
        if key.startswith(("tokenizer.", "llama.")) and key != "tokenizer.ggml.add_space_prefix":
            assert written.fields[key].contents() == field.contents(), key
    task.assert_like_graftlm(task.run_llama_cpp(out))
