"""ERNIE DPO recipe as a DVC pipeline: the pure logic the stages and tests share.

Public surface, by module: data, formats, tokens and stats (conversion, filtering, splitting, token ids, metrics),
bootstrap (paired intervals and power), engine / launch / engine_main / devices / weights (PaddleFormers: its YAML,
how it is started, the device, model files), generate / decode (local inference), openai_client / managed /
dev_server (served inference), length_probe, probes, diagnose, series, report, cloud, plan, fetch, params, cli.
Importing it changes nothing in the process; entry points call runtime.setup() first.
"""
