"""The web application: the radiologists' worklist, its JSON API (``/api/v1``), accounts,
audit and health (FastAPI served by uvicorn; ``fracture-triage api`` or ``up``)."""
