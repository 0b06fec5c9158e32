"""The wire layers and the daemon import without torch: a DHT-only or bootstrap process must not pay for it.

Each check runs in a fresh interpreter, since this test process has torch loaded already (conftest.py).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers")


def heavy_modules_after(code: str) -> list[str]:
    """The torch/transformers modules loaded in a fresh interpreter after running `code`."""
    probe = (
        f"{code}\nimport json, sys\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.parametrize(
    "code",
    [
        "import petalnode.dht, petalnode.codecs",
        # Everything a DHT peer does with the codecs: messages in and out, an announcement through its record.
        "from petalnode.codecs import CodecLimits, TensorCodec, decode_message, encode_message, packb, unpackb\n"
        "from petalnode.dht import Announcement, Record, ServerState, dht_key\n"
        "from petalnode.identity import Identity\n"
        "ann = Announcement(state=ServerState.ONLINE, model='m', start_block=0, end_block=4, throughput=1.0,\n"
        "                   cache_tokens_left=1, addresses=('tcp://127.0.0.1:1',), version='0')\n"
        "record = Record.create(Identity.generate(), key=dht_key('m.0:8'), value=ann.to_bytes(),\n"
        "                       expires_at=1e10, seq=1)\n"
        "assert Announcement.from_bytes(record.value) == ann\n"
        "assert unpackb(packb({'a': [1, b'x']})) == {'a': [1, b'x']}",
        "import petalnode.dht._process",
        # What the bootstrap role imports (tests/cli/test_cli_bootstrap_imports.py runs the real thing).
        "from petalnode.node import DEFAULT_RECORD_TTL_S, NatOptions, Node, fetch_swarm\n"
        "from petalnode.compute import parse_size\n"
        "import petalnode.cli, petalnode.transport",
        # The health page a bootstrap serves (--monitor-port): report, probes (the "info" verb), FastAPI, uvicorn.
        "import petalnode.monitor\nfrom petalnode.monitor import build_app\nfrom petalnode.node import collect_health\n"
        "from petalnode.cli._monitor import serve_health_page\nbuild_app(None)",
    ],
    ids=["import", "announce-and-parse", "dht-process", "bootstrap-imports", "health-page"],
)
def test_dht_and_codec_core_do_not_import_torch(code: str) -> None:
    assert heavy_modules_after(code) == []


@pytest.mark.parametrize(
    "code",
    [
        "from petalnode.codecs import decode_tensor, encode_tensor, packb, unpackb\n"
        "import torch\n"
        "t = torch.arange(6.0).reshape(2, 3)\n"
        "assert torch.equal(decode_tensor(unpackb(packb(encode_tensor(t)))), t)",
        # A tensor field registers the tensor converter when the class is registered, nothing else imported.
        "import torch\n"
        "from petalnode.codecs import Message, decode_message, encode_message, register_message\n"
        "@register_message\n"
        "class M(Message):\n"
        "    KIND = 'test.lazy_tensor'\n"
        "    x: torch.Tensor\n"
        "assert 'petalnode.codecs._tensor' in sys.modules\n"
        "t = torch.ones(3)\n"
        "assert torch.equal(decode_message(encode_message(M(x=t)), expected=M).x, t)",
    ],
    ids=["functions", "message-field"],
)
def test_tensor_support_still_loads_on_first_use(code: str) -> None:
    assert "torch" in heavy_modules_after("import sys\n" + code)
