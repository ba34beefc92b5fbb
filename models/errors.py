"""The exception for expected user errors in training (bad data, options or checkpoints).

Commands print its message as one line and exit with merlin_ncf.errors.EXIT_USER_ERROR.
"""


from merlin_ncf.errors import UserError


class TrainingError(UserError):
    """An expected failure caused by the input, the options or the environment."""
