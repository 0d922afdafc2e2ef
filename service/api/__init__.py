"""The HTTP surface: routes and their request/response models, body intake, image decoding, parsing the
model's answers into JSON, annotated pictures, the OpenAPI document, and the OpenAI-compatible routes.

It calls engines only through :mod:`service.engines`; the guards around it live in :mod:`service.guards`.
"""
