"""Workflow step: raw user/item ids -> Categorify-encoded ids, with the saved NVTabular workflow."""

from pathlib import Path

import numpy as np

from common import answer_each, input_array, parameters
from inference_workflow import RequestEncoder, RequestError
from names import CANDIDATE_ID, DEFAULT_K, ITEM_COLUMN, TOP_K, USER_COLUMN


class TritonPythonModel:
    def initialize(self, args):
        params = parameters(args)
        self.user_column, self.item_column = params[USER_COLUMN], params[ITEM_COLUMN]
        self.default_k = int(params[DEFAULT_K])
        self.encoder = RequestEncoder.load(Path(__file__).resolve().parent, params)

    def execute(self, requests):
        return answer_each(requests, self._respond, (RequestError, ValueError))

    def _respond(self, request):
        users = input_array(request, self.user_column)
        items = input_array(request, self.item_column, required=False)
        encoded_users, encoded_items, raw_items = self.encoder.encode(users, items)
        return {self.user_column: encoded_users, self.item_column: encoded_items, CANDIDATE_ID: raw_items,
                TOP_K: self._top_k(request)}

    def _top_k(self, request) -> np.ndarray:
        k = input_array(request, TOP_K, required=False)
        if k is None:
            return np.array([self.default_k], dtype=np.int32)
        if k.size != 1 or k.reshape(-1)[0] < 1:
            raise RequestError(f"top_k must be one integer >= 1, got {k.reshape(-1).tolist()}")
        return k.reshape(1).astype(np.int32)
