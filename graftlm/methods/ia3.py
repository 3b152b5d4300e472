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
    """A linear layer (`nn.Linear` or GPT-2's `Conv1D`) with named (IA)³ scaling vectors.

    The original layer is kept whole as `base_layer` (frozen, as PEFT lays it out); the vectors
    live in the ParameterDict `ia3_l`, fp32, `[out, 1]` (scaling the output, bias included) or,
    for a feedforward layer, `[1, in]` (scaling the input). One adapter is active at a time;
    row-aware (`graftlm.methods.base`, item 7): with `row_groups` set, each group of batch rows
    is scaled by its own adapter's vector (or not at all).

    Shapes: input `(batch, ..., in_features)`, output `(batch, ..., out_features)`.
    """

    graftlm_row_aware = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.out_features, self.in_features = layer_dims(base_layer)
        self.ia3_l = nn.ParameterDict()
        self.feedforward: dict[str, bool] = {}
        self.active: str | None = None
        self.merged: str | None = None
        self.row_groups: list[tuple[str | None, torch.Tensor]] | None = None

    def add(self, name: str, feedforward: bool) -> None:
        """A new vector of ones for adapter `name` (the model is unchanged by it)."""
        shape = (1, self.in_features) if feedforward else (self.out_features, 1)
        device = next(self.base_layer.parameters()).device
        self.ia3_l[name] = nn.Parameter(torch.ones(shape, dtype=torch.float32, device=device))
        self.feedforward[name] = feedforward

    def delete(self, name: str) -> None:
        """Remove adapter `name` (unmerging it first if merged)."""
        if self.merged == name:
            self.unmerge()
        del self.ia3_l[name]
        del self.feedforward[name]
        if self.active == name:
            self.active = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.row_groups is not None:
            return self._rows_forward(x)
        name = self.active
        if name is None or name == self.merged or name not in self.ia3_l:
            return self.base_layer(x)
        scale = self.ia3_l[name].flatten()
        if self.feedforward[name]:
            return self.base_layer((x * scale).to(x.dtype))
        result = self.base_layer(x)
        return (result * scale).to(result.dtype)

    def _rows_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Each batch row scaled by its group's adapter (`row_groups`), in one base product."""
        if self.merged is not None:
            raise GraftError(
                f"per-row adapters need unmerged (IA)³ adapters; {self.merged!r} is merged"
            )
        groups = [(n, rows) for n, rows in self.row_groups if n is not None and n in self.ia3_l]
        ff = [n for n, _ in groups if self.feedforward[n]]
        out = [n for n, _ in groups if not self.feedforward[n]]
        if ff:
            x = (x * self._row_scales(x, groups, ff, self.in_features)).to(x.dtype)
        result = self.base_layer(x)
        if out:
            scale = self._row_scales(result, groups, out, self.out_features)
            result = (result * scale).to(result.dtype)
        return result

    def _row_scales(self, like: torch.Tensor, groups, names: list[str], width: int):
        """`[batch, 1, ..., width]` of ones, with each named group's rows set to its vector."""
        scale = torch.ones(like.shape[0], width, dtype=torch.float32, device=like.device)
        for name, rows in groups:
            if name in names:
                vector = self.ia3_l[name].flatten().to(scale.dtype)
                scale = scale.index_copy(0, rows, vector.expand(len(rows), -1))
        return scale.view(like.shape[0], *([1] * (like.dim() - 2)), width)

    def merge(self) -> None:
        """Fold the active adapter's vector into the base weight (and bias), in fp32.

        Idempotent for the merged adapter.

        Raises:
            GraftError: another adapter is merged; the base layer is not a plain linear
                layer; the vector holds NaN/inf (nothing is changed then).
        """
        name = self.active
        if name is None or name not in self.ia3_l or self.merged == name:
            return
        if self.merged is not None:
            raise GraftError(f"(IA)³ adapter {self.merged!r} is merged; unmerge it first")
        if not (isinstance(self.base_layer, nn.Linear) or _is_conv1d(self.base_layer)):
            raise GraftError(
                f"(IA)³ merges into nn.Linear / Conv1D weights, not a {type(self.base_layer).__name__}"
            )
        vector = self.ia3_l[name].detach().float()
        if not torch.isfinite(vector).all():
            raise GraftError(f"(IA)³ adapter {name!r} holds NaN/inf values; refusing to merge it")
        self._rescale(vector, self.feedforward[name])
        self.merged = name

    def unmerge(self) -> None:
        """Divide the merged vector out of the base weight again (no-op when none is merged).

        Raises:
            GraftError: a zero entry makes the merge impossible to undo.
        """
        name = self.merged
        if name is None:
            return
        vector = self.ia3_l[name].detach().float()
        if (vector == 0).any():
            raise GraftError(f"(IA)³ adapter {name!r} has zero entries: the merge cannot be undone")
        self._rescale(1.0 / vector, self.feedforward[name])
        self.merged = None

    def _rescale(self, vector: torch.Tensor, feedforward: bool) -> None:
        # `vector` is [out, 1] or [1, in]: it multiplies an [out, in] weight directly, and
        # Conv1D's [in, out] weight transposed
        weight = self.base_layer.weight
        scale = vector.T if _is_conv1d(self.base_layer) else vector
        with torch.no_grad():
            weight.copy_((weight.detach().float() * scale).to(weight.dtype))
            bias = getattr(self.base_layer, "bias", None)
            if bias is not None and not feedforward:  # the output scale covers the bias
                bias.copy_((bias.detach().float() * vector.flatten()).to(bias.dtype))

    def extra_repr(self) -> str:
        kinds = {n: "in" if ff else "out" for n, ff in self.feedforward.items()}
        return f"in={self.in_features}, out={self.out_features}, scales={kinds}"


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def layer_dims(module: nn.Module) -> tuple[int, int]:
    """`(out_features, in_features)` of a linear layer, also inside other methods' wrappers."""
    if _is_conv1d(module):
        in_f, out_f = module.weight.shape
        return int(out_f), int(in_f)
    if hasattr(module, "out_features") and hasattr(module, "in_features"):
        return int(module.out_features), int(module.in_features)
    if hasattr(module, "base_layer"):  # e.g. a bottleneck adapter around the layer
        return layer_dims(module.base_layer)
    return tuple(int(d) for d in module.weight.shape)  # type: ignore[return-value]


