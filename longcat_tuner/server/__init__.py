"""The web UI behind `longcat-tuner server`: a FastAPI app (`app.py`), request guards (`security.py`),
CLI subprocess records (`jobs.py`) and static pages (`static/`). Never imports torch."""
