"""One router per resource of the web API; `server.app.create_app` includes them all.

Every router takes what it needs through `server.deps.get_state`, so each can be mounted alone on a
bare FastAPI app with that dependency overridden (tests/test_server_routes.py does).
"""
