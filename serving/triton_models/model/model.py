"""Model step on the python backend: the run's TorchScript scores encoded (user, item) pairs on CPU.

Where export wrote `catalogue.pt` (a model with all-item scoring, serving/catalogue.py), a
request pairing one user with a large share of the catalogue (ranking every item) is scored by
it in one pass over every item row, then indexed: the same scores as model.pt's, without
per-pair work.
"""

from pathlib import Path

import numpy as np
import torch
from common import answer_each, input_array, parameters
from names import CATALOGUE_FILE, ITEM_COLUMN, SCORE, TORCH_THREADS, USER_COLUMN

HERE = Path(__file__).resolve().parent


class TritonPythonModel:
    def initialize(self, args):
        params = parameters(args)
        self.user_column, self.item_column = params[USER_COLUMN], params[ITEM_COLUMN]
        # One intra-op thread per instance: requests run concurrently across instances/steps.
        torch.set_num_threads(int(params.get(TORCH_THREADS, "1")))
        self.model = torch.jit.load(str(HERE / "model.pt"), map_location="cpu").eval()
        catalogue = HERE / CATALOGUE_FILE
        self.catalogue, self.catalogue_rows = None, 0
        if catalogue.is_file():
            self.catalogue = torch.jit.load(str(catalogue), map_location="cpu").eval()
            # Its rows, from the module itself (user 0, a reserved row, is valid for every model);
            # this first call also warms it up.
            with torch.inference_mode():
                self.catalogue_rows = self.catalogue(torch.zeros(1, dtype=torch.int64)).numel()

    def execute(self, requests):
        return answer_each(requests, self._respond, (ValueError,))

    def _respond(self, request):
        users = torch.from_numpy(input_array(request, self.user_column).astype(np.int64, copy=False)).reshape(-1)
        items = torch.from_numpy(input_array(request, self.item_column).astype(np.int64, copy=False)).reshape(-1)
        with torch.inference_mode():
            if self._one_user_many_items(users, items):
                scores = self.catalogue(users[:1])[items]
            else:
                scores = self.model(users, items)
        return {SCORE: scores.reshape(-1).to(torch.float32).numpy()}

    def _one_user_many_items(self, users: torch.Tensor, items: torch.Tensor) -> bool:
        # Scoring every row costs about what pairs cost for a few thousand items: worth it
        # from a quarter of the catalogue on.
        return (self.catalogue is not None and users.numel() == items.numel() > 0
                and 4 * items.numel() >= self.catalogue_rows and bool((users == users[0]).all()))
