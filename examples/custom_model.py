"""Your own nn.Module and torch Dataset in tripletlab's Trainer (docs/training.md)."""

import torch
from sklearn.datasets import load_digits
from torch import nn

from tripletlab import TripletLoss
from tripletlab.train import Trainer


class Digits(torch.utils.data.Dataset):  # any map-style Dataset yielding (x, label)
    def __init__(self):
        self.x, self.y = load_digits(return_X_y=True)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return torch.tensor(self.x[i] / 16, dtype=torch.float32), int(self.y[i])


class Net(nn.Module):  # your architecture; an L2-normalised output is evaluated with cosine
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))

    def forward(self, x):
        return nn.functional.normalize(self.body(x), dim=1)


trainer = Trainer(
    model=Net(),
    train_data=Digits(),  # test and validation items are held out from it (split.json)
    loss=TripletLoss(margin=0.2, strategy="hard"),
    steps=200,
    out="runs/custom-digits",
    threads=1,
)
result = trainer.fit()  # checkpoints, metrics.jsonl, eval.json as for `tripletlab train`
print(result["retrieval"]["precision_at_1"], trainer.report())
# resume/extend later with the module passed again:
#   Trainer(model=Net(), train_data=Digits(), out="runs/custom-digits", steps=400, resume=True)
