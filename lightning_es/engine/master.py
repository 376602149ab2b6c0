"""An fp32 master copy of the evolved parameters.

Why: an ES step is about 1e-5 to 1e-4 per weight, at or below half a bf16 ulp, so updates applied to half-precision
weights in place mostly round away. The master copy accumulates every step in fp32 and the model holds its rounding,
so the realised update matches the intended one. It is also the exact source for restoring perturbed weights:
``w + sigma*eps - sigma*eps != w`` in floating point, while copying the master back is bit-exact.
Cost: 4 bytes per evolved parameter, on ``device`` (host memory when offloaded from an accelerator).
"""

from collections.abc import Mapping

import torch

from .params import require_every


class MasterWeights:
    """Copies of ``params``; with ``only_low_precision`` just of those not stored in fp32 (when nothing perturbs the
    weights in place, fp32 weights need no restore source and take their updates directly). ``shared``: fp32 tensors
    someone else keeps of the same values (DeepSpeed's fp32 partitions), used as the copies instead of new ones, with
    their values (more exact than the weights' rounding)."""

    def __init__(
        self,
        params: Mapping[str, torch.nn.Parameter],
        device: torch.device | str | None = None,
        only_low_precision: bool = False,
        shared: Mapping[str, torch.Tensor] | None = None,
    ):
        self.params = dict(params)
        if shared is not None:
            require_every(self.params, shared, "the shared fp32 copies")
            self.copies = {name: shared[name] for name in self.params}
            return
        with torch.no_grad():
            self.copies = {
                name: p.detach().to(device=device or p.device, dtype=torch.float32, copy=True)
                for name, p in self.params.items()
                if not (only_low_precision and p.dtype == torch.float32)
            }

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.copies[name]

    @torch.no_grad()
    def restore(self) -> None:
        """Write the master values back into the model (rounded once to the model's dtype)."""
        for name, master in self.copies.items():
            self.params[name].copy_(master)

    @torch.no_grad()
    def add_(self, name: str, delta: torch.Tensor) -> None:
        param = self.params[name]
        if name not in self.copies:
            param.add_(delta.to(param.device))
            return
        master = self.copies[name]
        master.add_(delta.to(master.device))
        param.copy_(master)

    def value(self, name: str) -> torch.Tensor:
        """The exact current value of a parameter, in fp32."""
        return self.copies[name] if name in self.copies else self.params[name].detach().float()

    @torch.no_grad()
    def sync_from_model(self) -> None:
        """Adopt the model's values, after something other than ES (an optimizer step, a checkpoint load) moved them."""
        for name, master in self.copies.items():
            master.copy_(self.params[name])

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        require_every(self.copies, state, "the saved master copies")
        for name, t in self.copies.items():
            t.copy_(state[name])
        self.restore()
