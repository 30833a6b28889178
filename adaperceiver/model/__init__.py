from .perceiver import (AdaPerceiverClassifier, AdaPerceiverDistill,  # noqa: F401
                        AdaPerceiverOutput, model_class)
