"""Training engine: train state, train_step / eval_step as pure functions, the epoch loop."""
import optax


def make_optimizer(learning_rate: float) -> optax.GradientTransformation:
    """Adam with PyTorch's defaults (betas 0.9/0.999, eps 1e-8 outside the square root).

    The learning rate lives in the optimizer state (`inject_hyperparams`), so the plateau
    schedule can change it between epochs without recompiling the step.
    """
    return optax.inject_hyperparams(optax.adam)(learning_rate=learning_rate, b1=0.9, b2=0.999,
                                                eps=1e-8)