def ia3_layers(model: nn.Module) -> list[tuple[str, IA3Linear]]:
    """Every (IA)³ layer of `model`, with its module name, in model order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, IA3Linear)]


def adapters(model: nn.Module) -> dict[str, IA3Spec]:
    """The (IA)³ adapters of `model`: {name: spec} (a live dict, in the order added)."""
    if not hasattr(model, "graftlm_ia3"):
        model.graftlm_ia3 = {}
    return model.graftlm_ia3


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


def _outer_modules(model: nn.Module) -> list[tuple[str, nn.Module, bool]]:
    """`(name, module, is a linear layer)` in model order, never the inside of a wrapper.

    Linear layers are plain ones and any method's wrapper around one (an `IA3Linear`, a LoRA
    layer, a bottleneck adapter); LoRA's own A and B are `nn.Linear` too, hence the skipping.
    """
    from graftlm.methods.lora import LoraEmbedding, LoraLayerBase
    from graftlm.surgery import is_linear

    found, skip = [], None
    for name, module in model.named_modules():
        if not name or (skip is not None and name.startswith(skip)):
            continue
        wrapper = isinstance(module, LoraLayerBase) or hasattr(module, "base_layer")
        if wrapper:
            skip = name + "."  # named_modules() is pre-order: the inside follows directly
        linear = is_linear(module) or (wrapper and not isinstance(module, LoraEmbedding))
        found.append((name, module, linear))
    return found


def _layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m, linear in _outer_modules(model) if linear]


def find_targets(model: nn.Module, spec: IA3Spec) -> list[tuple[str, bool]]:
    """`(module name, is feedforward)` for every layer `spec` selects, in model order.

    Raises:
        GraftError: nothing matched (listing the model's linear-layer names), or a name in a
            list of targets names a module that is not a linear layer.
    """
    from graftlm.surgery import _output_head_names

    layers = _layers(model)
    heads = _output_head_names(model)
    found = []
    for name, _ in layers:
        if spec.targets == "all-linear":
            hit = name not in heads
        else:
            hit = _peft_match(spec.targets, name)
        if hit and not (spec.exclude is not None and _peft_match(spec.exclude, name)):
            found.append((name, _peft_feedforward(spec.feedforward, name)))
    if isinstance(spec.targets, tuple):  # PEFT refuses a named module it cannot adapt
        for name, module, linear in _outer_modules(model):
            if not linear and _peft_match(spec.targets, name):
                raise GraftError(
                    f"target {name!r} is a {type(module).__name__}; (IA)³ adapts linear layers only"
                )
    if not found:
        names = sorted({n.rsplit(".", 1)[-1] for n, _ in layers if n not in heads})
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
    """Add adapter `name` (vectors at one) on every layer `spec` selects and make it the active,
    and only trainable, one.

    Returns:
        An `InjectSummary`.

    Raises:
        GraftError: the name is taken or not a plain identifier; no layer matched.
    """
    from graftlm.surgery import _set_module, base_fingerprint, summarize

    known = adapters(model)
    if name in known:
        raise GraftError(f"an (IA)³ adapter named {name!r} is already loaded")
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
        raise GraftError(f"adapter name {name!r} may only use letters, digits, '_' and '-'")
    base_fingerprint(model)  # of the untouched base: the wrapped layers change module names
    added = []
    for module_name, feedforward in find_targets(model, spec):
        layer = model.get_submodule(module_name)
        if not isinstance(layer, IA3Linear):
            layer = IA3Linear(layer)
            _set_module(model, module_name, layer)
        layer.add(name, feedforward)
        added.append((module_name, "IA3-in" if feedforward else "IA3-out", 1))
    known[name] = spec
    set_active(model, name)
    return summarize(model, name, added)


def set_active(model: nn.Module, name: str | None) -> None:
    """Make adapter `name` the one every (IA)³ layer applies (None: none) and the only
    trainable parameters of the model."""
    if name is not None and name not in adapters(model):
        raise GraftError(f"no (IA)³ adapter named {name!r}; loaded: {list(adapters(model))}")
    for param in model.parameters():
        param.requires_grad_(False)
    for _, layer in ia3_layers(model):
        layer.active = name
        if name in layer.ia3_l:
            layer.ia3_l[name].requires_grad_(True)


def active_adapter(model: nn.Module) -> str | None:
    """The adapter the (IA)³ layers apply (the one added or loaded last, unless set)."""
    layers = ia3_layers(model)
    return layers[0][1].active if layers else None


def attach(model: nn.Module, cfg) -> Any:
    """Add (IA)³ adapter "default" to a freshly loaded base model as `cfg` describes."""
    return add_ia3(model, default_spec(model, cfg.targets))


def merge(model: nn.Module) -> None:
    """Fold the active adapter's vectors into the layers' weights (fp32 math); idempotent,
    all or nothing.

    Raises:
        GraftError: no (IA)³ adapter; a vector with NaN/inf (then nothing is merged).
    """
    name = active_adapter(model)
    if name is None:
        raise GraftError("the model holds no active (IA)³ adapter to merge")
    for module_name, layer in ia3_layers(model):
        if name in layer.ia3_l and not torch.isfinite(layer.ia3_l[name]).all():
            raise GraftError(
                f"(IA)³ adapter {name!r} has NaN/inf values in {module_name}; refusing to merge "
                "it (nothing was merged)"
            )
    for _, layer in ia3_layers(model):
        layer.merge()


def unmerge(model: nn.Module) -> None:
    """Undo `merge`, restoring the base weights (up to the weight dtype's rounding)."""
    for _, layer in ia3_layers(model):
        layer.unmerge()


def unload(model: nn.Module, name: str) -> None:
    """Remove adapter `name` (unmerged first if merged); the last one out restores the base
    model's own modules.

    Raises:
        GraftError: no adapter of that name.
    """
    from graftlm.surgery import _set_module

    known = adapters(model)
    if name not in known:
        raise GraftError(f"no (IA)³ adapter named {name!r}; loaded: {list(known)}")
    active = active_adapter(model)
    for module_name, layer in ia3_layers(model):
        if name in layer.ia3_l:
            layer.delete(name)
        if not layer.ia3_l:
            _set_module(model, module_name, layer.base_layer)
    del known[name]
    if known:
        set_active(model, active if active in known else list(known)[-1])


# -- save / load ------------------------------------------------------------------------------


def _name_or_active(model: nn.Module, name: str | None) -> str:
    name = active_adapter(model) if name is None else name
    if name is None or name not in adapters(model):
        raise GraftError(f"no (IA)³ adapter named {name!r}; loaded: {list(adapters(model))}")
    return name


def state_dict(model: nn.Module, name: str | None = None) -> dict[str, torch.Tensor]:
    """Adapter `name`'s (default: the active one's) vectors under PEFT's keys
    (`base_model.model.<module>.ia3_l`), fp32."""
    name = _name_or_active(model, name)
    return {
        PREFIX + module_name + KEY_SUFFIX: layer.ia3_l[name].detach().float()
        for module_name, layer in ia3_layers(model)
        if name in layer.ia3_l
    }


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


def peft_config(
    model: nn.Module, base_model_name: str | None, name: str | None = None
) -> dict[str, Any]:
    """`adapter_config.json` for (IA)³ adapter `name` (default: the active one), PEFT's fields.

    `target_modules` / `feedforward_modules` are suffix lists when PEFT's matching rules select
    exactly the adapted layers with them, else anchored regexes of the exact names.
    """
    name = _name_or_active(model, name)
    layers = [(n, layer) for n, layer in ia3_layers(model) if name in layer.ia3_l]
    adapted = [n for n, _ in layers]
    feedforward = [n for n, layer in layers if layer.feedforward[name]]
    everything = [n for n, _, _ in _outer_modules(model)]
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
        "fan_in_fan_out": any(_is_conv1d(layer.base_layer) for _, layer in layers),
        "modules_to_save": None,
        "init_ia3_weights": True,
    }


def save(model: nn.Module, folder: Path, base_model_name: str | None) -> dict[str, torch.Tensor]:
    """Write the active adapter as a PEFT `IA3` folder (config + safetensors, each atomically).

    Merged vectors are saved as they are (the file never depends on the merge state).

    Returns:
        The tensors written.
    """
    from graftlm.adapters import atomic_save_safetensors, atomic_write_json

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

    Several adapters may be loaded under different names; the last one loaded is active.

    Raises:
        GraftError: unreadable files; keys naming modules the model lacks, layers the config
            selects without a vector (all listed at once); a vector of the wrong shape (file,
            key, expected and found shapes); the name is taken.
    """
    from graftlm.adapters import read_adapter_weights

    folder = Path(folder)
    if name in adapters(model):
        raise GraftError(f"an (IA)³ adapter named {name!r} is already loaded")
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
        out_f, in_f = layer_dims(modules[module_name])
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
            if name in layer.ia3_l:
                layer.ia3_l[name].copy_(vectors[module_name].float())


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
