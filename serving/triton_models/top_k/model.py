"""Top-K step: the K best-scored candidates as raw item ids, with scores and titles."""

from pathlib import Path

import numpy as np
import pandas as pd
from common import answer_each, input_array
from ranking import best_first
from names import CANDIDATE_ID, ITEM_ID, ITEMS_FILE, SCORE, TITLE, TOP_K


class TritonPythonModel:
    def initialize(self, args):
        items = pd.read_parquet(Path(__file__).resolve().parent / ITEMS_FILE)
        self.titles = dict(zip(items["raw_item_id"].to_numpy(), items["title"].fillna("").astype(str)))

    def execute(self, requests):
        return answer_each(requests, self._respond, (ValueError,))

    def _respond(self, request):
        candidates = input_array(request, CANDIDATE_ID).reshape(-1)
        if candidates.dtype == np.object_:  # string ids arrive as bytes
            candidates = np.array([c.decode() for c in candidates], dtype=np.object_)
        scores = input_array(request, SCORE).reshape(-1)
        k = input_array(request, TOP_K).reshape(-1)  # checked by the workflow step
        best = best_first(candidates, scores, int(k[0]))
        titles = np.array([self.titles.get(i, "").encode() for i in candidates[best]], dtype=np.object_)
        return {ITEM_ID: candidates[best], SCORE: scores[best], TITLE: titles}
