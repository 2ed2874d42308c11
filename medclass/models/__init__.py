"""The model zoo: ``create_model(name, ...)``, ``list_models()``, ``model_info(name)``."""

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
