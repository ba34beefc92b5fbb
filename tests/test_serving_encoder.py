"""The workflow step's id encoding (serving/inference_workflow.py RequestEncoder) on the real
ETL output's saved workflow: each id is looked up on its own in the fitted values' index, the
repeated user of a request once, and only ids outside it pass through the NVTabular workflow;
the codes equal NVTabular's own pandas path, and unknown ids keep their meaning (OOV index,
or a RequestError naming them)."""

from __future__ import annotations

import numpy as np
import pytest

from merlin_ncf.feature_spec import FeatureSpec
from merlin_ncf.serving.inference_workflow import InferenceWorkflow, RequestEncoder, RequestError

UNSEEN = 10**9


@pytest.fixture(scope="module")
def workflow(etl_dir):
    return InferenceWorkflow(etl_dir / "workflow")


def _encoder(etl_dir, workflow, unknown_ids: str):
    spec = FeatureSpec.load(etl_dir)
    encoder = RequestEncoder(workflow, spec.user_feature, spec.item_feature, spec.first_item_index, unknown_ids)
    passes = []  # the rows of each pass through the workflow (instrumented, not replaced)
    transform = workflow.transform
    workflow.transform = lambda columns: passes.append({c: len(v) for c, v in columns.items()}) or transform(columns)
    return encoder, passes


def test_ids_are_looked_up_one_by_one_and_the_user_once(etl_dir, workflow):
    encoder, passes = _encoder(etl_dir, workflow, "oov")
    try:
        user, items = workflow.vocabulary("user_id")[3], np.r_[encoder.all_items[:50], UNSEEN]
        reference = workflow.transform_with_pandas({"user_id": np.full(items.size, user), "item_id": items})
        users_out, items_out, raw = encoder.encode(np.array([user]), items)
        np.testing.assert_array_equal(users_out, reference["user_id"])
        np.testing.assert_array_equal(items_out, reference["item_id"])
        np.testing.assert_array_equal(raw, items)
        assert items_out[-1] < encoder.first_index  # the unseen item: Categorify's reserved OOV index
        assert passes == [{"user_id": 1, "item_id": 1}]  # only the unseen item went through the workflow
        passes.clear()
        encoder.encode(np.array([user]), items[:50])
        assert passes == []  # known ids: lookups only
        stranger = encoder.encode(np.array([UNSEEN]), items[:50])[0]
        assert passes == [{"user_id": 1, "item_id": 1}]  # an unknown user: once, not once per item
        expected = workflow.transform_with_pandas({"user_id": np.array([UNSEEN]), "item_id": items[:1]})["user_id"]
        np.testing.assert_array_equal(stranger, np.repeat(expected, 50))
    finally:
        del workflow.transform


def test_unknown_ids_are_still_rejected_by_name(etl_dir, workflow):
    encoder, _ = _encoder(etl_dir, workflow, "error")
    try:
        user, items = workflow.vocabulary("user_id")[3], np.r_[encoder.all_items[:5], UNSEEN]
        with pytest.raises(RequestError, match=f"unknown item_id \\(1\\): {UNSEEN}"):
            encoder.encode(np.array([user]), items)
        with pytest.raises(RequestError, match=f"unknown user_id \\(1\\): {UNSEEN}"):
            encoder.encode(np.array([UNSEEN]), items[:5])
    finally:
        del workflow.transform
