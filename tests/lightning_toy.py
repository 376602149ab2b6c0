"""A LightningModule whose fitness is the negative squared error of a small MLP on a fixed regression task."""

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset


def regression_data(rows: int = 64, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 4, generator=generator)
    y = torch.tanh(x @ torch.tensor([[1.0], [-2.0], [0.5], [1.5]]))
    return TensorDataset(x, y)


class Regression(pl.LightningModule):
    def __init__(self, optimizer: str | None = None, batch_size: int = 16, fitness=None):
        super().__init__()
        generator = torch.Generator().manual_seed(1)
        self.hidden = torch.nn.Linear(4, 5)
        self.out = torch.nn.Linear(5, 1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
        self.optimizer = optimizer
        self.batch_size = batch_size
        self.fitness = fitness  # replaces the returned fitness, to test bad outputs

    def error(self, batch) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.out(torch.tanh(self.hidden(x))), y)

    def training_step(self, batch, batch_idx):
        error = self.error(batch)
        self.log("train_mse", error)
        return -error if self.fitness is None else self.fitness(error)

    def validation_step(self, batch, batch_idx):
        self.log("val_mse", self.error(batch))

    def configure_optimizers(self):
        if self.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=0.02)
        return None

    def train_dataloader(self):
        return DataLoader(regression_data(), batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(regression_data(32, seed=7), batch_size=32)
