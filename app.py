"""GLIP Explorer — Gradio app (local, or unchanged as a Hugging Face Space).

    python app.py [--host 0.0.0.0] [--port 7860] [--model PATH]

Environment: GLIP_MODEL (local checkpoint: an official .pth or a folder of ours), GRADIO_SERVER_NAME,
GRADIO_SERVER_PORT, GLIP_CONCURRENCY (default 2), GLIP_QUEUE_SIZE (default 32), GLIP_CACHE (where released
checkpoints are downloaded and converted to), HF_ENDPOINT (a Hugging Face mirror), HF_HUB_OFFLINE=1 (no
downloads), GLIP_FP16=1 (store downloads converted to fp16). Nothing is shared publicly (no share links).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time

T0 = time.perf_counter()
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="GLIP Explorer (Gradio)")
    ap.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                    help="interface to bind (0.0.0.0 for all; Spaces set GRADIO_SERVER_NAME)")
    ap.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    ap.add_argument("--model", default=os.environ.get("GLIP_MODEL"),
                    help="a local checkpoint (official .pth or our folder) offered first and used by default")
    ap.add_argument("--concurrency", type=int, default=int(os.environ.get("GLIP_CONCURRENCY", "2")))
    ap.add_argument("--queue-size", type=int, default=int(os.environ.get("GLIP_QUEUE_SIZE", "32")))
    ap.add_argument("--fp16", action="store_true", default=os.environ.get("GLIP_FP16", "") not in ("", "0"),
                    help="store downloaded checkpoints converted to fp16 (half the disk; computed in fp32)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    from app import ModelManager, build_demo, launch_kwargs, queue
    from glip.errors import GLIPError

    manager = ModelManager(local=a.model, fp16=a.fp16)
    default = manager.default()
    try:  # load the default model now (a Space's preloaded GLIP-T is converted once): the first request is fast
        manager.wait(default)
    except GLIPError as e:
        print(f"warning: {e}", file=sys.stderr, flush=True)
    demo = queue(build_demo(manager), concurrency=a.concurrency, max_size=a.queue_size)
    # SIGTERM (how a Space or a service manager stops the app) exits normally, so the scratch folder is removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    demo.launch(server_name=a.host, server_port=a.port, share=False, prevent_thread_lock=True, **launch_kwargs())
    print(f"GLIP Explorer ready at {demo.local_url} in {time.perf_counter() - T0:.1f} s (default model: {default})",
          flush=True)
    try:
        demo.block_thread()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        demo.close()
        demo.core.scratch.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
