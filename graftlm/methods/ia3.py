"""(IA)³ (Liu et al., 2022): learned vectors that rescale activations, in PEFT's format.

::

    attention (k_proj, v_proj):   x ──► W ──► ⊙ l  [out, 1]   (scales each output feature)
    feedforward (down_proj):      x ──► ⊙ l [1, in] ──► W      (scales each input feature)

Every vector starts at ones, so a fresh adapter leaves the model unchanged. Because the scaling
is diagonal it folds into the weight exactly: rows of W (and its bias) for an output vector,
columns of W for an input vector, so the adapter merges without any runtime cost.

On disk it is PEFT's `IA3` folder: `adapter_config.json` (`peft_type` "IA3", `target_modules`,
`feedforward_modules`, `fan_in_fan_out`, ...) and `adapter_model.safetensors` with one key per
adapted layer, `base_model.model.<module>.ia3_l`, shaped `[out, 1]` or (feedforward) `[1, in]`.
GPT-2's `Conv1D` stores its weight `[in, out]`; the vectors keep the same shapes there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graftlm.errors import GraftError

NAME = "ia3"
PEFT_TYPE = "IA3"
MERGEABLE = True
# Chosen by experiment on examples/data/tickets, checked on intent_slots (README, "IA3"): the
# vectors are few (~58k for SmolLM2) and start at 1, so they need a high learning rate.
DEFAULTS: dict[str, Any] = {"lr": 3e-2, "epochs": 3.0}

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
KEY_SUFFIX = ".ia3_l"

# PEFT's defaults per `model_type` (peft.utils.constants, 0.21): the layers to adapt, and those
# among them that are "feedforward" (vector on the input, not the output).
PEFT_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": ("k_proj", "v_proj", "down_proj"),
    "mistral": ("k_proj", "v_proj", "down_proj"),
    "mixtral": ("k_proj", "v_proj", "w2"),
    "qwen2": ("q_proj", "v_proj", "down_proj"),
    "qwen3": ("q_proj", "v_proj", "down_proj"),
    "gemma": ("q_proj", "v_proj", "down_proj"),
    "gemma2": ("q_proj", "v_proj", "down_proj"),
    "gemma3_text": ("q_proj", "v_proj", "down_proj"),
    "phi": ("q_proj", "v_proj", "fc2"),
    "gpt2": ("c_attn", "mlp.c_proj"),
    "gpt_bigcode": ("c_attn", "mlp.c_proj"),
    "gpt_neox": ("query_key_value", "dense_4h_to_h"),
    "gpt_neo": ("q_proj", "v_proj", "c_proj"),
    "gptj": ("q_proj", "v_proj", "fc_out"),
    "opt": ("q_proj", "k_proj", "fc2"),
    "bloom": ("query_key_value", "mlp.dense_4h_to_h"),
    "falcon": ("query_key_value", "dense_4h_to_h"),
}
# Names of MLP output projections (PEFT's feedforward lists, all architectures together): a
# targeted layer whose name ends with one of them gets its vector on the input.
FEEDFORWARD_SUFFIXES = (
    "down_proj",
    "mlp.c_proj",
    "fc2",
    "fc_out",
    "dense_4h_to_h",
    "w2",
    "wo",
    "output.dense",
)


# -- the layer --------------------------------------------------------------------------------


class IA3Linear(nn.Module):
    """A linear layer (`nn.Linear` or GPT-2's `Conv1D`) with an (IA)³ scaling vector.

    The original layer is kept whole as `base_layer` (frozen, as PEFT lays it out); the vector
    is `ia3_l`, fp32, `[out, 1]` (scales the output, bias included) or, for a feedforward layer,
    `[1, in]` (scales the input).

    Shapes: input `(..., in_features)`, output `(..., out_features)`.
    """

    def __init__(self, base_layer: nn.Module, feedforward: bool) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.fan_in_fan_out = _is_conv1d(base_layer)
        if self.fan_in_fan_out:
            self.in_features, self.out_features = base_layer.weight.shape
        else:
            self.out_features, self.in_features = base_layer.weight.shape
        self.feedforward = feedforward
        shape = (1, self.in_features) if feedforward else (self.out_features, 1)
        self.ia3_l = nn.Parameter(
            torch.ones(shape, dtype=torch.float32, device=base_layer.weight.device)
        )
        self.merged = False
        self.disabled = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.disabled:
            return self.base_layer(x)
        scale = self.ia3_l.flatten()
        if self.feedforward:
            return self.base_layer((x * scale).to(x.dtype))
        result = self.base_layer(x)
        return (result * scale).to(result.dtype)

    def _weight_scale(self) -> torch.Tensor:
        """The vector shaped to multiply the stored weight (`[out, in]`, Conv1D `[in, out]`)."""
        scale = self.ia3_l.detach().float()
        return scale.T if self.fan_in_fan_out else scale

    def merge(self) -> None:
        """Fold the vector into the base weight (and bias), in fp32; idempotent.

        Raises:
            GraftError: the vector holds NaN/inf (nothing is changed then).
        """
        if self.merged:
            return
        if not torch.isfinite(self.ia3_l).all():
            raise GraftError("the (IA)³ vector holds NaN/inf values; refusing to merge it")
        self._rescale(self._weight_scale(), bias_scale=self.ia3_l.detach().float().flatten())
        self.merged = True

    def unmerge(self) -> None:
        """Divide the vector out of the base weight again (no-op when not merged).

        Raises:
            GraftError: a zero entry makes the merge impossible to undo.
        """
        if not self.merged:
            return
        if (self.ia3_l == 0).any():
            raise GraftError("the (IA)³ vector has zero entries: the merge cannot be undone")
        inverse = 1.0 / self.ia3_l.detach().float()
        self._rescale(inverse.T if self.fan_in_fan_out else inverse, bias_scale=inverse.flatten())
        self.merged = False

    def _rescale(self, weight_scale: torch.Tensor, bias_scale: torch.Tensor) -> None:
        weight = self.base_layer.weight
        with torch.no_grad():
            weight.copy_((weight.detach().float() * weight_scale).to(weight.dtype))
            bias = getattr(self.base_layer, "bias", None)
            if bias is not None and not self.feedforward:  # the output scale covers the bias
                bias.copy_((bias.detach().float() * bias_scale).to(bias.dtype))

    def extra_repr(self) -> str:
        kind = "input [1, in]" if self.feedforward else "output [out, 1]"
        return f"in={self.in_features}, out={self.out_features}, scales={kind}"


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def ia3_layers(model: nn.Module) -> list[tuple[str, IA3Linear]]:
    """Every (IA)³ layer of `model`, with its module name, in model order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, IA3Linear)]


