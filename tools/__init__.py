"""Commands around a model: prediction, weight conversion, local multi-process launch, previews."""
