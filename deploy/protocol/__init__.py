"""The ingress's request and response models (pydantic v2), one module per endpoint family, as vLLM's
``protocol.py``: schema, validation, defaults and the OpenAPI document in one place.

    common.py       shared field types (``Text``, ranges), the sampling fields of both generation endpoints,
                    ``Usage``, the model list
    completions.py  ``POST /v1/completions``
    chat.py         ``POST /v1/chat/completions``
    tokenize.py     ``POST /tokenize``, ``POST /detokenize`` (vLLM's shapes)
    errors.py       the one error model, ``ApiError``, and pydantic errors -> OpenAI error bodies
"""