# -- which layers -----------------------------------------------------------------------------


@dataclass(frozen=True)
class IA3Spec:
    """Which layers carry a vector, in PEFT's terms (`target_modules`, `feedforward_modules`).

    Each is a tuple of names (a module matches when its name equals one or ends with
    "." + one), or a string regex matched against the whole module name.
    """

    targets: tuple[str, ...] | str
    feedforward: tuple[str, ...] | str
    exclude: tuple[str, ...] | str | None = None


def _parse_names(value: Any, field: str, source: str) -> tuple[str, ...] | str | None:
    """PEFT's list-or-regex fields; a comma list of plain names is a list (CLI: 'k_proj,v_proj')."""
    if value is None or (isinstance(value, str) and value == ""):
        return None
    if isinstance(value, str):
        if re.fullmatch(r"[\w.\-]+(\s*,\s*[\w.\-]+)*", value) and value != "all-linear":
            return tuple(v.strip() for v in value.split(","))
        if value != "all-linear":
            try:
                re.compile(value)
            except re.error as exc:
                raise GraftError(
                    f"{source}: {field} {value!r} is not a valid regex ({exc})"
                ) from None
        return value
    if isinstance(value, (list, tuple, set)) and all(isinstance(v, str) and v for v in value):
        return tuple(sorted(value)) if isinstance(value, set) else tuple(value)
    raise GraftError(
        f"{source}: {field} should be a list of module names or a regex string, got {value!r}"
    )


