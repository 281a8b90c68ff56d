"""The registered model: an MLflow pyfunc that serves the fastest decomposed form of the
champion on whatever machine loads it.

This file is the model itself, logged as MLflow "model from code" (no pickle): the
registry version holds it, the ``rank1`` package (torch only) as its code, and as
artifacts the model card (architecture, training config, input normalisation), the
trained weights and the exportable ``chain`` form as a ``torch.export`` program
(``exportable.pt2``, loadable with ``torch.export.load`` anywhere, no rank1 needed).

``load_context`` rebuilds the network from the weights (``torch.load(weights_only=True)``)
and plans ``decompose_model(net, "auto", example=...)`` on this machine: each layer gets
the kernel that is fastest here (the fused C++ kernel on a CPU with a compiler, Triton
on CUDA, the library convs otherwise), measured on the whole network. Plans are made
for batch 1 and the card's latency batch at load, and a request is served by the plan of
the nearest planned batch size, so no request waits for a measurement.
``mlflow models serve -m models:/NAME@champion`` and ``rank1 pull`` both get that form.

The loading machine's environment may choose: ``RANK1_SERVE_DEVICE`` (``cpu``, ``cuda``;
default CUDA where there is one) and ``RANK1_SERVE_FORM`` (``auto``, the default, or one
kernel of :data:`rank1.kernels.KERNELS` for every layer and batch size, nothing measured:
``chain`` is the form that exports). The study's driver loads the model with ``chain`` to
check it before registering it, so that the check plans nothing on the driver.

``predict`` takes a float32 array ``N x C x H x W``, normalised as the card's ``input``
says, and returns the logits ``N x classes``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

__all__ = ["FORM_ENV", "Rank1ServingModel"]

FORM_ENV = "RANK1_SERVE_FORM"


class Rank1ServingModel(PythonModel):
    """See the module docstring."""

    def load_context(self, context) -> None:
        import torch

        from rank1.models import model_for

        self.card = json.loads(Path(context.artifacts["card"]).read_text())
        inp = self.card["input"]
        net = model_for(self.card["train_config"], self.card["arm"], inp["channels"], inp["classes"])
        net.load_state_dict(torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True))
        want = os.environ.get("RANK1_SERVE_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(want)
        self.net = net.eval().to(self.device)
        self.deployed: dict[int, Any] = {}
        form = os.environ.get(FORM_ENV) or "auto"
        if form != "auto":  # one form for every batch size, nothing measured
            from rank1 import decompose_model

            try:
                self.deployed[1] = decompose_model(self.net, form)
            except ValueError as e:
                raise ValueError(f"{FORM_ENV}={form}: {e}") from None
            return
        c, h, w = self.card["input"]["channels"], *self.card["input"]["size"]
        for batch in sorted({1, int(self.card.get("latency_batch", 32))}):
            self.plan_for(torch.randn(batch, c, h, w, device=self.device))

    def plan_for(self, x):
        """The deployed form for ``x``'s batch size, planned now on this machine."""
        import warnings

        from rank1 import decompose_model

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.deployed[x.shape[0]] = decompose_model(self.net, "auto", example=x)
        return self.deployed[x.shape[0]]

    def deployed_for(self, batch: int):
        """The plan of the planned batch size nearest ``batch`` (in ratio)."""
        import math

        return self.deployed[min(self.deployed, key=lambda b: abs(math.log(b) - math.log(max(1, batch))))]

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        import numpy as np
        import torch

        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32), device=self.device)
        with torch.inference_mode():
            return self.deployed_for(x.shape[0])(x).float().cpu().numpy()


set_model(Rank1ServingModel())
