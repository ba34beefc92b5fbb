"""Every name the repository's parts agree on, defined once: model (step and ensemble) names,
tensor names, config parameter keys and file names. export writes them, the python-backend
steps and serving/client.py read them. It is also copied next to each step's model.py
(the server's python stub imports it as `names`), so it imports nothing.
"""

# Models in the repository.
WORKFLOW_STEP, MODEL_STEP, TOP_K_STEP = "workflow", "model", "top_k"
SCORES_ENSEMBLE, RECOMMEND_ENSEMBLE = "scores", "recommend"

# Ensemble inputs besides the user and item columns (named by feature_spec.yaml), and outputs.
TOP_K = "top_k"
SCORE = "score"
TOP_ITEM_ID, TOP_SCORE, TOP_TITLE = "top_item_id", "top_score", "top_title"

# Tensors between steps: the raw candidate ids and the top-K step's outputs.
CANDIDATE_ID = "candidate_id"
ITEM_ID, TITLE = "item_id", "title"

# config.pbtxt parameters (string values).
USER_COLUMN, ITEM_COLUMN = "user_column", "item_column"
FIRST_INDEX, UNKNOWN_IDS, DEFAULT_K, TORCH_THREADS = "first_index", "unknown_ids", "default_k", "torch_threads"
# On the model step and both ensembles: what `score` means ("probability" or "score") and
# which registered model produced it; the client reads them from the `scores` config.
SCORE_KIND, MODEL_NAME = "score_kind", "model_name"
SCORE_KINDS = ("probability", "score")

# --unknown-ids: reject unseen ids, score them as Categorify's OOV index, or answer an
# unseen user with item popularity.
UNKNOWN_IDS_CHOICES = ("error", "oov", "popularity")

# Files inside the steps' version directories.
SEEN_FILE = "seen.npz"  # workflow step: each user's items, left out when ranking every item
ITEMS_FILE = "items.parquet"  # top-K step: raw item ids and titles
CATALOGUE_FILE = "catalogue.pt"  # model step: every item's score for one user (models with all-item scoring)
