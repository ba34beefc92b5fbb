"""Top-K step: the K best-scored candidates as raw item ids, with scores and titles."""

from pathlib import Path

import numpy as np
import pandas as pd
from common import answer_each, input_array


class TritonPythonModel:
    def initialize(self, args):
        items = pd.read_parquet(Path(__file__).resolve().parent / "items.parquet")
        self.titles = dict(zip(items["raw_item_id"].to_numpy(), items["title"].fillna("").astype(str)))

    def execute(self, requests):
        return answer_each(requests, self._respond, (ValueError,))

    def _respond(self, request):
        candidates = input_array(request, "candidate_id").reshape(-1)
        if candidates.dtype == np.object_:  # string ids arrive as bytes
            candidates = np.array([c.decode() for c in candidates], dtype=np.object_)
        scores = input_array(request, "score").reshape(-1)
        k = input_array(request, "top_k").reshape(-1)  # checked by the workflow step
        # Each candidate once (its first occurrence), best score first, ties in request order.
        _, first = np.unique(candidates, return_index=True)
        first.sort()
        best = first[np.argsort(-scores[first], kind="stable")][: int(k[0])]
        titles = np.array([self.titles.get(i, "").encode() for i in candidates[best]], dtype=np.object_)
        return {"item_id": candidates[best], "score": scores[best], "title": titles}
