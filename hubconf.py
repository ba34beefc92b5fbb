"""torch.hub entry points.

    model = torch.hub.load(repo_dir, "neumf", source="local", nb_users=6043, nb_items=3709)
    model = torch.hub.load(repo_dir, "neumf", source="local", pretrained="RUN_DIR/checkpoints/best.pt")
"""

dependencies = ["torch"]

import sys
from pathlib import Path

# hub imports this file by path; the repository's packages must be importable from it.
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))


def neumf(nb_users: int | None = None, nb_items: int | None = None, pretrained=False, checkpoint=None, **config):
    """NeuMF (GMF + MLP, He et al. 2017). Without weights: a freshly initialised model of
    nb_users x nb_items (plus NeuMF's keyword arguments: mf_dim, mlp_layers, dropout,
    variant). With `checkpoint` (or `pretrained` given a path): that trained checkpoint, or a
    run directory's checkpoints/best.pt; nb_users / nb_items, if given, must match it."""
    from models import checkpoint as ckpt
    from models.neumf import NeuMF

    if isinstance(pretrained, (str, Path)):
        checkpoint, pretrained = pretrained, True
    if pretrained and checkpoint is None:
        raise ValueError("no published NeuMF weights: pass checkpoint=PATH (a .pt file or a run directory)")
    if checkpoint is None:
        if nb_users is None or nb_items is None:
            raise ValueError("nb_users and nb_items are required without a checkpoint")
        return NeuMF(nb_users, nb_items, **config)
    path = Path(checkpoint)
    if path.is_dir():
        path = path / "checkpoints" / "best.pt"
    model = ckpt.model_from(ckpt.load(path), path)
    for name, wanted in (("nb_users", nb_users), ("nb_items", nb_items)):
        if wanted is not None and wanted != model.config[name]:
            raise ValueError(f"{path} has {name}={model.config[name]}, not {wanted}")
    return model.eval()
