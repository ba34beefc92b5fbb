"""torch.hub entry points, one per registered model (models/registry.py).

    model = torch.hub.load(repo_dir, "neumf", source="local", nb_users=6043, nb_items=3709)
    model = torch.hub.load(repo_dir, "convncf", source="local", pretrained="RUN_DIR/checkpoints/best.pt")
    model = torch.hub.load(repo_dir, "multvae", source="local", nb_users=..., nb_items=...,
                           interactions=(users, items))  # Mult-VAE keeps the users' training rows
"""

dependencies = ["torch"]

from pathlib import Path

# The models are imported from the installed package (`pip install -e .` in this checkout).


def _load(name: str, nb_users=None, nb_items=None, pretrained=False, checkpoint=None, interactions=None, **config):
    """Without weights: a freshly initialised `name` model of nb_users x nb_items plus its
    constructor's keyword arguments. With `checkpoint` (or `pretrained` given a path): that
    trained checkpoint, or a run directory's checkpoints/best.pt, in eval mode; nb_users /
    nb_items, if given, must match it."""
    from merlin_ncf.models import checkpoint as ckpt
    from merlin_ncf.models.registry import model_class, model_name, model_from

    cls = model_class(name)
    if isinstance(pretrained, (str, Path)):
        checkpoint, pretrained = pretrained, True
    if pretrained and checkpoint is None:
        raise ValueError(f"no published {name} weights: pass checkpoint=PATH (a .pt file or a run directory)")
    if checkpoint is None:
        if nb_users is None or nb_items is None:
            raise ValueError("nb_users and nb_items are required without a checkpoint")
        if cls.needs_interactions:
            if interactions is None:
                raise ValueError(f"{name} needs interactions=(users, items), the training pairs")
            return cls.from_interactions(*interactions, nb_users, nb_items, **config)
        return cls(nb_users, nb_items, **config)
    path = Path(checkpoint)
    if path.is_dir():
        path = path / "checkpoints" / "best.pt"
    model = model_from(ckpt.load(path), path)
    if not isinstance(model, cls) or (name != "neumf" and model_name(model) != name):
        raise ValueError(f"{path} holds a {model_name(model)} model, not {name}")
    for key, wanted in (("nb_users", nb_users), ("nb_items", nb_items)):
        if wanted is not None and wanted != model.config[key]:
            raise ValueError(f"{path} has {key}={model.config[key]}, not {wanted}")
    return model.eval()


def neumf(nb_users: int | None = None, nb_items: int | None = None, pretrained=False, checkpoint=None, **config):
    """NeuMF (GMF + MLP, He et al. 2017); keyword arguments: mf_dim, mlp_layers, dropout, variant."""
    return _load("neumf", nb_users, nb_items, pretrained, checkpoint, **config)


def gmf(nb_users: int | None = None, nb_items: int | None = None, pretrained=False, checkpoint=None, **config):
    """NeuMF's GMF branch alone; keyword argument: mf_dim."""
    return _load("gmf", nb_users, nb_items, pretrained, checkpoint, **config)


def mlp(nb_users: int | None = None, nb_items: int | None = None, pretrained=False, checkpoint=None, **config):
    """NeuMF's MLP branch alone; keyword arguments: mlp_layers, dropout."""
    return _load("mlp", nb_users, nb_items, pretrained, checkpoint, **config)


def multvae(nb_users: int | None = None, nb_items: int | None = None, pretrained=False, checkpoint=None,
            interactions=None, **config):
    """Mult-VAE (Liang et al. 2018); a fresh model needs interactions=(users, items); keyword
    arguments: hidden, latent, dropout, anneal_cap, total_anneal_steps."""
    return _load("multvae", nb_users, nb_items, pretrained, checkpoint, interactions, **config)


def convncf(nb_users: int | None = None, nb_items: int | None = None, pretrained=False, checkpoint=None, **config):
    """ConvNCF (He et al. 2018); keyword arguments: embedding_size, cnn_channels, cnn_kernels,
    cnn_strides, dropout, reg_weights."""
    return _load("convncf", nb_users, nb_items, pretrained, checkpoint, **config)
