"""TorchScript modules for the PyTorch backend tests (scripted in tests/test_pytorch.py)."""

from __future__ import annotations

import torch


class AddSub(torch.nn.Module):
    """Triton's <name>__<index> convention: INPUT__0, INPUT__1 -> OUTPUT__0 (sum), OUTPUT__1 (difference)."""

    def forward(self, INPUT__0: torch.Tensor, INPUT__1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: N803
        return INPUT__0 + INPUT__1, INPUT__0 - INPUT__1


class GradMode(torch.nn.Module):
    """OUTPUT__0 = x with its first element replaced by 1.0 where autograd is on during forward, else 0.0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flag = torch.tensor([float(torch.is_grad_enabled())])
        return torch.cat([flag, x[1:]])


class Arguments(torch.nn.Module):
    """Inputs named after forward's arguments: OUT = x * 10 + y."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x * 10 + y


class DictInput(torch.nn.Module):
    """One Dict[str, Tensor] argument: every input by name."""

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return inputs["alpha"] * 2 - inputs["beta"]


class Strings(torch.nn.Module):
    """List[str] in and out."""

    def forward(self, words: list[str]) -> list[str]:
        return [w.upper() for w in words]


class InPlace(torch.nn.Module):
    """Writes into its input (as a careless preprocessing step would)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(2)
        return x


class WrongType(torch.nn.Module):
    """Answers int64 where the configuration says FP32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.long()


class SmallCNN(torch.nn.Module):
    """A small conv net: [N,3,32,32] -> [N,10]."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


class FrameMean(torch.nn.Module):
    """A camera frame's mean colour (the device test of the PyTorch backend's mapped inputs)."""

    def forward(self, FRAME: torch.Tensor) -> torch.Tensor:  # noqa: N803
        return FRAME.reshape(-1, 3).float().mean(dim=0)
