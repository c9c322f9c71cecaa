"""ERNIE DPO recipe as a DVC pipeline: the pure logic the stages and tests share."""