def _peft_match(spec: tuple[str, ...] | str, name: str) -> bool:
    """PEFT's `target_modules` rule: regex full match, or exact name / '.'-suffix."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == key or name.endswith("." + key) for key in spec)


def _peft_feedforward(spec: tuple[str, ...] | str, name: str) -> bool:
    """PEFT's `feedforward_modules` rule: regex full match, or a plain `endswith`."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name.endswith(key) for key in spec)


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Linear layers that may take a vector (not the output head, not inside an IA3 layer)."""
    from graftlm.surgery import _output_head_names, is_linear

    heads = _output_head_names(model)
    return [
        (n, m)
        for n, m in model.named_modules()
        if n
        and ".base_layer" not in n
        and n not in heads
        and (isinstance(m, IA3Linear) or is_linear(m))
    ]


def find_targets(model: nn.Module, spec: IA3Spec) -> list[tuple[str, bool]]:
    """`(module name, is feedforward)` for every layer `spec` selects, in model order.

    Raises:
        GraftError: nothing matched (listing the model's linear-layer names), or a matched
            module is not a linear layer.
    """
    found = []
    linear = {n for n, _ in _candidates(model)} if spec.targets == "all-linear" else set()
    for name, module in model.named_modules():
        if not name or ".base_layer" in name:
            continue
        if spec.targets == "all-linear":
            hit = name in linear
        else:
            hit = _peft_match(spec.targets, name)
        if not hit or (spec.exclude is not None and _peft_match(spec.exclude, name)):
            continue
        if getattr(module, "is_quantized_linear", False):
            raise GraftError(
                f"(IA)³ on a 4-bit layer ({name}) is not supported; use a 16/32-bit base"
            )
        if not isinstance(module, nn.Linear) and not _is_conv1d(module):
            if isinstance(spec.targets, str):
                continue  # a regex may also match containers (e.g. '.*attn.*'); PEFT skips none
            raise GraftError(
                f"target {name!r} is a {type(module).__name__}; (IA)³ adapts linear layers only"
            )
        found.append((name, _peft_feedforward(spec.feedforward, name)))
    if not found:
        names = sorted({n.rsplit(".", 1)[-1] for n, _ in _candidates(model)})
        raise GraftError(
            f"targets {spec.targets!r} matched no layer of {type(model).__name__}; "
            f"its linear layers are named: {', '.join(names)}"
        )
    return found


def default_spec(model: nn.Module, targets: str | None) -> IA3Spec:
    """The layers to adapt: `targets` if given, else PEFT's default for this `model_type`.

    Feedforward layers are the targeted ones named like an MLP output projection
    (`FEEDFORWARD_SUFFIXES`).
    """
    parsed = _parse_names(targets, "targets", "--targets")
    if parsed is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in PEFT_TARGETS:
            raise GraftError(
                f"(IA)³ has no default targets for model type {model_type!r}; pass targets "
                "(CLI: --targets), e.g. 'k_proj,v_proj,down_proj'"
            )
        parsed = PEFT_TARGETS[model_type]
    return IA3Spec(targets=parsed, feedforward=FEEDFORWARD_SUFFIXES)


# -- attach / merge ---------------------------------------------------------------------------


def add_ia3(model: nn.Module, spec: IA3Spec, name: str = "default"):
    """Wrap every layer `spec` selects in an `IA3Linear` (vectors at one) and freeze the rest.

    Returns:
        An `InjectSummary`.

    Raises:
        GraftError: the model already holds an (IA)³ adapter; no layer matched.
    """
    from graftlm.surgery import _set_module, base_fingerprint, summarize

    if ia3_layers(model):
        raise GraftError(
            f"the model already holds (IA)³ adapter {getattr(model, 'graftlm_ia3', ('?',))[0]!r}; "
            "(IA)³ adapters load one at a time"
        )
    base_fingerprint(model)  # of the untouched base: the wrapped layers change module names
    targets = find_targets(model, spec)
    for param in model.parameters():
        param.requires_grad_(False)
    added = []
    for module_name, feedforward in targets:
        layer = IA3Linear(model.get_submodule(module_name), feedforward)
        _set_module(model, module_name, layer)
        added.append((module_name, "IA3-in" if feedforward else "IA3-out", 1))
    model.graftlm_ia3 = (name, spec)
    return summarize(model, name, added)


def attach(model: nn.Module, cfg) -> Any:
    """Add (IA)³ adapter "default" to a freshly loaded base model as `cfg` describes."""
    return add_ia3(model, default_spec(model, cfg.targets))


def merge(model: nn.Module) -> None:
    """Fold every vector into its layer's weight (fp32 math); idempotent, all or nothing.

    Raises:
        GraftError: no (IA)³ layers, or a vector with NaN/inf (then nothing is merged).
    """
    layers = ia3_layers(model)
    if not layers:
        raise GraftError("the model holds no (IA)³ adapter to merge")
    for module_name, layer in layers:
        if not layer.merged and not torch.isfinite(layer.ia3_l).all():
            raise GraftError(
                f"(IA)³ vector of {module_name} has NaN/inf values; refusing to merge (nothing was merged)"
            )
    for _, layer in layers:
        layer.merge()


def unmerge(model: nn.Module) -> None:
    """Undo `merge`, restoring the base weights (up to the weight dtype's rounding)."""
    for _, layer in ia3_layers(model):
        layer.unmerge()


def unload(model: nn.Module) -> nn.Module:
    """Replace every (IA)³ layer by its base layer (merge first to keep the adaptation)."""
    from graftlm.surgery import _set_module

    for module_name, layer in ia3_layers(model):
        _set_module(model, module_name, layer.base_layer)
    if hasattr(model, "graftlm_ia3"):
        del model.graftlm_ia3
    return model


# -- save / load ------------------------------------------------------------------------------


def state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The vectors under PEFT's keys (`base_model.model.<module>.ia3_l`), fp32."""
    return {PREFIX + n + KEY_SUFFIX: layer.ia3_l.detach().float() for n, layer in ia3_layers(model)}


def _suffix_spec(names: list[str], candidates: list[str], rule) -> tuple[str, ...] | str:
    """The shortest PEFT spec that selects exactly `names` among `candidates`.

    Tries the last name segment ('k_proj'), then the last two ('mlp.c_proj'), then an anchored
    regex of the exact names.
    """
    for depth in (1, 2):
        spec = tuple(sorted({".".join(n.split(".")[-depth:]) for n in names}))
        if sorted(c for c in candidates if rule(spec, c)) == sorted(names):
            return spec
    return "^(?:" + "|".join(re.escape(n) for n in names) + ")$"


def peft_config(model: nn.Module, base_model_name: str | None) -> dict[str, Any]:
    """`adapter_config.json` for the model's (IA)³ adapter, with PEFT's field names."""
    layers = ia3_layers(model)
    adapted = [n for n, _ in layers]
    feedforward = [n for n, layer in layers if layer.feedforward]
    everything = [n for n, m in model.named_modules() if n and ".base_layer" not in n]
    targets = _suffix_spec(adapted, everything, _peft_match)
    ff: tuple[str, ...] | str = ()
    if feedforward and isinstance(targets, tuple):
        # PEFT wants feedforward_modules ⊆ target_modules when both are lists: reuse entries
        ff = tuple(t for t in targets if any(_peft_match((t,), n) for n in feedforward))
        if sorted(n for n in adapted if _peft_feedforward(ff, n)) != sorted(feedforward):
            ff = "^(?:" + "|".join(re.escape(n) for n in feedforward) + ")$"
    elif feedforward:
        ff = _suffix_spec(feedforward, adapted, _peft_feedforward)
    return {
        "peft_type": PEFT_TYPE,
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name,
        "revision": None,
        "inference_mode": True,
        "target_modules": list(targets) if isinstance(targets, tuple) else targets,
        "exclude_modules": None,
        "feedforward_modules": list(ff) if isinstance(ff, tuple) else ff,
        "fan_in_fan_out": any(layer.fan_in_fan_out for _, layer in layers),
        "modules_to_save": None,
        "init_ia3_weights": True,
    }


def save(model: nn.Module, folder: Path, base_model_name: str | None) -> dict[str, torch.Tensor]:
    """Write the PEFT `IA3` folder (config + safetensors, each atomically); returns the tensors.

    Merged vectors are saved as they are (the weights file never depends on merge state).
    """
    from graftlm.adapters import atomic_save_safetensors, atomic_write_json

    if not ia3_layers(model):
        raise GraftError("the model holds no (IA)³ adapter to save")
    tensors = state_dict(model)
    folder = Path(folder)
    atomic_save_safetensors(folder / WEIGHTS_FILE, tensors)
    atomic_write_json(folder / CONFIG_FILE, peft_config(model, base_model_name))
    return tensors


def read_spec(folder: Path) -> IA3Spec:
    """The `IA3Spec` of an adapter folder's `adapter_config.json` (ours or PEFT's).

    Raises:
        GraftError: missing/invalid file, another peft_type, or a bad field (named).
    """
    import json

    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise GraftError(
            f"{path}: not found (an adapter folder needs {CONFIG_FILE} and {WEIGHTS_FILE})"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GraftError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise GraftError(f"{path}: expected a JSON object, got {type(data).__name__}")
    if str(data.get("peft_type", "")).upper() != PEFT_TYPE:
        raise GraftError(f"{path}: peft_type is {data.get('peft_type')!r}, expected {PEFT_TYPE!r}")
    targets = _parse_names(data.get("target_modules"), "target_modules", str(path))
    if targets is None:
        raise GraftError(
            f"{path}: target_modules is missing; it names the layers the vectors belong to"
        )
    feedforward = _parse_names(data.get("feedforward_modules"), "feedforward_modules", str(path))
    exclude = _parse_names(data.get("exclude_modules"), "exclude_modules", str(path))
    return IA3Spec(targets=targets, feedforward=feedforward or (), exclude=exclude)


def load(model: nn.Module, folder: Path, name: str = "default") -> None:
    """Put a saved (IA)³ adapter (graftlm's or PEFT's) onto a base model.

    Raises:
        GraftError: unreadable files; keys naming modules the model lacks, layers the config
            selects without a vector (all listed at once); a vector of the wrong shape (file,
            key, expected and found shapes).
    """
    from graftlm.adapters import read_adapter_weights

    folder = Path(folder)
    spec = read_spec(folder)
    tensors = read_adapter_weights(folder)
    weights_path = folder / WEIGHTS_FILE
    vectors: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, tensor in tensors.items():
        bare = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        match = re.fullmatch(r"(?P<module>.+)\.ia3_l(?:\.[^.]+)?", bare)
        if match is None:
            unexpected.append(key)
        else:
            vectors[match.group("module")] = tensor
    if unexpected:
        raise GraftError(
            f"{weights_path}: unexpected keys (not '<module>.ia3_l'): {sorted(unexpected)[:10]}"
        )
    if not vectors:
        raise GraftError(f"{weights_path}: no (IA)³ vectors (keys like '...k_proj.ia3_l') found")
    modules = dict(model.named_modules())
    unknown = sorted(m for m in vectors if m not in modules)
    if unknown:
        raise GraftError(
            f"{weights_path}: keys name modules {type(model).__name__} does not have: "
            f"{[PREFIX + m + KEY_SUFFIX for m in unknown][:10]} (trained on another architecture?)"
        )
    selected = dict(find_targets(model, spec))
    missing = sorted(set(selected) - set(vectors))
    extra = sorted(set(vectors) - set(selected))
    if missing or extra:
        raise GraftError(
            f"{weights_path}: the vectors do not match {CONFIG_FILE}'s target_modules "
            f"{spec.targets!r}: "
            + (f"no vector for {missing[:10]}" if missing else "")
            + ("; " if missing and extra else "")
            + (f"vectors for layers it does not select: {extra[:10]}" if extra else "")
        )
    for module_name, feedforward in selected.items():
        module = modules[module_name]
        out_f, in_f = module.weight.shape[::-1] if _is_conv1d(module) else module.weight.shape
        expected = (1, in_f) if feedforward else (out_f, 1)
        found = tuple(vectors[module_name].shape)
        if found != expected:
            kind = "feedforward: [1, in]" if feedforward else "[out, 1]"
            raise GraftError(
                f"{weights_path}: {PREFIX}{module_name}{KEY_SUFFIX}: expected shape {expected} "
                f"({kind}), found {found} (another base model, or feedforward_modules disagrees)"
            )
    add_ia3(model, spec, name)
    with torch.no_grad():
        for module_name, layer in ia3_layers(model):
            layer.ia3_l.copy_(vectors[module_name].float())


def describe(folder: Path) -> dict[str, Any]:
    """Facts for `graftlm inspect`: layers scaled on the output and on the input."""
    from safetensors import safe_open

    out_count = in_count = 0
    with safe_open(str(Path(folder) / WEIGHTS_FILE), framework="pt") as handle:
        for key in handle.keys():
            shape = handle.get_slice(key).get_shape()
            if len(shape) == 2 and shape[0] == 1 and shape[1] > 1:
                in_count += 1
            else:
                out_count += 1
    spec = read_spec(Path(folder))
    return {
        "method_facts": {
            "vectors": f"{out_count} on layer outputs, {in_count} on layer inputs (feedforward)",
            "feedforward": spec.feedforward
            if isinstance(spec.feedforward, str)
            else ", ".join(spec.feedforward),
        }
    }
