"""What the web server is configured with (`ServerSettings`, built by `longcat-tuner server` from its
flags) and the names of the files it keeps in its data folder."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

CONFIG_NAME = "config.json"
DATASETS_NAME = "multidatabackend.json"
# Path-valued keys of one multidatabackend.json entry (config.json's are `config.training.PATH_FIELDS`).
DATASET_PATH_FIELDS = ("instance_data_dir", "cache_dir_vae", "cache_dir_text")


@dataclass(frozen=True)
class ServerSettings:
    """Everything the app needs; built by `longcat-tuner server` from its flags."""

    token: str
    data_dir: Path
    allowed_roots: tuple[Path, ...] = ()
    host: str = "127.0.0.1"
    extra_hosts: tuple[str, ...] = ()
    max_upload_bytes: int = 20 * 1024 * 1024
    # Check and preview jobs that may run at once (a preview holds a GPU; each loads a model).
    max_jobs: int = 2
    cwd: Path = field(default_factory=Path.cwd)
    # How to call the CLI; default `python -m longcat_tuner.cli` with this interpreter (tests swap it).
    cli: tuple[str, ...] = ()
    # The GPU probe (`GET /api/system/gpu`) runs this program with `--query-gpu=...` (tests swap it).
    nvidia_smi: str = "nvidia-smi"

    @property
    def roots(self) -> tuple[Path, ...]:
        """Folders a client may name: the data folder plus `--allow-dir` folders."""
        return (self.data_dir.resolve(),) + tuple(root.resolve() for root in self.allowed_roots)

    @property
    def config_path(self) -> Path:
        return self.data_dir / "config" / CONFIG_NAME

    @property
    def datasets_path(self) -> Path:
        return self.data_dir / "config" / DATASETS_NAME
