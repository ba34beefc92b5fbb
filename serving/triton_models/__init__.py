"""Python-backend `model.py` sources that serving/export.py copies into a model repository."""
