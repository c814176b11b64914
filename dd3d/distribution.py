"""The learned prompt distribution: its file, and the Gaussian over encoder outputs that sampling draws from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from dd3d.cli import UserError
from dd3d.files import atomic_write
from dd3d.prompts import SoftPromptEncoder

FILE_KIND = "dd3d-prompt-distribution"
FORMAT_VERSION = 3  # 2 added the optional per-prompt `weights` and the `sampler` metadata, 3 the optional per-prompt
                    # `views`; 1 and 2 are still read
SAMPLERS = ("gaussian", "prompts")
VIEWS = ("front", "side", "back", "overhead")  # the view words of stage 2's template (and of `views`)


@dataclass
class Gaussian:
    """A diagonal Gaussian over text-encoder outputs, per token position and channel: mean, std (77, d)."""

    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def from_hidden(cls, hidden: torch.Tensor) -> "Gaussian":
        """Fit to the encoder outputs of the K prompts, hidden (K, 77, d); one prompt (K=1) has zero spread."""
        if len(hidden) == 1:
            return cls(hidden[0], torch.zeros_like(hidden[0]))
        return cls(hidden.mean(dim=0), hidden.std(dim=0))

    def scaled(self, std_scale: float) -> "Gaussian":
        return Gaussian(self.mean, self.std * std_scale)

    def apply(self, eps: torch.Tensor, uniforms: torch.Tensor | None = None):
        """Map standard-normal eps (n, 77, d) to draws `mean + eps * std`; returns (draws, component index 0)."""
        draws = self.mean + eps.to(self.mean.device, self.mean.dtype) * self.std
        return draws, torch.zeros(len(eps), dtype=torch.long)

    def sample(self, n: int, std_scale: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """n draws of `mean + std_scale * eps * std`, (n, 77, d); eps is drawn on the CPU for reproducibility."""
        eps = torch.randn((n, *self.mean.shape), generator=generator, dtype=torch.float32)
        return self.scaled(std_scale).apply(eps)[0]


def normalised_weights(weights: list[float], count: int) -> torch.Tensor:
    """Mixing weights as a probability vector; one per distribution, none negative, not all zero."""
    if len(weights) != count:
        raise UserError(f"{len(weights)} weights given for {count} distributions")
    tensor = torch.tensor(weights, dtype=torch.float64)
    if (tensor < 0).any() or not torch.isfinite(tensor).all():
        raise UserError("mixing weights must be finite and non-negative")
    if tensor.sum() <= 0:
        raise UserError("mixing weights must not all be zero")
    return tensor / tensor.sum()


def blend(components: list[Gaussian], weights: torch.Tensor) -> Gaussian:
    """The reference code's combination: one Gaussian with mean sum w_i mu_i and std sqrt(sum (w_i sigma_i)^2),
    i.e. the law of a weighted *sum* of independent draws (per-distribution std scales are applied beforehand)."""
    mean = sum(float(w) * g.mean for w, g in zip(weights, components))
    variance = sum((float(w) * g.std) ** 2 for w, g in zip(weights, components))
    return Gaussian(mean, variance.sqrt())


def nearest_weighted(points: torch.Tensor, weights: torch.Tensor, neighbours: int) -> torch.Tensor:
    """For each of the K points (K, ...), the indices (K, n) of its `neighbours` nearest (Euclidean) among those with
    positive weight, itself included when it has one; computed on the CPU, where mixture weights live."""
    flat = points.flatten(1).double().cpu()
    distance = torch.cdist(flat, flat).masked_fill(weights[None, :] <= 0, float("inf"))
    return distance.topk(min(neighbours, int((weights > 0).sum())), dim=1, largest=False).indices


def local_means(hidden: torch.Tensor, weights: torch.Tensor, neighbours: int) -> torch.Tensor:
    """For each of the K encodings (K, 77, d), the weighted mean of its `neighbours` nearest (Euclidean) among those
    with positive weight, itself included when it has one; (K, 77, d)."""
    nearest = nearest_weighted(hidden, weights, neighbours)
    local = torch.zeros(len(hidden), len(hidden), dtype=torch.double).scatter_(1, nearest, 1.0) * weights.double()
    local = (local / local.sum(1, keepdim=True)).to(hidden.device)
    return (local @ hidden.flatten(1).double()).to(hidden.dtype).view_as(hidden)


@dataclass
class Mixture:
    """A true mixture: component i with probability w_i, then a draw from that component. The weights (K,) stay
    on the CPU (they index and are drawn there); the components live where the encoder ran."""

    components: list[Gaussian]
    weights: torch.Tensor

    @classmethod
    def of_prompts(cls, hidden: torch.Tensor, bandwidth: float, weights: torch.Tensor | None = None,
                   shrink: float = 0.0, neighbours: int = 0) -> "Mixture":
        """One component per prompt, centred on its encoder output (K, 77, d), all with the spread `bandwidth` times
        the K prompts' std: the prompts' modes stay apart instead of blending into one Gaussian. Weights (K,) are
        the prompts' shares (uniform when None). `shrink` pulls every component that fraction of the way to a
        consensus (spreads times 1 - shrink): each prompt is learned from a few references, and shrinking its
        estimate removes part of its noise (James-Stein style). The consensus is the mixture's mean, or with
        `neighbours` = N the share-weighted mean of the N nearest prompts that have a share (itself among them), so
        that a prompt is denoised within its own mode instead of being pulled towards the others'."""
        spread = Gaussian.from_hidden(hidden).std * bandwidth
        weights = torch.full((len(hidden),), 1.0 / len(hidden)) if weights is None else weights / weights.sum()
        weights = weights.float().cpu()
        if neighbours:
            targets = local_means(hidden, weights, neighbours)
        else:
            targets = (weights.to(hidden.device)[:, None, None] * hidden).sum(0)
        means = hidden + shrink * (targets - hidden)
        return cls([Gaussian(row, spread * (1.0 - shrink)) for row in means], weights)

    @property
    def mean(self) -> torch.Tensor:
        return sum(float(w) * g.mean for w, g in zip(self.weights, self.components))

    def scaled(self, std_scale: float) -> "Mixture":
        """Every component's offset from the mixture's mean and its spread times std_scale: 0 gives one instance
        (the mean), 1 the mixture itself, more spreads it further."""
        centre = self.mean
        return Mixture(
            [Gaussian(centre + std_scale * (g.mean - centre), g.std * std_scale) for g in self.components],
            self.weights,
        )

    def moment_matched(self) -> Gaussian:
        """The diagonal Gaussian with the mixture's mean and variance (for the reference's blend)."""
        centre = self.mean
        variance = sum(float(w) * (g.std**2 + (g.mean - centre) ** 2) for w, g in zip(self.weights, self.components))
        return Gaussian(centre, variance.sqrt())

    @classmethod
    def combine(cls, parts: list["Gaussian | Mixture"], weights: torch.Tensor) -> "Mixture":
        """A mixture of distributions (each a Gaussian or a mixture), flattened to its components."""
        components, flat = [], []
        for part, weight in zip(parts, weights):
            inner = part if isinstance(part, Mixture) else Mixture([part], torch.ones(1))
            components += inner.components
            flat += [float(weight) * float(w) for w in inner.weights]
        return cls(components, torch.tensor(flat, dtype=torch.float32))

    def spread_uniform(self, position: float) -> float:
        """The uniform that picks the component found at `position` in [0, 1) when the mixture's weight is laid out
        with its components ordered along the main axis of their means (the first principal direction, weighted):
        positions (i + u) / n for i < n are systematic sampling, so n draws cover the components' main variation in
        proportion to their weights instead of repeating one part of it."""
        weights = self.weights.double() / self.weights.double().sum()
        means = torch.stack([g.mean.flatten() for g in self.components]).double().cpu()
        centred = means - (weights[:, None] * means).sum(0)
        axis = torch.linalg.svd(centred * weights.sqrt()[:, None], full_matrices=False)[2][0]
        order = torch.argsort(centred @ axis)
        edges = weights[order].cumsum(0)
        chosen = int(order[min(int(torch.searchsorted(edges, torch.tensor(position, dtype=edges.dtype), right=True)),
                               len(order) - 1)])
        return float(weights[:chosen].sum() + 0.5 * weights[chosen])  # the middle of that component's interval

    def neighbour_uniforms(self, uniform: float, neighbours: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The component that `uniform` picks and its `neighbours` - 1 nearest (Euclidean distance between means)
        among those with weight: the uniforms that pick each (the middle of its interval) and their weights."""
        chosen = int(self.component_index(torch.tensor([uniform]))[0])
        means = torch.stack([g.mean for g in self.components])
        nearest = nearest_weighted(means, self.weights, neighbours)[chosen]
        return (self.weights.cumsum(0) - 0.5 * self.weights)[nearest], self.weights[nearest]

    def component_index(self, uniforms: torch.Tensor) -> torch.Tensor:
        """The component each uniform in [0, 1) picks (n,)."""
        edges = self.weights.cumsum(0)
        return torch.searchsorted(edges, uniforms.to(edges.dtype), right=True).clamp(max=len(self.components) - 1)

    def apply(self, eps: torch.Tensor, uniforms: torch.Tensor):
        """Map eps (n, 77, d) and uniforms in [0, 1) (n,) to draws; returns (draws, component index)."""
        index = self.component_index(uniforms)
        means = torch.stack([g.mean for g in self.components])[index]
        stds = torch.stack([g.std for g in self.components])[index]
        return means + eps.to(means.device, means.dtype) * stds, index


@dataclass
class PromptDistribution:
    """K learned contexts of n_ctx tokens plus the template and the text encoder they were learned for."""

    ctx: torch.Tensor  # (K, n_ctx, d)
    prefix: str
    suffix: str
    model_id: str
    fingerprint: str
    reference_positions: bool = False  # imported from the reference code: fixed tokens positioned twice
    weights: torch.Tensor | None = None  # (K,) each prompt's share of the references (all objectives but gaussian)
    sampler: str = "gaussian"  # the sampler `sampler=auto` picks for this distribution
    views: tuple[str, ...] | None = None  # (K,) the view word each prompt was learned with (train.view_words)

    @property
    def num_prompts(self) -> int:
        return self.ctx.shape[0]

    @property
    def n_ctx(self) -> int:
        return self.ctx.shape[1]

    def save(self, path: Path) -> None:
        metadata = {
            "kind": FILE_KIND,
            "format_version": str(FORMAT_VERSION),
            "prefix": self.prefix,
            "suffix": self.suffix,
            "num_prompts": str(self.num_prompts),
            "n_ctx": str(self.n_ctx),
            "hidden_size": str(self.ctx.shape[2]),
            "model_id": self.model_id,
            "text_encoder_fingerprint": self.fingerprint,
            "reference_positions": str(self.reference_positions).lower(),
            "sampler": self.sampler,
        }
        if self.views is not None:
            metadata["views"] = ",".join(self.views)
        tensors = {"ctx": self.ctx.detach().to("cpu", torch.float32).contiguous()}
        if self.weights is not None:
            tensors["weights"] = self.weights.detach().to("cpu", torch.float32).contiguous()
        atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))

    @classmethod
    def load(cls, path: Path) -> "PromptDistribution":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"distribution file {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
            tensors = load_file(str(path))
            ctx = tensors["ctx"]
        except (SafetensorError, OSError, KeyError) as err:
            raise UserError(f"{path} is not a readable dd3d distribution file ({err})") from None
        if metadata.get("kind") != FILE_KIND:
            raise UserError(f"{path} is not a dd3d distribution file")
        if int(metadata.get("format_version", "0")) > FORMAT_VERSION:
            raise UserError(f"{path} uses format version {metadata['format_version']}; upgrade dd3d to read it")
        return cls(
            ctx=ctx,
            prefix=metadata["prefix"],
            suffix=metadata["suffix"],
            model_id=metadata["model_id"],
            fingerprint=metadata["text_encoder_fingerprint"],
            reference_positions=metadata.get("reference_positions") == "true",
            weights=tensors.get("weights"),
            sampler=metadata.get("sampler", "gaussian"),
            views=tuple(metadata["views"].split(",")) if metadata.get("views") else None,
        )

    def check_backbone(self, backbone) -> None:
        """Refuse a text encoder other than the one this distribution was learned for."""
        if backbone.fingerprint != self.fingerprint:
            raise UserError(
                f"this distribution was learned for the text encoder of '{self.model_id}' "
                f"(fingerprint {self.fingerprint}), but the loaded model '{backbone.model_id}' has "
                f"{backbone.fingerprint}; pass the matching --model"
            )

    def encoder(self, backbone, prefix: str | None = None, suffix: str | None = None) -> SoftPromptEncoder:
        """The soft-prompt encoder for the training template, or for an edited one (prefix/suffix replaced)."""
        self.check_backbone(backbone)
        return SoftPromptEncoder(
            backbone.tokenizer,
            backbone.text_encoder,
            self.n_ctx,
            self.prefix if prefix is None else prefix,
            self.suffix if suffix is None else suffix,
        )

    def encode(self, backbone, prefix: str | None = None, suffix: str | None = None,
               view: str | None = None) -> torch.Tensor:
        """The K prompts' encoder outputs (K, 77, d) under the template, its suffix extended by ", <view> view" when
        a view is given. Prompts learned with view words keep their own when neither the view nor the suffix names
        one."""
        suffix = self.suffix if suffix is None else suffix

        def under(word: str | None) -> torch.Tensor:
            return self.encoder(backbone, prefix, view_suffix(suffix, word))(self.ctx, self.reference_positions)[0]

        if view is not None or self.views is None or any(f"{word} view" in suffix.lower() for word in VIEWS):
            return under(view)
        encoded = {word: under(word) for word in set(self.views)}
        return torch.stack([encoded[word][k] for k, word in enumerate(self.views)])

    @torch.no_grad()
    def fit(self, backbone, prefix: str | None = None, suffix: str | None = None, sampler: str = "gaussian",
            bandwidth: float = 0.5, shrink: float = 0.0, neighbours: int = 0, view: str | None = None
            ) -> Gaussian | Mixture:
        """Encode the K contexts under a template (see `encode`) and fit the sampler to their encoder outputs: the
        paper's one diagonal Gaussian (`gaussian`), a mixture with one component per prompt weighted by the prompts'
        shares (`prompts`, see Mixture.of_prompts for bandwidth, shrink and neighbours), or the one the distribution
        was learned for (`auto`)."""
        sampler = self.sampler if sampler == "auto" else sampler
        if sampler not in SAMPLERS:
            raise UserError(f"sampler must be auto, {' or '.join(SAMPLERS)}, not '{sampler}'")
        hidden = self.encode(backbone, prefix, suffix, view)
        if sampler == "prompts":
            return Mixture.of_prompts(hidden.float(), bandwidth, self.weights, shrink, neighbours)
        return Gaussian.from_hidden(hidden.float())


def import_reference_checkpoint(
    path: Path, backbone, class_index: int | None = None, prefix: str = "", suffix: str = ""
) -> PromptDistribution:
    """Convert a reference DreamDistribution checkpoint (`final-N.pt`: `ctx` of shape (1, K, n_ctx, d) or (K, n_ctx, d)
    inside `model_state_dict`, keys possibly prefixed `module.` or `_orig_mod.`) to our format for `backbone`.
    Multi-class checkpoints (the reference's class-name mode) are refused.

    `prefix`/`suffix` are the template it was trained with. The result is marked `reference_positions`, so it is
    encoded the way the reference encodes it (position embeddings added twice to the fixed tokens)."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and file errors all mean "not a checkpoint we can read"
        raise UserError(f"cannot read reference checkpoint {path}: {str(err).splitlines()[0]}") from None
    if isinstance(state, dict):
        state = state.get("model_state_dict", state)
    ctx = None
    if isinstance(state, dict):
        ctx = next((v for k, v in state.items() if k.replace("_orig_mod.", "").replace("module.", "") == "ctx"), None)
    if not isinstance(ctx, torch.Tensor):
        raise UserError(f"{path} holds no `ctx` tensor; is it a DreamDistribution checkpoint?")
    if ctx.dim() == 4:
        if ctx.shape[0] > 1:  # the reference's class-name mode: another prompt layout, which dd3d does not encode
            raise UserError(
                f"{path} holds contexts for {ctx.shape[0]} classes (the reference code's class-name mode, where the "
                "class name is part of the prompt); dd3d imports single-class checkpoints only"
            )
        if class_index not in (None, 0):
            raise UserError(f"class index {class_index} is out of range: {path} holds one class (index 0)")
        ctx = ctx[0]
    if ctx.dim() != 3:
        raise UserError(f"`ctx` in {path} has shape {tuple(ctx.shape)}; expected (K, n_ctx, d) or (1, K, n_ctx, d)")
    width = backbone.text_encoder.config.hidden_size
    if ctx.shape[-1] != width:
        raise UserError(f"{path} was made for a text encoder of width {ctx.shape[-1]}, not this model's {width}")
    return PromptDistribution(
        ctx=ctx.detach().float(),
        prefix=prefix,
        suffix=suffix,
        model_id=backbone.model_id,
        fingerprint=backbone.fingerprint,
        reference_positions=True,
    )


# --- distributions -> one sampler (the 2D path, stage 2 and the threestudio extension share it) ----------


def load_distribution(path: str, backbone, class_index: int | None) -> PromptDistribution:
    """A dd3d distribution file, or a reference `.pt` checkpoint imported on the fly."""
    if Path(path).suffix == ".pt":
        return import_reference_checkpoint(Path(path), backbone, class_index)
    return PromptDistribution.load(Path(path))


def view_suffix(suffix: str, view: str | None) -> str:
    """The template suffix for a view label: "made of stone" -> "made of stone, front view"."""
    if view is None:
        return suffix
    return f"{suffix}, {view} view" if suffix else f", {view} view"


def build_sampler(cfg: DictConfig, backbone, view: str | None = None) -> Gaussian | Mixture:
    """Fit each distribution's sampler (cfg.sampler; `auto` when the config has none) under the
    generation template (its suffix extended by ", <view> view" when a view is given), apply its std scale, then
    blend or mix them."""
    count = len(cfg.dists)
    scales = list(cfg.std_scale)
    if len(scales) == 1:
        scales *= count
    if len(scales) != count:
        raise UserError(f"{len(scales)} std scales given for {count} distributions")
    if any(scale < 0 for scale in scales):
        raise UserError("std scales must not be negative")
    weights = normalised_weights(list(cfg.weights) if cfg.weights is not None else [1.0] * count, count)
    if cfg.mix not in ("blend", "mixture"):
        raise UserError(f"mix must be blend or mixture, not '{cfg.mix}'")
    fitted = []
    for path, scale in zip(cfg.dists, scales):
        dist = load_distribution(path, backbone, cfg.class_index)
        kind, bandwidth, shrink, neighbours = (
            cfg.get(key, default) for key, default in (("sampler", "auto"), ("sampler_bandwidth", 0.5),
                                                       ("sampler_shrink", 0.0), ("sampler_shrink_neighbours", 0)))
        sampler = dist.fit(backbone, cfg.prefix, cfg.suffix, kind, bandwidth, shrink, neighbours, view)
        fitted.append(sampler.scaled(scale))
    if count == 1:
        return fitted[0]
    if cfg.mix == "mixture":
        return Mixture.combine(fitted, weights.float())
    return blend([f.moment_matched() if isinstance(f, Mixture) else f for f in fitted], weights)
