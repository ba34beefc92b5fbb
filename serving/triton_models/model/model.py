"""Model step on the python backend: the run's TorchScript scores encoded (user, item) pairs on CPU."""

from pathlib import Path

import numpy as np
import torch
from common import answer_each, input_array, parameters
from names import ITEM_COLUMN, SCORE, TORCH_THREADS, USER_COLUMN


class TritonPythonModel:
    def initialize(self, args):
        params = parameters(args)
        self.user_column, self.item_column = params[USER_COLUMN], params[ITEM_COLUMN]
        # One intra-op thread per instance: requests run concurrently across instances/steps.
        torch.set_num_threads(int(params.get(TORCH_THREADS, "1")))
        self.model = torch.jit.load(str(Path(__file__).resolve().parent / "model.pt"), map_location="cpu").eval()

    def execute(self, requests):
        return answer_each(requests, self._respond, (ValueError,))

    def _respond(self, request):
        users = torch.from_numpy(input_array(request, self.user_column).astype(np.int64, copy=False))
        items = torch.from_numpy(input_array(request, self.item_column).astype(np.int64, copy=False))
        with torch.inference_mode():
            scores = self.model(users, items)
        return {SCORE: scores.reshape(-1).to(torch.float32).numpy()}
