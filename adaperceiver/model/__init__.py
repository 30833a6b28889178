from .perceiver import AdaPerceiverClassifier, AdaPerceiverOutput  # noqa: F401
