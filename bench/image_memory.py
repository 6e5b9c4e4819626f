"""Peak worker memory for one 50 MB image, printed beside the image's size.

A real worker process (embedded default, one thread) runs a warm-up job, then a job that
references a local 50 MB png. The worker's peak resident memory (VmHWM, from /proc) before
and after the big job gives the extra memory the image cost while its request was built and
sent. The emulator runs in this process, so what it buffers is not counted.

    .venv/bin/python -m bench.image_memory
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qbgw import producer
from qbgw.emulator.server import Emulator, EmulatorConfig
from qbgw.images.samples import png_bytes, png_rgb
from qbgw.queries import wait_for_job
from qbgw.settings import Secret, Settings

ASSISTANT = "65d5f3473d5d68095462165d"
TOKEN = "bench-token"
MB = 1024 * 1024


def big_png(path: Path, width: int = 4096, height: int = 4200) -> int:
    """A png of random rgb pixels: about 50 MB that no codec shrinks."""
    data = png_rgb(width, height, os.urandom(3 * width * height), 3 * width)
    path.write_bytes(data)
    return len(data)


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def main() -> None:
    folder = Path(tempfile.mkdtemp(prefix="qbgw-imgmem-"))
    root = folder / "images"
    root.mkdir()
    size = big_png(root / "big.png")
    (root / "small.png").write_bytes(png_bytes(8, 8))
    config = EmulatorConfig(tokens=frozenset({TOKEN}), assistants=frozenset({ASSISTANT}))
    try:
        with Emulator(config) as emu:
            settings = Settings(
                data_dir=folder / "data",
                base_url=emu.url,
                token=Secret(TOKEN),
                image_roots=str(root),
                concurrency=1,
                read_timeout=120,
            )
            env = {**os.environ, **settings.to_env()}
            worker = subprocess.Popen(
                [sys.executable, "-m", "qbgw", "worker", "-l", "WARNING"],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                _run(settings, worker.pid, root, size)
            finally:
                worker.terminate()
                worker.wait(30)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _job(settings: Settings, path: Path) -> str:
    content = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": str(path)}}]
    job_id = producer.submit(ASSISTANT, [{"role": "user", "content": content}], settings=settings)
    view = wait_for_job(job_id, timeout=300, settings=settings)
    if view.status != "succeeded":
        raise SystemExit(f"job {job_id} {view.status}: {view.error}")
    return view.answer or ""


def _run(settings: Settings, pid: int, root: Path, size: int) -> None:
    _job(settings, root / "small.png")  # warm up: imports, connections, the first attempt
    time.sleep(0.5)
    before = peak_rss(pid)
    started = time.perf_counter()
    answer = _job(settings, root / "big.png")
    seconds = time.perf_counter() - started
    after = peak_rss(pid)
    extra = after - before
    encoded = 4 * ((size + 2) // 3)
    print(f"image on disk                      {size / MB:8.1f} MiB")
    print(f"its base64 in the request          {encoded / MB:8.1f} MiB")
    print(f"worker peak RSS before the job     {before / MB:8.1f} MiB")
    print(f"worker peak RSS after the job      {after / MB:8.1f} MiB")
    print(f"extra worker memory for the image  {extra / MB:8.1f} MiB = {extra / size:.2f} x the image size")
    print(f"job time (submit to answer)        {seconds:8.2f} s")
    print(f"emulator saw                       {answer.split('. ', 1)[-1]}")


if __name__ == "__main__":
    main()
