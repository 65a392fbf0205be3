"""Put on PYTHONPATH of plain vLLM references (tests/helpers.plain_vllm): every process
of plain vLLM (API server, engine core, spawned workers) gets the AMX tile state at
start, as pool workers do (compat.request_amx_permission says why). Nothing else of vLLM
changes: only an AMX instruction that would be SIGILL runs instead."""

from vllm_pool.compat import request_amx_permission

request_amx_permission()
