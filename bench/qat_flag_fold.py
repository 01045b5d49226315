"""Does a compiled model see a class-level flag flipped after compilation? The 1.1233 record's late QAT is such a
flag: its CastedLinear reads the class attribute `_qat_enabled`, which the training loop sets once the LR scale
falls below 0.15, on a model compiled with `torch.compile(dynamic=False, fullgraph=True)` under bf16 autocast.

    python bench/qat_flag_fold.py        # a GPU (as the record ran); on a CPU it runs under CPU autocast

Prints the loss of a two-layer model with the flag off, then on through the compiled model and through the eager
one: if the compiled loss stays at the flag-off value, compilation folded the flag and QAT never acts.
"""

import torch
import torch.nn.functional as F
from torch import nn


class CastedLinear(nn.Linear):
    _qat_enabled = False  # the record's pattern: one flag on the class, flipped by the training loop

    def forward(self, x):
        w = self.weight
        if CastedLinear._qat_enabled:  # int6 fake quantisation, straight-through: the record's formula
            scale = (w.detach().abs().amax(dim=1, keepdim=True) / 31).clamp_min(1 / 31)
            w = w + ((w / scale).round().clamp(-32, 31) * scale - w).detach()
        return F.linear(x, w.to(x.dtype))


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = nn.Sequential(CastedLinear(256, 1024, bias=False), nn.ReLU(), CastedLinear(1024, 256, bias=False)).to(device)
    for m in model:
        if isinstance(m, CastedLinear):
            nn.init.normal_(m.weight, std=0.05)
    x, y = torch.randn(64, 256, device=device), torch.randint(0, 256, (64,), device=device)
    compiled = torch.compile(model, dynamic=False, fullgraph=True)

    def loss(m) -> float:
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
            return F.cross_entropy(m(x).float(), y).item()

    off = loss(compiled)
    CastedLinear._qat_enabled = True
    on_compiled, on_eager = loss(compiled), loss(model)
    print(f"torch {torch.__version__} on {device}: qat off {off:.6f}  qat on compiled {on_compiled:.6f}  "
          f"qat on eager {on_eager:.6f}  -> compiled sees the flag: {on_compiled != off}")


if __name__ == "__main__":
    main()
