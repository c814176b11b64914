"""The learned prompt distribution: its file, and the Gaussian over encoder outputs that sampling draws from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file, safe_open

from dd3d.cli import UserError
from dd3d.files import atomic_write
from dd3d.prompts import SoftPromptEncoder

FILE_KIND = "dd3d-prompt-distribution"
FORMAT_VERSION = 1


@dataclass
class Gaussian:
    """A diagonal Gaussian over text-encoder outputs, per token position and channel: mean, std (77, d)."""

    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def from_hidden(cls, hidden: torch.Tensor) -> "Gaussian":
        """Fit to the encoder outputs of the K prompts, hidden (K, 77, d)."""
        return cls(hidden.mean(dim=0), hidden.std(dim=0))

    def sample(self, n: int, std_scale: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """n draws of `mean + std_scale * eps * std`, (n, 77, d); eps is drawn on the CPU for reproducibility."""
        eps = torch.randn((n, *self.mean.shape), generator=generator, dtype=torch.float32)
        return self.mean + std_scale * eps.to(self.mean.device, self.mean.dtype) * self.std


@dataclass
class PromptDistribution:
    """K learned contexts of n_ctx tokens plus the template and the text encoder they were learned for."""

    ctx: torch.Tensor  # (K, n_ctx, d)
    prefix: str
    suffix: str
    model_id: str
    fingerprint: str
    reference_positions: bool = False  # imported from the reference code: fixed tokens positioned twice

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
        }
        tensors = {"ctx": self.ctx.detach().to("cpu", torch.float32).contiguous()}
        atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))

    @classmethod
    def load(cls, path: Path) -> "PromptDistribution":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"distribution file {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
            ctx = load_file(str(path))["ctx"]
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
        )

    def check_backbone(self, backbone) -> None:
        """Refuse a text encoder other than the one this distribution was learned for."""
        if backbone.fingerprint != self.fingerprint:
            raise UserError(
                f"this distribution was learned for the text encoder of '{self.model_id}' "
                f"(fingerprint {self.fingerprint}), but the loaded model '{backbone.model_id}' has {backbone.fingerprint}; "
                "pass the matching --model"
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

    @torch.no_grad()
    def fit(self, backbone, prefix: str | None = None, suffix: str | None = None) -> Gaussian:
        """Encode the K contexts under a template and fit the Gaussian of their encoder outputs."""
        hidden, _ = self.encoder(backbone, prefix, suffix)(self.ctx, self.reference_positions)
        return Gaussian.from_hidden(hidden.float())
