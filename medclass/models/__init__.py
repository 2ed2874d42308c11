"""The model zoo: ``create_model(name, ...)``, ``list_models()``, ``model_info(name)``.

As in timm, the registry (:mod:`medclass.models.registry`) knows nothing of the
families; importing the family modules here runs their ``@register_model``
decorators, so ``import medclass.models`` registers the whole zoo.
"""

from medclass.models import attention, classic, cnn, crossmodal, rnn  # noqa: F401  (registers the families)
from medclass.models.registry import (
    FAMILIES,
    ClassifierModule,
    ModelInfo,
    count_parameters,
    create_model,
    list_models,
    model_info,
    register_model,
)

__all__ = [
    "FAMILIES",
    "ClassifierModule",
    "ModelInfo",
    "count_parameters",
    "create_model",
    "list_models",
    "model_info",
    "register_model",
]
