"""Per-token KL estimators against the reference policy, and the KL-coefficient controllers.

Estimators follow J. Schulman, "Approximating KL Divergence" (http://joschu.net/blog/kl-approx.html). With tokens
sampled from pi_theta and `log_r = log pi_ref(a) - log pi_theta(a)`:

- k1 = -log_r                      unbiased for KL(pi_theta || pi_ref), high variance, can be negative per token
- k2 = 1/2 (log_r)^2               biased, low variance, >= 0
- k3 = exp(log_r) - log_r - 1      unbiased, low variance, >= 0 (since e^x >= 1 + x)

COOL RLHF [R §4.2.3] penalises k1 with beta = 0.01 per token (the XTuner Ray RLHF default, spec §7.4).
The adaptive controller is Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences"
(https://arxiv.org/abs/1909.08593), §2.2.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# k3 exponentiates the log-ratio; beyond this the estimate is dominated by a single token and exp() overflows fp32.
# Clamping keeps the reward finite (verl clamps its k3 to [-10, 10] for the same reason).
_K3_LOG_RATIO_LIMIT = 20.0


def compute_kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 per token. `logprobs`, `ref_logprobs`: `[B, T]` -> `[B, T]`."""
    # k1 = log pi_theta(a) - log pi_ref(a)
    return logprobs - ref_logprobs


def compute_kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k2 per token. `logprobs`, `ref_logprobs`: `[B, T]` -> `[B, T]`."""
    # k2 = 1/2 (log pi_theta(a) - log pi_ref(a))^2
    return 0.5 * (logprobs - ref_logprobs) ** 2


def compute_kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 per token, >= 0. `logprobs`, `ref_logprobs`: `[B, T]` -> `[B, T]`. The log-ratio is clamped to +-20."""
    log_r = (ref_logprobs - logprobs).clamp(-_K3_LOG_RATIO_LIMIT, _K3_LOG_RATIO_LIMIT)
    # k3 = exp(log_r) - log_r - 1,  log_r = log pi_ref(a) - log pi_theta(a)
    return torch.expm1(log_r) - log_r


KL_ESTIMATORS = {
    "k1": compute_kl_k1,
    "k2": compute_kl_k2,
    "k3": compute_kl_k3,
}


def compute_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL estimate with the named estimator (see `KL_ESTIMATORS`). `[B, T]` in, `[B, T]` out."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {sorted(KL_ESTIMATORS)}")
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)} and ref_logprobs {tuple(ref_logprobs.shape)} differ")
    return KL_ESTIMATORS[estimator](logprobs, ref_logprobs)


@dataclass
class KLConfig:
    """The KL penalty: coefficient beta, estimator, and whether beta adapts to a target KL."""

    coef: float = 0.01  # beta [R §4.2.3]; the initial value when adaptive
    estimator: str = "k1"  # k1 | k2 | k3
    controller: str = "fixed"  # fixed | adaptive
    target: float | None = None  # adaptive only: target KL per sequence (nats), e.g. 6.0 as in Ziegler et al.
    horizon: int = 10000  # adaptive only: samples over which beta may change by a factor of about e^0.2

    def __post_init__(self) -> None:
        if self.coef < 0:
            raise ValueError(f"kl.coef must be >= 0 (got {self.coef}); use 0 to switch the KL penalty off")
        if self.estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl.estimator must be one of {sorted(KL_ESTIMATORS)} (got {self.estimator!r})")
        if self.controller not in KL_CONTROLLERS:
            raise ValueError(f"kl.controller must be one of {sorted(KL_CONTROLLERS)} (got {self.controller!r})")
        if self.controller == "adaptive":
            if self.target is None or self.target <= 0:
                raise ValueError(f"kl.controller=adaptive needs kl.target > 0 (got {self.target}); e.g. kl.target=6.0")
            if self.horizon <= 0:
                raise ValueError(f"kl.horizon must be > 0 (got {self.horizon}); e.g. kl.horizon=10000")
            if self.coef == 0:
                raise ValueError("kl.controller=adaptive cannot grow from kl.coef=0 (it scales beta); set kl.coef > 0")


class FixedKLController:
    """beta stays at its initial value; `update` only exists so drivers treat both controllers alike."""

    def __init__(self, coef: float):
        self.coef = float(coef)

    @classmethod
    def from_config(cls, cfg: KLConfig) -> FixedKLController:
        return cls(cfg.coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        del current_kl, n_steps

    def state_dict(self) -> dict[str, float]:
        return {"coef": self.coef}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.coef = float(state["coef"])


class AdaptiveKLController:
    """Proportional controller that steers the observed KL towards `target` (Ziegler et al. 2019, eq. in §2.2).

    Call `update(kl, n)` once per rollout batch with the batch's mean per-sequence KL and its number of sequences.
    """

    def __init__(self, coef: float, target: float, horizon: int):
        self.coef, self.target, self.horizon = float(coef), float(target), int(horizon)

    @classmethod
    def from_config(cls, cfg: KLConfig) -> AdaptiveKLController:
        return cls(cfg.coef, cfg.target, cfg.horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        # e_t = clip(KL_t / KL_target - 1, -0.2, 0.2)
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        # beta_{t+1} = beta_t * (1 + e_t * n_steps / horizon)
        self.coef *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"coef": self.coef, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        # Target and horizon come from the config of the resumed run; only beta is carried over.
        self.coef = float(state["coef"])


KL_CONTROLLERS = {
    "fixed": FixedKLController,
    "adaptive": AdaptiveKLController,
}


def build_kl_controller(cfg: KLConfig) -> FixedKLController | AdaptiveKLController:
    """The controller named by `cfg.controller`, starting at `cfg.coef`."""
    return KL_CONTROLLERS[cfg.controller].from_config(cfg)
